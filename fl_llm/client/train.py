"""The local training loop and evaluation of one platform's model. Plain torch, no Ray."""

from __future__ import annotations

import math
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np

from fl_llm.client.parallel import like, unshard_root
from fl_llm.data.batching import IGNORE, Encoded, collate, flatten, pack
from fl_llm.model.adapters import base_of
from fl_llm.model.attention import kernel_bound, segments


def resolve_device(want: str):
    """client.device as a torch device: 'auto' is a GPU when this process has one."""
    import torch

    return torch.device("cuda" if want == "cuda" or (want == "auto" and torch.cuda.is_available()) else "cpu")


def device_problem(cfg, device) -> str | None:
    """Why this platform cannot train as configured on `device` (a user error), or None."""
    import torch

    if cfg.client.device == "cuda" and not torch.cuda.is_available():
        return "client.device=cuda, but this node has no CUDA GPU (use client.device=auto, or run on GPU nodes)"
    if cfg.model.attn_implementation == "flex_attention" and device.type != "cuda":
        return "model.attn_implementation=flex_attention trains only on a CUDA GPU (PyTorch has no CPU backward)"
    return None


def peak_memory(device) -> int:
    """Peak memory of this process: GPU memory allocated on a GPU, else resident RAM (a
    high-water mark that cannot be reset)."""
    import resource

    import torch

    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


class RoundDeadline(TimeoutError):
    """Training passed the round's deadline: the driver has moved on without this update."""


def scheduled_lr(lr: float, schedule: str, round_: int, rounds: int) -> float:
    """The learning rate of round `round_` (1-based) of `rounds`: constant, or cosine from lr down
    to lr/10 (Loshchilov & Hutter, "SGDR", ICLR 2017, without restarts), a function of the round
    only, so every platform and a resumed run agree."""
    if schedule == "constant" or rounds <= 1:
        return lr
    progress = (min(max(round_, 1), rounds) - 1) / (rounds - 1)
    return lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def batch_indices(n: int, batch_size: int, steps: int, rng: np.random.Generator) -> list[np.ndarray]:
    """`steps` batches walking through shuffled epochs of `n` examples (no repeats within one)."""
    out, order, pos = [], rng.permutation(n), 0
    for _ in range(steps):
        take = []
        while len(take) < min(batch_size, n):
            if pos == n:
                order, pos = rng.permutation(n), 0
            k = min(batch_size - len(take), n - pos)
            take.extend(order[pos : pos + k])
            pos += k
        out.append(np.asarray(take))
    return out


@dataclass(frozen=True)
class DpSgd:
    """Record-level DP-SGD settings of one platform's local training."""

    clip: float  # per-example gradient norm bound C
    noise_multiplier: float  # z: noise std = z·C on the summed batch gradient
    sample_rate: float  # q: Poisson probability of each example joining a step's batch
    noise_seed: int  # seeds the noise generator when it is not secure (reproducible experiments)
    secure: bool = False  # noise from a ChaCha20 keystream keyed from the OS (privacy.dp.secure_rng)


def _forward(model, batch: dict, device):
    """(logits, targets) as float32: class logits for a classifier; for a causal LM the logits of
    the last `keep` positions only."""
    import torch

    targets = torch.from_numpy(batch["targets"]).to(device)
    if "rows" in batch:  # packed rows: hidden states, then the vocabulary only where an answer is
        base = base_of(model)
        inputs = {k: torch.from_numpy(batch[k]).to(device) for k in ("input_ids", "position_ids")}
        if "cu_seq_lens" in batch:  # one flat sequence: the bounds for fl_llm.model.attention
            bounds = torch.from_numpy(batch["cu_seq_lens"]).to(device)
            longest = kernel_bound(int(batch["max_length"]))
            inputs.update(cu_seq_lens_q=bounds, cu_seq_lens_k=bounds, max_length_q=longest, max_length_k=longest)
        hidden = base.get_decoder()(**inputs, use_cache=False).last_hidden_state  # a cache disables packing
        rows, cols = (torch.from_numpy(batch[k]).to(device) for k in ("rows", "cols"))
        return base.get_output_embeddings()(hidden[rows, cols]).float(), targets
    if "keep" not in batch:  # sequence classifier
        inputs = {k: torch.from_numpy(batch[k]).to(device) for k in ("input_ids", "attention_mask")}
        return model(**inputs).logits.float(), targets
    inputs = {k: torch.from_numpy(batch[k]).to(device) for k in ("input_ids", "attention_mask", "position_ids")}
    return model(**inputs, logits_to_keep=batch["keep"]).logits.float(), targets


def _configured_attention(model) -> str | None:
    return getattr(base_of(model).config, "_attn_implementation", None)


def _answer_loss(logits, targets, reduction: str, words: list[int] | None = None):
    """Cross-entropy at the answer positions (targets elsewhere are IGNORE). `words`: the answer
    words' first-token ids — the softmax runs over those alone and each target becomes its word's
    index (client.loss=verbalizer; the examples were encoded with their first answer token only).
    reduction='none' keeps the targets' shape."""
    import torch

    if words is not None:
        logits = logits[..., torch.as_tensor(words, device=logits.device)]
        index = torch.full_like(targets, IGNORE)
        for k, token in enumerate(words):
            index[targets == token] = k
        targets = index
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE, reduction=reduction
    )
    return loss.reshape(targets.shape) if reduction == "none" else loss


@dataclass
class LocalTraining:
    """Train the trainable (adapter) parameters for `steps` optimizer steps (`run`: its metrics).

    A fresh optimizer each round: optimizer state is not part of the federated model and would
    go stale while the global adapter moves. Past `deadline` (time.monotonic) it raises
    `RoundDeadline`; `on_step(step)` runs after each step (fault injection hooks in there).
    `prox_mu`: FedProx's (μ/2)‖w − x‖² toward the starting point x — or, given `anchor` (an
    adapter state by key), toward that fixed point instead: Ditto's personal objective (Li et al.,
    2021, "Ditto: Fair and Robust Federated Learning Through Personalization"), the global model
    as x across all of a personalisation's rounds. `correction`: SCAFFOLD's
    c − cᵢ per adapter key, added to every gradient. `dp`: DP-SGD — Poisson-sampled batches,
    per-example gradients (Opacus), clipped and noised; the data-independent terms (proximal,
    correction) are added after the noise, as post-processing. `pack_length`: pack each batch's
    examples into rows of that many tokens (`fl_llm.data.batching.pack`) instead of padding them;
    the same examples, the same loss, fewer wasted positions. Metrics count the useful (non-pad)
    `tokens` and the `slots` (positions computed, padding included). `autocast`: bf16 autocast
    of the forward pass on a GPU (for a bf16 base model). `words`: the verbalizer loss over these
    answer-word token ids (`_answer_loss`); None: the whole vocabulary. `optimizer`: adamw, sgd,
    or dp_adambc (`fl_llm.privacy.dp.AdamBC`: under `dp`, AdamW with the noise's variance taken
    out of its second moment; `adambc_floor` its κ; it starts from `optimizer_state` and returns
    its moments as the metrics' `optimizer_state`, for the caller to keep). `head_lr`: the rate
    of the trainable weights that are not LoRA factors (a classifier's head; None: `lr`).
    `warmup`: (steps taken in earlier rounds, warm-up steps W) — the rate rises linearly over the
    run's first W steps, counted across rounds, so every platform and a resumed run agree.
    `group`: this worker's place among its platform's workers (`fl_llm.client.parallel`): rank 0's
    batches, each worker its share of each, the gradients summed — the step a single worker takes
    on the whole batch; the metrics are the platform's (losses and tokens summed over workers).
    """

    model: Any
    enc: Encoded
    steps: int
    batch_size: int
    lr: float
    weight_decay: float
    max_grad_norm: float
    rng: Any
    device: Any
    pad_id: int
    optimizer: str = "adamw"
    adambc_floor: float = 0.3
    optimizer_state: dict | None = None
    deadline: float | None = None
    on_step: Any = None
    prox_mu: float = 0.0
    anchor: dict | None = None
    correction: dict | None = None
    dp: DpSgd | None = None
    pack_length: int = 0
    autocast: bool = False
    words: list[int] | None = None
    head_lr: float | None = None
    warmup: tuple[int, int] = (0, 0)
    group: Any = None

    def run(self) -> dict:
        import torch

        from fl_llm.model.adapters import state_key

        enc, dp = self.enc, self.dp
        adapter = getattr(self.model, "active_adapter", "default")
        named = [(state_key(n, adapter), p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in named]
        rates = [self.lr if self.head_lr is None or ".lora_" in key else self.head_lr for key, _ in named]
        # one group per distinct rate (usually one: the same optimizer as before head_lr existed)
        group_rates = sorted(set(rates), key=rates.index)
        expected = dp.sample_rate * len(enc) if dp is not None else 0.0  # DP-SGD's expected batch q·N
        opt = self._make_optimizer(rates, group_rates, expected)
        self.anchors = None
        if self.prox_mu and self.anchor is not None:  # laid out as its parameter, as the correction
            self.anchors = [like(p, torch.from_numpy(np.asarray(self.anchor[k], np.float32))) for k, p in named]
        elif self.prox_mu:
            self.anchors = [p.detach().clone() for p in self.params]
        fix = None
        if self.correction is not None:  # laid out as its parameter (sharded under FSDP)
            fix = [like(p, torch.from_numpy(np.asarray(self.correction[k], np.float32))) for k, p in named]
        self.model.train()
        if dp is not None:
            from fl_llm.privacy.dp import poisson_batch

            batches = [poisson_batch(len(enc), dp.sample_rate, self.rng) for _ in range(self.steps)]
            from fl_llm.client.private_step import PrivateGradients

            self.private = PrivateGradients(
                self.model, self.params, dp, expected_batch=expected, words=self.words, group=self.group
            )
        else:
            batches = batch_indices(len(enc), self.batch_size, self.steps, self.rng)
        if self.group is not None:  # drawn once, on rank 0 (a secure DP sampler differs per process)
            batches = self.group.from_rank0(batches)
        losses, dp_stats, tokens, self.slots = [], [], 0, 0
        # packed steps with the default attention: one flat sequence, attention within each example
        self.flat = bool(self.pack_length) and dp is None and _configured_attention(self.model) == "sdpa"
        scope = ExitStack()
        try:
            if self.flat:
                scope.enter_context(segments(self.model))
            for step, idx in enumerate(batches):
                if self.deadline is not None and self._past_deadline():
                    raise RoundDeadline(f"stopped after {step} of {self.steps} steps: past the round's deadline")
                loss = self._gradients(idx, dp_stats)
                if fix is not None:  # SCAFFOLD: y ← y − η(g − cᵢ + c)
                    for p, f in zip(self.params, fix):
                        p.grad.add_(f)
                if self.max_grad_norm > 0 and dp is None:  # under DP the per-example clip bounds the step
                    torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
                _set_rates(opt, group_rates, rates, warmup_factor(self.warmup, step))
                opt.step()
                opt.zero_grad(set_to_none=True)
                if loss is not None:  # a DP step's batch may be empty
                    losses.append(loss)
                tokens += int(sum(len(enc.input_ids[i]) for i in self._share(idx)))
                if self.on_step is not None:
                    self.on_step(step)
        finally:
            scope.close()
            if dp is not None:
                self.private.close()
        return self._metrics(losses, len(batches), tokens, opt, dp_stats)

    def _make_optimizer(self, rates: list[float], group_rates: list[float], expected: float):
        import torch

        groups = [{"params": [p for p, r in zip(self.params, rates) if r == g], "lr": g} for g in group_rates]
        if self.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=self.lr, weight_decay=self.weight_decay)
        if self.optimizer == "dp_adambc":  # σ² of DP-SGD's noise on each coordinate of the mean gradient
            from fl_llm.privacy.dp import AdamBC

            dp = self.dp
            noise_var = (dp.noise_multiplier * dp.clip / expected) ** 2 if dp is not None else 0.0
            return AdamBC(
                self.params,
                lr=rates,
                weight_decay=self.weight_decay,
                noise_var=noise_var,
                floor=self.adambc_floor,
                state=self.optimizer_state,
            )
        return torch.optim.AdamW(groups, lr=self.lr, weight_decay=self.weight_decay)

    def _gradients(self, idx, dp_stats: list) -> float | None:
        """One step's gradients in the parameters' .grad (DP-SGD's clipped and noised ones under
        `dp`; FedProx's term added); the step's mean loss."""
        import torch

        from fl_llm.strategies.fedprox import proximal_term

        if self.dp is not None:
            loss, stats = self.private.step(self.enc, idx, self.pad_id, self.device)
            dp_stats.append(stats)
            self._proximal_gradient()  # no data in it: added after the noise (and the workers' sum)
            return loss
        idx, group = self._share(idx), self.group
        if self.flat:
            batch = flatten(self.enc, idx)
        elif self.pack_length:
            batch = pack(self.enc, idx, self.pad_id, self.pack_length)
        else:
            batch = collate(self.enc, idx, self.pad_id)
        self.slots += batch["input_ids"].size
        device_type = torch.device(self.device).type
        use_autocast = self.autocast and device_type == "cuda"
        # the packed path calls the base's parts, not the base: FSDP's root is gathered by hand
        gathered = unshard_root(self.model) if group is not None and group.sharded and "rows" in batch else None
        with gathered or nullcontext():
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=use_autocast):
                logits, targets = _forward(self.model, batch, self.device)
            if group is None:
                loss = _answer_loss(logits, targets, "mean", self.words)
                objective = loss + proximal_term(self.params, self.anchors, self.prox_mu) if self.prox_mu else loss
                objective.backward()
                return float(loss.detach())
            # one of the platform's workers: its share of the sum over the whole batch's answer tokens
            (count,) = group.total([int((targets != IGNORE).sum())])
            summed = _answer_loss(logits, targets, "sum", self.words)
            (summed / max(count, 1) * group.loss_scale()).backward()
        group.reduce_gradients(self.params)
        self._proximal_gradient()
        (total,) = group.total([float(summed.detach())])
        return total / max(count, 1)

    def _proximal_gradient(self) -> None:
        """FedProx: ∇ (μ/2)‖w − x‖² = μ(w − x) into the gradient, on each worker's own (shard of
        the) weights once the step's gradient is whole."""
        if self.prox_mu:
            for p, a in zip(self.params, self.anchors):
                p.grad.add_(p.detach() - a, alpha=self.prox_mu)

    def _past_deadline(self) -> bool:
        """Past the round's deadline — for a platform's workers, any of them: they stop together."""
        late = time.monotonic() > self.deadline
        return late if self.group is None else self.group.any(late)

    def _share(self, idx: np.ndarray) -> np.ndarray:
        """This worker's part of a step's batch (all of it for a platform of one)."""
        return idx if self.group is None else self.group.shard(idx)

    def _metrics(self, losses: list, steps: int, tokens: int, opt, dp_stats: list) -> dict:
        out = {"train_loss": float(np.mean(losses)) if losses else float("nan"), "steps": steps}
        slots = self.slots or tokens
        if self.group is not None:  # the platform's; this worker's own in worker_tokens
            out["worker_tokens"] = tokens
            tokens, slots = (int(v) for v in self.group.total([tokens, slots]))
        out.update(tokens=tokens, slots=slots)
        if self.optimizer == "dp_adambc":
            out["optimizer_state"] = opt.state()
        if self.dp is not None:
            out["dp_steps"] = steps
            out["dp_mean_batch"] = float(np.mean([s["batch"] for s in dp_stats]))
            out["dp_clipped_fraction"] = float(np.mean([s["clipped"] for s in dp_stats]))
            out["dp_grad_norm"] = float(np.mean([s["grad_norm"] for s in dp_stats if s["batch"]] or [0.0]))
        return out


def local_train(model, enc: Encoded, **settings) -> dict:
    """Train the trainable (adapter) parameters; returns train metrics (settings: `LocalTraining`)."""
    return LocalTraining(model, enc, **settings).run()


def warmup_factor(warmup: tuple[int, int], step: int) -> float:
    """Linear warm-up: the share of the rate at this round's `step` (0-based), given (steps taken
    in earlier rounds, warm-up length W): min(1, (done + step + 1) / W); 1 without warm-up."""
    done, length = warmup
    return 1.0 if length <= 0 else min(1.0, (done + step + 1) / length)


def _set_rates(opt, group_rates: list[float], rates: list[float], factor: float) -> None:
    if hasattr(opt, "param_groups"):
        for group, rate in zip(opt.param_groups, group_rates):
            group["lr"] = rate * factor
    else:  # AdamBC: one rate per parameter
        opt.lr = [rate * factor for rate in rates]
