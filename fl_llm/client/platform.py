"""`Platform`: one company in the federation. Owns its data and its model copy; no Ray here.

The driver constructs it with the run config and a platform id — a data *location*, never
records. Everything the platform returns is either adapter tensors (its update) or aggregate
numbers (counts, mean losses, AUC): no record and no per-example output leaves this class, and
under differential privacy no un-noised statistic of its training records either
(`fl_llm.privacy.release`). State it keeps between rounds (control variates, a personal B,
optimizer moments, an error-feedback residual) lives in its own state directory
(`client.state_dir`), which the driver never reads.
The Ray backend makes it an actor; the local backend calls the very same class in-process.
Methods whose name starts with "_" are not part of the remote API (the backends refuse them).
"""

from __future__ import annotations

import os
import re
import socket
import time
from pathlib import Path

import numpy as np

from fl_llm import faults
from fl_llm.client.rng import platform_rng
from fl_llm.client.secagg_party import SecAggParty
from fl_llm.client.train import device_problem, peak_memory, resolve_device
from fl_llm.config import RunConfig, from_dict
from fl_llm.model.adapters import get_adapter_state, set_adapter_state, state_nbytes
from fl_llm.strategies import STRATEGIES
from fl_llm.tensors import AdapterState

MIN_PER_CLASS = 20  # fewer rows of a class in a split than this gets a warning at start


class Platform:
    """One platform. `hard_exit`: an injected kill really ends the process (a Ray actor); in the
    driver's own process (the local backend) it raises `InjectedKill` instead. `shared`: the
    (LoRA-wrapped model, tokenizer) of a `PlatformHost`, whose frozen base several platforms use;
    this platform then adds and trains an adapter of its own on it."""

    def __init__(
        self,
        config: dict,
        platform_id: int,
        num_threads: int | None = None,
        hard_exit: bool = False,
        shared: tuple | None = None,
    ):
        import torch

        from fl_llm.data import sources
        from fl_llm.data.batching import answer_token_ids, encode
        from fl_llm.errors import UserError
        from fl_llm.model.adapters import apply_lora
        from fl_llm.model.build import build_base

        if num_threads:
            torch.set_num_threads(num_threads)
        self.cfg: RunConfig = from_dict(config)
        self.id = platform_id
        self.party = SecAggParty(platform_id, self.cfg)  # its side of secure aggregation
        self.hard_exit = hard_exit
        # State this platform keeps between rounds (e.g. a strategy's control variates): saved in
        # its own state directory at every checkpoint of the run (save_state / load_state).
        self.persistent: dict = {}
        # What training this round would change in it, kept apart until the driver accepts the
        # update (commit): a rejected, late or retried update leaves `persistent` as it was.
        self.staged: dict = {}
        self.staged_round: int | None = None
        self.state_dir: Path | None = None
        self.user_error: str | None = None
        self.task = sources.task_of(self.cfg)
        self.device = resolve_device(self.cfg.client.device)
        problem = device_problem(self.cfg, self.device)
        if problem:
            self.user_error, self.name = f"platform {platform_id}: {problem}", f"platform-{platform_id}"
            return

        # Data stays in this process from here on. A problem with it is the user's to fix: keep
        # the message for `describe`, so the driver can stop the run cleanly before it starts.
        try:
            data = sources.load_platform_data(self.cfg, platform_id)
        except UserError as e:
            self.user_error, self.name = str(e), f"platform-{platform_id}"
            return
        self.name = data.name
        if self.cfg.client.state_dir:
            self.state_dir = Path(self.cfg.client.state_dir.replace("{name}", safe_name(self.name)))
        kind = self.cfg.model.kind
        # What the strategy asks of a platform: its LoRA rank, frozen A (FFA), own B (FedSA),
        # which tensors it sends, merges into its base weights (FedEx, FLoRA).
        self.strategy = STRATEGIES[self.cfg.strategy.name]
        lora = self.cfg.model.lora
        self.global_rank = max(lora.ranks) if lora.ranks else lora.r
        self.rank = lora.ranks[platform_id] if lora.ranks and platform_id >= 0 else self.global_rank
        if shared is None:
            try:
                base, self.tokenizer = build_base(self.cfg.model, self.cfg.seed, num_labels=len(self.task.verbalizer))
            except UserError as e:  # e.g. 4-bit loading on a node without a GPU
                self.user_error = str(e)
                return
            if not getattr(base, "is_quantized", False):  # a 4-bit base is placed on its GPU as it loads
                base.to(self.device)  # before wrapping: adapters are created on the base's device
            try:
                self.model = apply_lora(
                    base,
                    self.cfg.model,
                    self.cfg.seed,
                    rank=self.rank,
                    checkpointing=self.cfg.client.gradient_checkpointing,
                    compile_blocks=self.cfg.client.compile,
                )
            except UserError as e:  # target modules that match nothing, a rank above a layer's size
                self.user_error = str(e)
                return
            self.adapter = "default"
        else:  # one resident base model, one adapter per platform on it
            from fl_llm.model.adapters import lora_config

            self.model, self.tokenizer = shared
            self.adapter = f"platform{platform_id}"
            with torch.random.fork_rng(devices=[]):  # the same initial factors as apply_lora
                torch.manual_seed(self.cfg.seed)
                self.model.add_adapter(self.adapter, lora_config(self.cfg.model, self.rank))
        self._activate()
        self.base_version = 0  # how many of the driver's base merges this process has applied
        self.pad_id = self.tokenizer.pad_token_id
        self.answer_ids = answer_token_ids(self.task, self.tokenizer) if kind == "causal_lm" else []
        verbalizer = self.cfg.client.loss == "verbalizer"
        self.loss_words = self.answer_ids if verbalizer else None  # None: the whole vocabulary
        max_len = self.cfg.model.max_length
        self.train_set = encode(data.train, self.task, self.tokenizer, max_len, kind, first_token=verbalizer)
        self.eval_set = encode(data.eval, self.task, self.tokenizer, max_len, kind, first_token=verbalizer)
        if len(self.train_set) == 0 or len(self.eval_set) == 0:
            self.user_error = (
                f"platform {self.name!r} has {len(self.train_set)} training and {len(self.eval_set)} "
                "held-out rows; it needs both"
            )
            return
        self.dp_sample_rate, self.dp_noise = self._record_level_dp()

    def _activate(self) -> None:
        """Make this platform's adapter the one the model runs and trains (several platforms may
        share the model); FFA keeps its A frozen, model.lora.trainable_modules the other modules'."""
        if self.adapter != "default" or len(self.model.peft_config) > 1:
            self.model.set_adapter(self.adapter)
        train = set(self.cfg.model.lora.trainable_modules)
        for name, param in self.model.named_parameters():
            own = f".lora_A.{self.adapter}." in name or f".lora_B.{self.adapter}." in name
            if own and self.strategy.frozen(name):
                param.requires_grad_(False)
            elif train and ".lora_" in name and name.split(".lora_")[0].rsplit(".", 1)[-1] not in train:
                param.requires_grad_(False)

    def _record_level_dp(self) -> tuple[float, float]:
        """(q, z) of this platform's DP-SGD: q = batch / |data|; z as configured, or the smallest
        z that keeps this platform within privacy.target_epsilon after every local step of every
        round. Computed here, from this platform's own data size; (0, 0) without record-level DP."""
        if self.cfg.privacy.dp.level != "record":
            return 0.0, 0.0
        from fl_llm.privacy.accountant import Mechanism, calibrate

        p, c = self.cfg.privacy, self.cfg.client
        q = min(1.0, c.batch_size / len(self.train_set))
        if p.dp.noise_multiplier is not None:
            return q, p.dp.noise_multiplier
        steps = self.cfg.server.rounds * c.local_steps
        return q, calibrate(p.target_epsilon, p.delta, steps, Mechanism(1.0, q), p.dp.accountant)

    def process(self) -> tuple[str, int]:
        """(host, process id) of this platform: the driver waits for it to exit at shutdown."""
        return this_process()

    @property
    def private_log(self) -> Path | None:
        """This platform's own log of what it keeps from the driver under DP."""
        return self.state_dir / "metrics.jsonl" if self.state_dir else None

    def _release(self, answer: dict, round_: int, call: str) -> dict:
        from fl_llm.privacy.release import release

        return release(answer, self.cfg.privacy.dp.level, self.private_log, round_, call)

    def describe(self) -> dict:
        """Aggregate facts the driver may know: sizes (and, without DP, label balance). Never records."""
        if self.user_error:
            return {"platform": self.id, "name": self.name, "user_error": self.user_error}
        counts = np.bincount(self.train_set.labels, minlength=len(self.task.verbalizer))
        facts = self._facts(counts)
        warnings = self._balance_warnings()
        if warnings:
            facts["warnings"] = warnings
        return self._release(facts, 0, "describe")

    def _balance_warnings(self) -> list[str]:
        """A split with one class, or fewer than MIN_PER_CLASS rows of a class, makes its metrics
        meaningless (AUC undefined) or its training one-sided: said at start, in one line each."""
        out = []
        k = len(self.task.verbalizer)
        for split, enc in (("training", self.train_set), ("held-out", self.eval_set)):
            counts = np.bincount(enc.labels, minlength=k)
            if (counts > 0).sum() < 2:
                only = self.task.verbalizer[int(np.argmax(counts))].strip()
                out.append(f"{self.name}: its {split} split holds one class only ({only!r}, {int(counts.max())} rows)")
            elif counts.min() < MIN_PER_CLASS:
                few = self.task.verbalizer[int(np.argmin(counts))].strip()
                out.append(
                    f"{self.name}: its {split} split has only {int(counts.min())} rows of {few!r} "
                    f"(fewer than {MIN_PER_CLASS}: its metrics will be noisy)"
                )
        return out

    def _facts(self, counts) -> dict:
        return {
            "platform": self.id,
            "name": self.name,
            "num_train": len(self.train_set),
            "num_eval": len(self.eval_set),
            "label_counts": counts.tolist(),
            "train_positive_rate": float(counts[-1] / max(counts.sum(), 1)),
            "device": str(self.device),
            **(
                {"dp_sample_rate": self.dp_sample_rate, "dp_noise_multiplier": self.dp_noise}
                if self.dp_noise or self.dp_sample_rate
                else {}
            ),
        }

    def initial_adapter(self) -> AdapterState:
        """The round-0 global adapter: this model's own init (the same on every platform: same
        seed), or — when ranks differ — a fresh init at the largest rank, so no component starts
        dead."""
        from fl_llm.strategies.flora import fresh_lora
        from fl_llm.strategies.lora import from_rank

        self._activate()
        state = get_adapter_state(self.model)
        if self.rank == self.global_rank:
            return state
        return fresh_lora(from_rank(state, self.rank, self.cfg.model.lora.alpha, self.global_rank), self.cfg.seed, 0)

    def commit(self, round_: int) -> bool:
        """The driver accepted this platform's update of `round_`: the state staged while training
        it (SCAFFOLD's cᵢ, FedSA's own B, DP-AdamBC's moments, top-k's residual) becomes the state
        kept between rounds. An update that was rejected, late or part of a failed attempt is
        never committed; the next training starts from the state as it was."""
        if self.staged_round != round_:
            return False
        self.persistent.update(self.staged)
        self.staged, self.staged_round = {}, None
        return True

    def save_state(self, round_: int, keep: int = 2) -> bool:
        """Write the state kept between rounds as of the end of `round_` into this platform's state
        directory (the driver calls this at each checkpoint; it never reads the files)."""
        if self.state_dir is None:
            return False
        from fl_llm import checkpoint

        checkpoint.save(self.state_dir / "checkpoints", round_, {"persistent": self.persistent}, keep=keep)
        return True

    def load_state(self, round_: int) -> int:
        """Take up the state saved at the newest checkpoint at or before `round_` (the driver's
        checkpoint being resumed); fresh state when there is none. Returns the round loaded (0: none)."""
        from fl_llm import checkpoint

        self.persistent = {}
        if self.state_dir is None:
            return 0
        saved, _ = checkpoint.latest_intact(self.state_dir / "checkpoints", at_most=round_)
        if saved is None:
            return 0
        got, state = checkpoint.load(saved, verified=True)
        self.persistent = state["persistent"]
        return got

    # --- the global model as this platform sees it -------------------------------------------

    def _apply_base_merges(self, base: dict | None) -> None:
        """Fold the driver's base merges (FedEx residuals, FLoRA stacks) it has not applied yet
        into the frozen weights: W₀ += s·B·A per layer, in order, each exactly once."""
        if not base:
            return
        import torch

        start, merges = int(base["start"]), base["merges"]
        if start > self.base_version:
            raise RuntimeError(f"platform {self.id}: base merges from {start}, but it has applied {self.base_version}")
        scale = self.cfg.model.lora.alpha / self.global_rank
        with torch.no_grad():
            for merge in merges[self.base_version - start :]:
                for layer, (b, a) in merge.items():
                    weight = self.model.get_submodule(layer).base_layer.weight
                    delta = torch.from_numpy(np.asarray(b, np.float32) @ np.asarray(a, np.float32)) * scale
                    weight.add_(delta.to(weight.device, weight.dtype))
                self.base_version += 1

    def _load_global(self, global_state: AdapterState, base: dict | None) -> AdapterState:
        """Set the model to the global adapter (at this platform's rank; FedSA: with its own B).
        Returns the adapter it starts from, in this platform's shapes."""
        from fl_llm.strategies.lora import to_rank

        self._activate()
        self._apply_base_merges(base)
        state = to_rank(global_state, self.rank, self.cfg.model.lora.alpha, self.global_rank)
        own = self.persistent.get("B")  # FedSA: its own B; the tensors a strategy keeps here
        if own is not None:
            state = {k: own[k] if self.strategy.personal(k) else v for k, v in state.items()}
        set_adapter_state(self.model, state)
        return state

    def train(
        self,
        global_state: AdapterState,
        round_: int,
        attempt: int = 0,
        budget_s: float | None = None,
        control: AdapterState | None = None,
        base: dict | None = None,
        secagg: dict | None = None,
    ) -> dict:
        """Local training from the global adapter; returns the update (local - global) on the
        tensors this strategy sends, in this platform's LoRA rank.

        `budget_s`: the round's deadline as seen from here. Past it the driver has already left
        this platform out of the round, so training stops at once (`RoundDeadline`) and the
        platform is free for the next round's model instead of finishing stale work.
        `control`: SCAFFOLD's server control variate c. `base`: base merges to apply first.
        `secagg`: this round's secure-aggregation inputs (the shares addressed to this platform,
        its weight, the ring): the update then leaves only masked (`_masked_upload`).
        """
        from fl_llm.client.train import DpSgd, RoundDeadline, local_train, scheduled_lr

        t0 = time.perf_counter()
        self.staged, self.staged_round = {}, round_
        if secagg and not self.party.joins(secagg.get("sample_rate", 1.0), round_, attempt):
            return self._release(self._sits_out(global_state, round_, secagg), round_, "train")
        deadline = None if budget_s is None else time.monotonic() + budget_s
        self._before_training(round_, attempt, deadline, RoundDeadline)
        start = self._load_global(global_state, base)
        c = self.cfg.client
        lr = scheduled_lr(c.lr, c.lr_schedule, round_, self.cfg.server.rounds)
        scaffold = self.strategy.local_term == "scaffold"
        if scaffold:
            c_i = self.persistent.get("c") or {k: np.zeros_like(v) for k, v in start.items()}
        dp, batch_rng = None, platform_rng(self.cfg.seed, round_, self.id)
        if self.cfg.privacy.dp.level == "record":
            # DP's noise and Poisson sampling must be secret to whoever sees the update: a ChaCha20
            # keystream keyed from the OS unless a reproducible run is asked for (secure_rng=false)
            from fl_llm.privacy.csprng import dp_generator

            secure = self.cfg.privacy.dp.secure_rng
            batch_rng = dp_generator(secure, [self.cfg.seed, round_, self.id % 2**32, 4])
            seed = int(platform_rng(self.cfg.seed, round_, self.id, 2).integers(2**62))
            dp = DpSgd(self.cfg.privacy.dp.clip_norm, self.dp_noise, self.dp_sample_rate, seed, secure)
        import torch

        with torch.random.fork_rng(devices=[]):  # LoRA dropout draws from torch's RNG
            torch.manual_seed(int(platform_rng(self.cfg.seed, round_, self.id, 1).integers(2**31)))
            metrics = local_train(
                self.model,
                self.train_set,
                steps=c.local_steps,
                batch_size=c.batch_size,
                lr=lr,
                optimizer=c.optimizer,
                adambc_floor=c.adambc_floor,
                optimizer_state=self.persistent.get("adambc") if dp is not None else None,
                weight_decay=c.weight_decay,
                max_grad_norm=c.max_grad_norm,
                rng=batch_rng,
                device=self.device,
                pad_id=self.pad_id,
                deadline=deadline,
                on_step=self._fault_hook(round_, attempt),
                prox_mu=self.cfg.strategy.mu if self.strategy.local_term == "prox" else 0.0,
                correction={k: control[k] - c_i[k] for k in c_i} if scaffold and control is not None else None,
                dp=dp,
                pack_length=c.pack_length,
                autocast=self.cfg.model.dtype == "bfloat16",
                words=self.loss_words,
                head_lr=None
                if c.head_lr is None
                else scheduled_lr(c.head_lr, c.lr_schedule, round_, self.cfg.server.rounds),
                warmup=((max(round_, 1) - 1) * c.local_steps, c.warmup_steps),
            )
        moments = metrics.pop("optimizer_state", None)
        if moments is not None and dp is not None:  # computed from noised gradients only: DP covers them
            self.staged["adambc"] = moments
        local = get_adapter_state(self.model)
        update = {k: local[k] - start[k] for k in self.strategy.upload_keys(local)}
        result = {"num_examples": len(self.train_set), "metrics": metrics}
        personal = {k: v for k, v in local.items() if self.strategy.personal(k)}
        if personal:  # FedSA's B stays here: the personal part of the model
            self.staged["B"] = personal
        if scaffold:
            from fl_llm.strategies.scaffold import client_control_update

            zero = {k: np.zeros_like(v) for k, v in c_i.items()}
            self.staged["c"], delta_c = client_control_update(c_i, control or zero, update, c.local_steps, lr)
            result["extra"] = {"c": delta_c}
        bad = faults.corruption(self.cfg.faults, self.id, round_)
        if bad:
            update = faults.corrupt(update, bad.kind, bad.factor, seed=self.cfg.seed * 100_003 + round_)
        metrics["peak_memory_bytes"] = peak_memory(self.device)
        result.update(self.party.masked_upload(update, round_, secagg) if secagg else self._upload(update, round_))
        result["bytes"] += sum(state_nbytes(v) for v in result.get("extra", {}).values())
        metrics["train_seconds"] = time.perf_counter() - t0
        metrics["worker"] = "{}:{}".format(*this_process())  # platforms on one host share it
        return self._release(result, round_, "train")

    def _upload(self, update: AdapterState, round_: int) -> dict:
        """The update as sent: float32 (`update`), or compressed (`payload`, compression.name;
        top-k's error-feedback residual stays here, in the checkpointed state)."""
        from fl_llm.compression import compress, payload_nbytes

        codec = self.cfg.compression.name
        if codec == "none":
            return {"update": update, "bytes": state_nbytes(update)}
        rng = platform_rng(self.cfg.seed, round_, self.id, 3)
        payload, residual = compress(
            update, codec, rng, self.persistent.get("residual"), self.cfg.compression.topk_fraction
        )
        if residual is not None:
            self.staged["residual"] = residual
        return {"payload": payload, "bytes": payload_nbytes(payload)}

    # --- secure aggregation: this platform's side of the protocol (client/secagg_party.py) ------

    def secagg_advertise(self, round_: int, threshold: int) -> dict:
        """Step 0: fresh key pairs for this round; returns the two public keys."""
        return self.party.advertise(round_, threshold)

    def secagg_share(self, keys: dict) -> dict:
        """Step 1: {peer: encrypted Shamir shares of this platform's mask secrets}."""
        return self.party.share(keys)

    def secagg_reveal(self, survivors: list[int], dropped: list[int]) -> dict:
        """Step 3: the shares that let the driver unmask the sum of the survivors, and no more."""
        return self.party.reveal(survivors, dropped)

    def secagg_levels(self, update: AdapterState, round_: int, sa: dict, joined: bool = True):
        """What this platform would send into the secure sum for `update` (see SecAggParty.levels)."""
        return self.party.levels(update, round_, sa, joined)

    def _sits_out(self, global_state: AdapterState, round_: int, sa: dict) -> dict:
        """Not in this round's sample: a masked zero of the same length, so the driver's messages
        do not tell who joined."""
        zero = {k: np.zeros_like(global_state[k]) for k in self.strategy.upload_keys(global_state)}
        answer = {"num_examples": len(self.train_set), "metrics": {}}
        answer.update(self.party.masked_upload(zero, round_, sa, joined=False))
        answer["metrics"]["worker"] = "{}:{}".format(*this_process())
        return answer

    def _before_training(self, round_: int, attempt: int, deadline: float | None, late_error) -> None:
        """An injected delay: sleep like a slow machine, but not past the round's deadline."""
        delay = faults.delay_seconds(self.cfg.faults, self.id, round_)
        if delay <= 0:
            return
        wake = time.monotonic() + delay
        while (now := time.monotonic()) < wake:
            if deadline is not None and now > deadline:
                raise late_error(f"round {round_}: past the deadline while delayed")
            time.sleep(min(0.05, wake - now))

    def _fault_hook(self, round_: int, attempt: int):
        """Called after the first local step: where injected kills and errors strike mid-training."""
        kill = faults.should_kill(self.cfg.faults, self.id, round_, attempt)
        error = faults.should_error(self.cfg.faults, self.id, round_, attempt)
        if not (kill or error):
            return None

        def hook(step: int) -> None:
            if kill:
                if self.hard_exit:
                    os._exit(faults.KILL_EXIT_CODE)  # no cleanup, no exception: like a lost node
                raise faults.InjectedKill(f"platform {self.id}: injected kill in round {round_}")
            raise faults.InjectedError(f"platform {self.id}: injected error in round {round_}")

        return hook

    def save_personal(self, root: str, base_name: str) -> str:
        """FedSA: write this platform's own model (shared A, its own B) as a PEFT adapter under
        root/<name>/, from this process — the B never leaves the platform. Returns the path."""
        from pathlib import Path

        from fl_llm.model.adapters import save_adapter

        path = Path(root) / safe_name(self.name)  # a name from the data never leaves root
        path.parent.mkdir(parents=True, exist_ok=True)
        self._activate()
        save_adapter(get_adapter_state(self.model), self.cfg.model, path, base_name, rank=self.rank)
        return str(path)

    def _example_losses(self, global_state: AdapterState, base: dict | None, train_idx, eval_idx):
        """Per-record answer NLL of `global_state` on the given training and held-out rows. Never
        sent anywhere: `audit` turns them into figures here."""
        from fl_llm.client.train import example_losses

        self._load_global(global_state, base)
        kw = {"batch_size": self.cfg.client.eval_batch_size, "device": self.device, "pad_id": self.pad_id}
        kw["words"] = self.loss_words
        return example_losses(self.model, self.train_set, train_idx, **kw), example_losses(
            self.model, self.eval_set, eval_idx, **kw
        )

    def audit(
        self,
        start: AdapterState,
        final: AdapterState,
        base: dict | None,
        state_round: int,
        max_examples: int,
        epsilon: float,
        delta: float,
        alpha: float,
    ) -> dict:
        """The membership audit, run where the records are: members are this platform's training
        records, non-members its held-out ones (label-matched); the attacks score both under the
        model before private training (`start`) and the final one (`final`, with the base merges
        `base` and this platform's own state as of round `state_round`). Returns only the
        figures (`fl_llm.privacy.audit.attack_report`); no per-record score leaves."""
        from fl_llm.privacy.audit import attack_report, label_matched_samples

        rng = np.random.default_rng([self.cfg.seed, self.id, 0xA0D])
        members, nonmembers = label_matched_samples(self.train_set.labels, self.eval_set.labels, max_examples, rng)
        base_m, base_n = self._example_losses(start, None, members, nonmembers)
        self.load_state(state_round)
        ft_m, ft_n = self._example_losses(final, base, members, nonmembers)
        split_rng = np.random.default_rng([self.cfg.seed, self.id, 0xA0E])
        return {
            "members": len(members),
            "nonmembers": len(nonmembers),
            "mean_loss": {"members": float(ft_m.mean()), "nonmembers": float(ft_n.mean())},
            "attacks": {
                "loss": attack_report(-ft_m, -ft_n, epsilon, delta, alpha, split_rng),
                "reference": attack_report(base_m - ft_m, base_n - ft_n, epsilon, delta, alpha, split_rng),
            },
        }

    def evaluate(self, global_state: AdapterState, base: dict | None = None, detail: bool = False) -> dict:
        """Loss and task metrics of `global_state` on this platform's held-out split (after the
        base merges in `base`; FedSA: with this platform's own B). For a yes/no task also its
        calibration (ECE) and the decision threshold chosen on one half of the held-out records
        (best F1) with the precision and recall it gets on the other half. `detail` (for `fl-llm
        compare`) adds the reliability bins and a bootstrap interval of the headline metric."""
        from fl_llm.client.train import evaluate

        t0 = time.perf_counter()
        self._load_global(global_state, base)
        out = evaluate(
            self.model,
            self.eval_set,
            answer_ids=self.answer_ids,
            batch_size=self.cfg.client.eval_batch_size,
            device=self.device,
            pad_id=self.pad_id,
            words=self.loss_words,
        )
        probs = out["probs"]
        scores = probs[:, 1] if probs.shape[1] == 2 else probs
        metrics = self.task.metrics(self.eval_set.labels, scores, self.eval_set.groups)
        result = {k: float(v) for k, v in metrics.items()}
        result["eval_loss"] = out["loss_sum"] / max(out["tokens"], 1)
        result["num_eval"] = len(self.eval_set)
        labels = np.asarray(self.eval_set.labels)
        if probs.shape[1] == 2 and len(labels) >= 4:
            result.update(self._calibration(labels, scores, detail))
        if detail:
            from fl_llm.metrics import bootstrap_interval

            primary = self.task.primary
            rng = platform_rng(self.cfg.seed, 0, self.id, 0xB007)
            groups = self.eval_set.groups

            def headline(y, s):
                return self.task.metrics(y, s, None if primary.startswith(("hr@", "ndcg@")) else groups)[primary]

            result["interval"] = list(bootstrap_interval(labels, scores, headline, rng))
        result["eval_seconds"] = time.perf_counter() - t0
        return result

    def _calibration(self, labels: np.ndarray, scores: np.ndarray, detail: bool) -> dict:
        from fl_llm.metrics import at_threshold, best_f1_threshold, calibration

        ece, bins = calibration(labels, scores)
        order = platform_rng(self.cfg.seed, 0, self.id, 0x7E5).permutation(len(labels))
        val, test = order[: len(order) // 2], order[len(order) // 2 :]
        threshold = best_f1_threshold(labels[val], scores[val])
        at = at_threshold(labels[test], scores[test], threshold)
        out = {"ece": ece, "threshold": threshold, **{f"{k}@threshold": v for k, v in at.items()}}
        if detail:
            out["reliability"] = bins
        return out


def this_process() -> tuple[str, int]:
    """(host name, process id) of the calling process."""
    return socket.gethostname(), os.getpid()


def safe_name(name: str) -> str:
    """A platform's name as one safe path component (its state directory)."""
    cleaned = re.sub(r"[^\w.-]", "_", name)
    return "_" if cleaned in ("", ".", "..") else cleaned
