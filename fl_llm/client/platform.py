"""`Platform`: one company in the federation. Owns its data and its model copy; no Ray here.

The driver constructs it with the run config and a platform id — a data *location*, never
records. Everything the platform returns is either adapter tensors (its update) or aggregate
numbers (counts, mean losses, AUC): no record and no per-example output leaves this class.
The Ray backend makes it an actor; the local backend calls the very same class in-process.
"""

from __future__ import annotations

import os
import time

import numpy as np

from fl_llm import faults
from fl_llm.config import RunConfig, from_dict
from fl_llm.model.adapters import AdapterState, get_adapter_state, set_adapter_state, state_nbytes


def platform_rng(seed: int, round_: int, platform: int, purpose: int = 0) -> np.random.Generator:
    """The generator for one (seed, round, platform) draw; never the global RNG."""
    return np.random.default_rng([seed, round_, platform % 2**32, purpose])  # POOLED is -1


class Platform:
    """One platform. `hard_exit`: an injected kill really ends the process (a Ray actor); in the
    driver's own process (the local backend) it raises `InjectedKill` instead."""

    def __init__(self, config: dict, platform_id: int, num_threads: int | None = None, hard_exit: bool = False):
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
        self.hard_exit = hard_exit
        # State this platform keeps between rounds (e.g. a strategy's control variates): saved in
        # the driver's checkpoints through export_state / import_state.
        self.persistent: dict = {}
        self.user_error: str | None = None
        self.task = sources.task_of(self.cfg)
        want = self.cfg.client.device
        use_cuda = want == "cuda" or (want == "auto" and torch.cuda.is_available())
        self.device = torch.device("cuda" if use_cuda else "cpu")

        # Data stays in this process from here on. A problem with it is the user's to fix: keep
        # the message for `describe`, so the driver can stop the run cleanly before it starts.
        try:
            data = sources.load_platform_data(self.cfg, platform_id)
        except UserError as e:
            self.user_error, self.name = str(e), f"platform-{platform_id}"
            return
        self.name = data.name
        kind = self.cfg.model.kind
        base, self.tokenizer = build_base(self.cfg.model, self.cfg.seed, num_labels=len(self.task.verbalizer))
        base.to(self.device)  # before wrapping: adapters are created on the base's device
        self.model = apply_lora(base, self.cfg.model, self.cfg.seed)
        self.pad_id = self.tokenizer.pad_token_id
        self.answer_ids = answer_token_ids(self.task, self.tokenizer) if kind == "causal_lm" else []
        max_len = self.cfg.model.max_length
        self.train_set = encode(data.train, self.task, self.tokenizer, max_len, kind)
        self.eval_set = encode(data.eval, self.task, self.tokenizer, max_len, kind)
        if len(self.train_set) == 0 or len(self.eval_set) == 0:
            self.user_error = (
                f"platform {self.name!r} has {len(self.train_set)} training and {len(self.eval_set)} "
                "held-out rows; it needs both"
            )

    def describe(self) -> dict:
        """Aggregate facts the driver may know: sizes and label balance. Never records."""
        if self.user_error:
            return {"platform": self.id, "name": self.name, "user_error": self.user_error}
        counts = np.bincount(self.train_set.labels, minlength=len(self.task.verbalizer))
        return {
            "platform": self.id,
            "name": self.name,
            "num_train": len(self.train_set),
            "num_eval": len(self.eval_set),
            "label_counts": counts.tolist(),
            "train_positive_rate": float(counts[-1] / max(counts.sum(), 1)),
            "device": str(self.device),
        }

    def initial_adapter(self) -> AdapterState:
        return get_adapter_state(self.model)

    def export_state(self) -> dict:
        return self.persistent

    def import_state(self, state: dict) -> None:
        self.persistent = {k: np.array(v, copy=True) if isinstance(v, np.ndarray) else v for k, v in state.items()}

    def train(self, global_state: AdapterState, round_: int, attempt: int = 0, budget_s: float | None = None) -> dict:
        """Local training from the global adapter; returns the update (local - global).

        `budget_s`: the round's deadline as seen from here. Past it the driver has already left
        this platform out of the round, so training stops at once (`RoundDeadline`) and the
        platform is free for the next round's model instead of finishing stale work.
        """
        from fl_llm.client.train import RoundDeadline, local_train, scheduled_lr

        t0 = time.perf_counter()
        deadline = None if budget_s is None else time.monotonic() + budget_s
        self._before_training(round_, attempt, deadline, RoundDeadline)
        set_adapter_state(self.model, global_state)
        c = self.cfg.client
        import torch

        with torch.random.fork_rng(devices=[]):  # LoRA dropout draws from torch's RNG
            torch.manual_seed(int(platform_rng(self.cfg.seed, round_, self.id, 1).integers(2**31)))
            metrics = local_train(
                self.model,
                self.train_set,
                steps=c.local_steps,
                batch_size=c.batch_size,
                lr=scheduled_lr(c.lr, c.lr_schedule, round_, self.cfg.server.rounds),
                weight_decay=c.weight_decay,
                max_grad_norm=c.max_grad_norm,
                rng=platform_rng(self.cfg.seed, round_, self.id),
                device=self.device,
                pad_id=self.pad_id,
                deadline=deadline,
                on_step=self._fault_hook(round_, attempt),
            )
        local = get_adapter_state(self.model)
        update = {k: local[k] - global_state[k] for k in local}
        kind = faults.corruption(self.cfg.faults, self.id, round_)
        if kind:
            update = faults.corrupt(update, kind)
        metrics["train_seconds"] = time.perf_counter() - t0
        return {
            "update": update,
            "num_examples": len(self.train_set),
            "metrics": metrics,
            "bytes": state_nbytes(update),
        }

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

    def evaluate(self, global_state: AdapterState) -> dict:
        """Loss and task metrics of `global_state` on this platform's held-out split."""
        from fl_llm.client.train import evaluate

        t0 = time.perf_counter()
        set_adapter_state(self.model, global_state)
        out = evaluate(
            self.model,
            self.eval_set,
            answer_ids=self.answer_ids,
            batch_size=self.cfg.client.eval_batch_size,
            device=self.device,
            pad_id=self.pad_id,
        )
        probs = out["probs"]
        scores = probs[:, 1] if probs.shape[1] == 2 else probs
        metrics = self.task.metrics(self.eval_set.labels, scores, self.eval_set.groups)
        result = {k: float(v) for k, v in metrics.items()}
        result["eval_loss"] = out["loss_sum"] / max(out["tokens"], 1)
        result["num_eval"] = len(self.eval_set)
        result["eval_seconds"] = time.perf_counter() - t0
        return result
