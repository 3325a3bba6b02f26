"""`Platform`: one company in the federation. Owns its data and its model copy; no Ray here.

The driver constructs it with the run config and a platform id — a data *location*, never
records. Everything the platform returns is either adapter tensors (its update) or aggregate
numbers (counts, mean losses, AUC): no record and no per-example output leaves this class, and
under differential privacy no un-noised statistic of its training records either
(`fl_llm.privacy.release`). State it keeps between rounds (control variates, a personal B, optimizer
moments, an error-feedback residual) lives in its own `client.state_dir`, never read by the driver.
It composes its data (`data/sources.py`, `data_facts.py`), model (`model_setup.py`), trainer
(`train.py`), uplink codec (`compression.py`), secure-aggregation party (`secagg_party.py`) and
evaluation (`evaluation.py`); a Ray actor, in-process, or behind `fl-llm serve`, the same class.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import numpy as np

from fl_llm import faults
from fl_llm.client.data_facts import balance_warnings, record_level_dp, unknown_token_warning
from fl_llm.client.evaluation import Evaluation
from fl_llm.client.kept_state import KeptState, safe_name, state_dir_of
from fl_llm.client.model_setup import apply_base_merges
from fl_llm.client.parallel import worker_figures
from fl_llm.client.rng import platform_rng
from fl_llm.client.secagg_party import SecAggParty
from fl_llm.client.train import device_problem, peak_memory, resolve_device
from fl_llm.config import RunConfig, from_dict
from fl_llm.model.adapters import get_adapter_state, set_adapter_state, state_nbytes
from fl_llm.strategies import STRATEGIES
from fl_llm.tensors import AdapterState


class Platform(Evaluation, KeptState):
    """One platform. `hard_exit`: an injected kill really ends the process (a Ray actor); in the
    driver's own process (the local backend) it raises `InjectedKill` instead. `shared`: a
    `PlatformHost`'s (LoRA-wrapped model, tokenizer), on whose frozen base it trains an adapter of
    its own. `data_index`: which of data.*'s platforms it loads (default its id; serve.data_index).
    `group`: (rendezvous, rank, world) — one of the platform's workers (`fl_llm.client.group`),
    which joins their process group before it loads the model."""

    def __init__(
        self,
        config: dict,
        platform_id: int,
        num_threads: int | None = None,
        hard_exit: bool = False,
        shared: tuple | None = None,
        data_index: int | None = None,
        group: tuple | None = None,
    ):
        import torch

        from fl_llm.data import sources
        from fl_llm.errors import UserError

        if num_threads:
            torch.set_num_threads(num_threads)
        self.cfg: RunConfig = from_dict(config)
        self.id = platform_id
        self.data_index = platform_id if data_index is None else data_index
        self.name = f"platform-{platform_id}"  # until its data names it
        self.party = SecAggParty(platform_id, self.cfg)  # its side of secure aggregation
        self.hard_exit = hard_exit
        # State this platform keeps between rounds (e.g. a strategy's control variates): saved in
        # its own state directory at every checkpoint of the run (save_state / load_state).
        self.persistent: dict = {}
        # What training this round would change in it, kept apart until the driver accepts the
        # update (commit): a rejected, late or retried update leaves `persistent` as it was.
        self.staged, self.staged_round = {}, None
        self.state_dir: Path | None = None
        self.loaded = False  # it has loaded another adapter: the model no longer holds its init
        self.task = sources.task_of(self.cfg)
        self.device = resolve_device(self.cfg.client.device)
        self.group = None  # fl_llm.client.parallel.Group: its place among the platform's workers
        if group is not None:
            from fl_llm.client.parallel import join

            rendezvous, rank, world = group
            self.group = join(rendezvous, rank, world, self.cfg.client.parallel, self.device)
        self.worker = 0 if self.group is None else self.group.rank
        # What the strategy asks of a platform: frozen tensors, personal ones, what it sends.
        self.strategy = STRATEGIES[self.cfg.strategy.name]
        lora = self.cfg.model.lora
        self.global_rank = max(lora.ranks) if lora.ranks else lora.r
        self.rank = lora.ranks[platform_id] if lora.ranks and platform_id >= 0 else self.global_rank
        # A problem with the device, the data or the model is the user's to fix: keep the message
        # for `describe`, so the driver can stop the run cleanly before it starts.
        self.user_error: str | None = None
        try:
            self._set_up(shared)
        except UserError as e:
            self.user_error = str(e)

    def _set_up(self, shared: tuple | None) -> None:
        """Load this platform's data (it stays in this process from here on), build its model
        and encode both splits."""
        from fl_llm.client.data_facts import encode_splits
        from fl_llm.client.model_setup import build_model
        from fl_llm.data import sources
        from fl_llm.errors import UserError

        problem = device_problem(self.cfg, self.device)
        if problem:
            raise UserError(f"platform {self.id}: {problem}")
        data = sources.load_platform_data(self.cfg, self.data_index)
        self.name = data.name
        if self.cfg.client.state_dir:
            self.state_dir = state_dir_of(self.cfg.client.state_dir, self.name)
        self.model, self.tokenizer, self.adapter = build_model(self.cfg, self.id, self.rank, self.device, shared)
        if self.group is not None and self.group.sharded:
            from fl_llm.client.parallel import shard_model

            shard_model(self.model, self.group)
        self._activate()
        self.base_version = 0  # how many of the driver's base merges this process has applied
        self.pad_id = self.tokenizer.pad_token_id
        # answer_ids: the tokens scored by probability; loss_words: the verbalizer loss's (None: all)
        self.train_set, self.eval_set, self.answer_ids, self.loss_words = encode_splits(
            self.cfg, self.task, self.tokenizer, data
        )
        if self.group is not None and len(self.train_set) < self.group.world:
            raise UserError(f"platform {self.name!r} has fewer training rows than workers ({self.group.world})")
        if len(self.train_set) == 0 or len(self.eval_set) == 0:
            raise UserError(
                f"platform {self.name!r} has {len(self.train_set)} training and {len(self.eval_set)} "
                "held-out rows; it needs both"
            )
        self.dp_sample_rate, self.dp_noise = record_level_dp(self.cfg, len(self.train_set))

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

    def process(self) -> tuple[str, int]:
        """(host, process id) of this platform: the driver waits for it to exit at shutdown."""
        return this_process()

    def describe(self) -> dict:
        """Aggregate facts the driver may know: sizes (and, without DP, label balance). Never records."""
        if self.user_error:
            return {"platform": self.id, "name": self.name, "user_error": self.user_error}
        facts = {"platform": self.id, "name": self.name, "num_train": len(self.train_set)}
        facts.update(num_eval=len(self.eval_set), device=str(self.device))
        if self.group is not None:
            facts["worker"] = "{}:{}".format(*this_process())
        warnings = []
        if self.task.generative:
            facts["answers"] = "generated"
        else:  # a yes/no or multi-class task: its label balance
            counts = np.bincount(self.train_set.labels, minlength=len(self.task.verbalizer))
            facts.update(label_counts=counts.tolist(), train_positive_rate=float(counts[-1] / max(counts.sum(), 1)))
            warnings = balance_warnings(self.name, self.task.verbalizer, self.train_set.labels, self.eval_set.labels)
        warnings += filter(None, [unknown_token_warning(self.name, self.tokenizer, self.train_set.input_ids)])
        if warnings:
            facts["warnings"] = warnings
        if self.dp_noise or self.dp_sample_rate:
            facts.update(dp_sample_rate=self.dp_sample_rate, dp_noise_multiplier=self.dp_noise)
        return self._release(facts, 0, "describe")

    def initial_adapter(self) -> AdapterState:
        """The round-0 global adapter: this model's own init (the same on every platform: same
        seed), or — when ranks differ — a fresh init at the largest rank, so no component starts
        dead."""
        from fl_llm.strategies.flora import fresh_lora
        from fl_llm.strategies.lora import from_rank

        if self.loaded:  # the model holds the adapter train or evaluate loaded last, not its init
            raise RuntimeError(f"platform {self.name!r}: initial_adapter after train or evaluate: its init is gone")
        self._activate()
        state = get_adapter_state(self.model)
        if self.rank == self.global_rank:
            return state
        return fresh_lora(from_rank(state, self.rank, self.cfg.model.lora.alpha, self.global_rank), self.cfg.seed, 0)

    # --- the global model as this platform sees it -------------------------------------------

    def _load_global(self, global_state: AdapterState, base: dict | None) -> AdapterState:
        """Set the model to the global adapter (at this platform's rank; FedSA: with its own B).
        Returns the adapter it starts from, in this platform's shapes."""
        from fl_llm.strategies.lora import to_rank

        self._activate()
        if base:
            self.base_version = apply_base_merges(self.model, base, self.base_version, self.cfg, self.id)
        state = to_rank(global_state, self.rank, self.cfg.model.lora.alpha, self.global_rank)
        own = self.persistent.get("B")  # FedSA: its own B; the tensors a strategy keeps here
        if own is not None:
            state = {k: own[k] if self.strategy.personal(k) else v for k, v in state.items()}
        set_adapter_state(self.model, state)
        self.loaded = True
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
        anchor: dict | None = None,
    ) -> dict:
        """Local training from the global adapter; returns the update (local - global) on the
        tensors this strategy sends, in this platform's LoRA rank.

        `budget_s`: the round's deadline as seen from here. Past it the driver has already left
        this platform out of the round, so training stops at once (`RoundDeadline`) and the
        platform is free for the next round's model instead of finishing stale work.
        `control`: SCAFFOLD's server control variate c. `base`: base merges to apply first.
        `secagg`: this round's secure-aggregation inputs (the shares addressed to this platform,
        its weight, the ring): the update then leaves only masked (`_masked_upload`).
        `anchor`: {"state": adapter, "mu": μ} — a personalisation round's (μ/2)‖w − anchor‖²
        toward that fixed adapter (the federated model), in place of the strategy's own term.
        """
        from fl_llm.client.train import RoundDeadline, scheduled_lr

        t0 = time.perf_counter()
        self.staged, self.staged_round = {}, round_
        joins = not secagg or self.party.joins(secagg.get("sample_rate", 1.0), round_, attempt)
        if self.group is not None:  # rank 0's coin (a secure one differs per process)
            joins = self.group.from_rank0(joins)
        if not joins:  # rank 0 alone speaks for the platform in secure aggregation
            if self.worker > 0:
                return {"num_examples": len(self.train_set), "metrics": {}, "bytes": 0}
            return self._release(self._sits_out(global_state, round_, secagg), round_, "train")
        deadline = None if budget_s is None else time.monotonic() + budget_s
        late = None
        try:
            faults.delay_before_training(self.cfg.faults, self.id, round_, deadline, RoundDeadline)
        except RoundDeadline as e:
            late = e
        if self.group is not None and deadline is not None and self.group.any(late is not None):
            raise late or RoundDeadline(f"round {round_}: another worker passed the deadline")  # all stop
        if late is not None:
            raise late
        start = self._load_global(global_state, base)
        c = self.cfg.client
        lr = scheduled_lr(c.lr, c.lr_schedule, round_, self.cfg.server.rounds)
        scaffold = self.strategy.local_term == "scaffold"
        c_i = (self.persistent.get("c") or {k: np.zeros_like(v) for k, v in start.items()}) if scaffold else None
        correction = {k: control[k] - c_i[k] for k in c_i} if scaffold and control is not None else None
        if anchor is not None:
            from fl_llm.strategies.lora import to_rank

            alpha = self.cfg.model.lora.alpha
            anchor = {"state": to_rank(anchor["state"], self.rank, alpha, self.global_rank), "mu": anchor["mu"]}
        metrics = self._local_steps(round_, attempt, lr, deadline, correction, anchor)
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
        if self.group is not None:  # each worker's own figures; the platform's peak is the largest
            metrics["workers"] = self.group.gather(worker_figures(metrics, self.device, time.perf_counter() - t0))
            metrics["peak_memory_bytes"] = max(w["peak_memory_bytes"] for w in metrics["workers"])
            metrics.pop("worker_tokens")
        if self.worker > 0:  # rank 0 alone sends the platform's update
            return {"num_examples": len(self.train_set), "metrics": metrics, "bytes": 0}
        result.update(self.party.masked_upload(update, round_, secagg) if secagg else self._upload(update, round_))
        result["bytes"] += sum(state_nbytes(v) for v in result.get("extra", {}).values())
        metrics["train_seconds"] = time.perf_counter() - t0
        metrics["worker"] = "{}:{}".format(*this_process())  # platforms on one host share it
        return self._release(result, round_, "train")

    def _local_steps(
        self, round_: int, attempt: int, lr: float, deadline: float | None, correction, anchor: dict | None = None
    ) -> dict:
        """This round's `client.local_steps` optimizer steps on the model as loaded (DP-SGD under
        record-level DP; SCAFFOLD's `correction` c − cᵢ added to each gradient; `anchor`'s
        proximal term, else FedProx's); its metrics."""
        import torch

        from fl_llm.client.train import DpSgd, local_train, scheduled_lr

        c = self.cfg.client
        dp, batch_rng = None, platform_rng(self.cfg.seed, round_, self.id)
        if self.cfg.privacy.dp.level == "record":
            # DP's noise and Poisson sampling must be secret to whoever sees the update: a ChaCha20
            # keystream keyed from the OS unless a reproducible run is asked for (secure_rng=false)
            from fl_llm.privacy.csprng import dp_generator

            secure = self.cfg.privacy.dp.secure_rng
            batch_rng = dp_generator(secure, [self.cfg.seed, round_, self.id % 2**32, 4])
            seed = int(platform_rng(self.cfg.seed, round_, self.id, 2).integers(2**62))
            dp = DpSgd(self.cfg.privacy.dp.clip_norm, self.dp_noise, self.dp_sample_rate, seed, secure)
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
                on_step=faults.step_hook(self.cfg.faults, self.id, round_, attempt, self.hard_exit, self.worker),
                prox_mu=anchor["mu"] if anchor else self.cfg.strategy.mu if self.strategy.local_term == "prox" else 0.0,
                anchor=anchor["state"] if anchor else None,
                correction=correction,
                dp=dp,
                pack_length=c.pack_length,
                autocast=self.cfg.model.dtype == "bfloat16",
                words=self.loss_words,
                head_lr=None
                if c.head_lr is None
                else scheduled_lr(c.head_lr, c.lr_schedule, round_, self.cfg.server.rounds),
                warmup=((max(round_, 1) - 1) * c.local_steps, c.warmup_steps),
                group=self.group,
            )
        moments = metrics.pop("optimizer_state", None)
        if moments is not None and dp is not None:  # computed from noised gradients only: DP covers them
            self.staged["adambc"] = moments
        return metrics

    def _upload(self, update: AdapterState, round_: int) -> dict:
        """The update as sent: float32 (`update`), or compressed (`payload`, compression.name;
        top-k's error-feedback residual stays here, in the checkpointed state)."""
        from fl_llm.compression import compress, payload_nbytes

        codec = self.cfg.compression.name
        if codec == "none":
            return {"update": update, "bytes": state_nbytes(update)}
        rng, fraction = platform_rng(self.cfg.seed, round_, self.id, 3), self.cfg.compression.topk_fraction
        payload, residual = compress(update, codec, rng, self.persistent.get("residual"), fraction)
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

    def save_personal(self, root: str, base_name: str) -> str:
        """FedSA: write this platform's own model (shared A, its own B) as a PEFT adapter under
        root/<name>/, from this process — the B never leaves the platform. Returns the path."""
        from pathlib import Path

        from fl_llm.model.adapters import save_adapter

        path = Path(root) / safe_name(self.name)  # a name from the data never leaves root
        path.parent.mkdir(parents=True, exist_ok=True)
        self._activate()
        state = get_adapter_state(self.model)  # gathered on every worker when sharded
        if self.worker == 0:
            save_adapter(state, self.cfg.model, path, base_name, rank=self.rank)
        return str(path)


def this_process() -> tuple[str, int]:
    """(host name, process id) of the calling process."""
    return socket.gethostname(), os.getpid()
