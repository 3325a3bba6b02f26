"""The local training loop and evaluation of one platform's model. Plain torch, no Ray."""

from __future__ import annotations

import math
import time
from contextlib import ExitStack
from dataclasses import dataclass

import numpy as np

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


def local_train(
    model,
    enc: Encoded,
    *,
    steps,
    batch_size,
    lr,
    weight_decay,
    max_grad_norm,
    rng,
    device,
    pad_id,
    optimizer: str = "adamw",
    adambc_floor: float = 0.3,
    optimizer_state: dict | None = None,
    deadline: float | None = None,
    on_step=None,
    prox_mu: float = 0.0,
    correction: dict | None = None,
    dp: DpSgd | None = None,
    pack_length: int = 0,
    autocast: bool = False,
    words: list[int] | None = None,
    head_lr: float | None = None,
    warmup: tuple[int, int] = (0, 0),
) -> dict:
    """Train the trainable (adapter) parameters for `steps` optimizer steps; returns train metrics.

    A fresh optimizer each round: optimizer state is not part of the federated model and would
    go stale while the global adapter moves. Past `deadline` (time.monotonic) it raises
    `RoundDeadline`; `on_step(step)` runs after each step (fault injection hooks in there).
    `prox_mu`: FedProx's (μ/2)‖w − x‖² toward the starting point x. `correction`: SCAFFOLD's
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
    """
    import torch

    from fl_llm.model.adapters import state_key
    from fl_llm.strategies.fedprox import proximal_term

    adapter = getattr(model, "active_adapter", "default")
    named = [(state_key(n, adapter), p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    rates = [lr if head_lr is None or ".lora_" in key else head_lr for key, _ in named]
    # one group per distinct rate (usually one: the same optimizer as before head_lr existed)
    group_rates = sorted(set(rates), key=rates.index)
    expected = dp.sample_rate * len(enc) if dp is not None else 0.0  # DP-SGD's expected batch q·N
    groups = [{"params": [p for p, r in zip(params, rates) if r == g], "lr": g} for g in group_rates]
    if optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=lr, weight_decay=weight_decay)
    elif optimizer == "dp_adambc":  # σ² of DP-SGD's noise on each coordinate of the mean gradient
        from fl_llm.privacy.dp import AdamBC

        noise_var = (dp.noise_multiplier * dp.clip / expected) ** 2 if dp is not None else 0.0
        opt = AdamBC(
            params,
            lr=rates,
            weight_decay=weight_decay,
            noise_var=noise_var,
            floor=adambc_floor,
            state=optimizer_state,
        )
    else:
        opt = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    anchors = [p.detach().clone() for p in params] if prox_mu else None
    fix = None
    if correction is not None:
        fix = [torch.from_numpy(np.asarray(correction[k], np.float32)).to(p.device, p.dtype) for k, p in named]
    model.train()
    if dp is not None:
        from fl_llm.privacy.dp import poisson_batch

        batches = [poisson_batch(len(enc), dp.sample_rate, rng) for _ in range(steps)]
        private = _PrivateGradients(model, params, dp, expected_batch=expected, words=words)
    else:
        batches = batch_indices(len(enc), batch_size, steps, rng)
    losses, dp_stats = [], []
    tokens, slots = 0, 0
    use_autocast = autocast and torch.device(device).type == "cuda"
    # packed steps with the default attention: one flat sequence, attention within each example
    flat = bool(pack_length) and dp is None and _configured_attention(model) == "sdpa"
    scope = ExitStack()
    try:
        if flat:
            scope.enter_context(segments(model))
        for step, idx in enumerate(batches):
            if deadline is not None and time.monotonic() > deadline:
                raise RoundDeadline(f"stopped after {step} of {steps} steps: past the round's deadline")
            if dp is not None:
                loss, stats = private.step(enc, idx, pad_id, device)
                dp_stats.append(stats)
                if prox_mu:  # ∇ (μ/2)‖w − x‖² = μ(w − x): no data in it
                    for p, a in zip(params, anchors):
                        p.grad.add_(p.detach() - a, alpha=prox_mu)
            else:
                if flat:
                    batch = flatten(enc, idx)
                elif pack_length:
                    batch = pack(enc, idx, pad_id, pack_length)
                else:
                    batch = collate(enc, idx, pad_id)
                slots += batch["input_ids"].size
                with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=use_autocast):
                    logits, targets = _forward(model, batch, device)
                loss = _answer_loss(logits, targets, "mean", words)
                objective = loss + proximal_term(params, anchors, prox_mu) if prox_mu else loss
                objective.backward()
                loss = float(loss.detach())
            if fix is not None:  # SCAFFOLD: y ← y − η(g − cᵢ + c)
                for p, f in zip(params, fix):
                    p.grad.add_(f)
            if max_grad_norm > 0 and dp is None:  # under DP the per-example clip bounds the step
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            _set_rates(opt, group_rates, rates, warmup_factor(warmup, step))
            opt.step()
            opt.zero_grad(set_to_none=True)
            if loss is not None:  # a DP step's batch may be empty
                losses.append(loss)
            tokens += int(sum(len(enc.input_ids[i]) for i in idx))
            if on_step is not None:
                on_step(step)
    finally:
        scope.close()
        if dp is not None:
            private.close()
    out = {"train_loss": float(np.mean(losses)) if losses else float("nan"), "steps": len(batches)}
    out.update(tokens=tokens, slots=slots or tokens)
    if optimizer == "dp_adambc":
        out["optimizer_state"] = opt.state()
    if dp is not None:
        out["dp_steps"] = len(batches)
        out["dp_mean_batch"] = float(np.mean([s["batch"] for s in dp_stats]))
        out["dp_clipped_fraction"] = float(np.mean([s["clipped"] for s in dp_stats]))
        out["dp_grad_norm"] = float(np.mean([s["grad_norm"] for s in dp_stats if s["batch"]] or [0.0]))
    return out


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


class _PrivateGradients:
    """DP-SGD's gradient for each Poisson batch: Opacus computes the per-example gradients of the
    trainable parameters (hooks on the LoRA and head layers); clipping and noise are ours
    (`fl_llm.privacy.dp.private_gradient`). The model must already be on its device (it is: the
    platform moves the base before wrapping it with LoRA) — wrapping first is the known Opacus +
    peft failure that leaves the adapter frozen."""

    def __init__(self, model, params, dp: DpSgd, expected_batch: float, words: list[int] | None = None):
        import warnings

        import torch
        from opacus import GradSampleModule

        # frozen embeddings mean no input needs a gradient; Opacus's hooks work all the same
        warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)

        self.module = GradSampleModule(model, batch_first=True, loss_reduction="sum", strict=True)
        self.params, self.dp, self.expected, self.words = params, dp, expected_batch, words
        if dp.secure:
            from fl_llm.privacy.csprng import ChaChaRandom

            self.generator = ChaChaRandom()
        else:
            self.generator = torch.Generator().manual_seed(dp.noise_seed)

    def step(self, enc: Encoded, idx: np.ndarray, pad_id: int, device) -> tuple[float | None, dict]:
        import torch

        from fl_llm.privacy.dp import private_gradient

        loss = None
        if len(idx):
            logits, targets = _forward(self.module, collate(enc, idx, pad_id), device)
            total = _answer_loss(logits, targets, "sum", self.words)
            total.backward()
            loss = float(total.detach()) / max(int((targets != IGNORE).sum()), 1)
            per_example = [p.grad_sample for p in self.params]
        else:
            per_example = [torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device) for p in self.params]
        grads, stats = private_gradient(
            per_example, self.dp.clip, self.dp.noise_multiplier, self.expected, self.generator
        )
        for p, g in zip(self.params, grads):
            p.grad, p.grad_sample = g, None
        return loss, stats

    def close(self) -> None:
        """Take Opacus's hooks off: evaluation and the next round see the plain model."""
        self.module.remove_hooks()
        for p in self.params:
            p.grad_sample = None


def evaluate(
    model, enc: Encoded, *, answer_ids: list[int], batch_size: int, device, pad_id, words: list[int] | None = None
) -> dict:
    """Answer-token loss (over `words` alone when given, as in training) and the probability of
    each answer at the end of the prompt.

    Returns `loss_sum`, `tokens` and `probs` (examples x answers, normalised over the answers).
    """
    import torch

    model.eval()
    loss_sum, tokens, probs = 0.0, 0, []
    with torch.inference_mode():
        for start in range(0, len(enc), batch_size):
            idx = np.arange(start, min(start + batch_size, len(enc)))
            batch = collate(enc, idx, pad_id)
            logits, targets = _forward(model, batch, device)
            loss_sum += float(_answer_loss(logits, targets, "sum", words))
            tokens += int((targets != IGNORE).sum())
            if "keep" in batch:
                rows = torch.arange(len(idx), device=logits.device)
                pos = torch.from_numpy(batch["score_idx"]).to(logits.device)
                answer_logits = logits[rows, pos][:, answer_ids]
            else:
                answer_logits = logits
            probs.append(torch.softmax(answer_logits, dim=-1).cpu().numpy())
    return {"loss_sum": loss_sum, "tokens": tokens, "probs": np.concatenate(probs)}


def example_losses(
    model, enc: Encoded, idx: np.ndarray, *, batch_size: int, device, pad_id, words: list[int] | None = None
) -> np.ndarray:
    """Mean answer-token NLL of each example in `idx` (the membership audit's raw material), with
    the loss the run trained on (`words`: the verbalizer loss)."""
    import torch

    model.eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(idx), batch_size):
            rows = idx[start : start + batch_size]
            logits, targets = _forward(model, collate(enc, rows, pad_id), device)
            nll = _answer_loss(logits, targets, "none", words)
            counts = (targets != IGNORE).sum(-1).clamp(min=1) if targets.dim() > 1 else 1
            out.append((nll.sum(-1) / counts if targets.dim() > 1 else nll).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)
