"""DP-SGD's step on a platform: per-example gradients of the trainable weights (Opacus), clipped
and noised (`fl_llm.privacy.dp.private_gradient`) — on a platform of several workers, each clips
its share of the Poisson batch and rank 0 adds the one noise. `LocalTraining` uses it under
record-level DP."""

from __future__ import annotations

import numpy as np

from fl_llm.client.train import DpSgd, _answer_loss, _forward
from fl_llm.data.batching import IGNORE, Encoded, collate


class PrivateGradients:
    """DP-SGD's gradient for each Poisson batch: Opacus computes the per-example gradients of the
    trainable parameters (hooks on the LoRA and head layers); clipping and noise are ours
    (`fl_llm.privacy.dp.private_gradient`). The model must already be on its device (it is: the
    platform moves the base before wrapping it with LoRA) — wrapping first is the known Opacus +
    peft failure that leaves the adapter frozen."""

    def __init__(self, model, params, dp: DpSgd, expected_batch: float, words: list[int] | None = None, group=None):
        import warnings

        import torch
        from opacus import GradSampleModule

        # frozen embeddings mean no input needs a gradient; Opacus's hooks work all the same
        warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)

        self.module = GradSampleModule(model, batch_first=True, loss_reduction="sum", strict=True)
        self.params, self.dp, self.expected, self.words = params, dp, expected_batch, words
        self.group = group  # a platform's workers: each clips its share, rank 0 adds the noise
        if dp.secure:
            from fl_llm.privacy.csprng import ChaChaRandom

            self.generator = ChaChaRandom()
        else:
            self.generator = torch.Generator().manual_seed(dp.noise_seed)

    def step(self, enc: Encoded, idx: np.ndarray, pad_id: int, device) -> tuple[float | None, dict]:
        import torch

        from fl_llm.privacy.dp import private_gradient

        loss, whole = None, len(idx)
        if self.group is not None:
            idx = self.group.shard(idx)
        total, count = 0.0, 0
        if len(idx):
            logits, targets = _forward(self.module, collate(enc, idx, pad_id), device)
            summed = _answer_loss(logits, targets, "sum", self.words)
            summed.backward()
            total, count = float(summed.detach()), int((targets != IGNORE).sum())
            per_example = [p.grad_sample for p in self.params]
        else:
            per_example = [torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device) for p in self.params]
        if self.group is not None:
            total, count = self.group.total([total, count])
        if whole:
            loss = total / max(int(count), 1)
        grads, stats = private_gradient(
            per_example, self.dp.clip, self.dp.noise_multiplier, self.expected, self.generator, self.group
        )
        for p, g in zip(self.params, grads):
            p.grad, p.grad_sample = g, None
        return loss, stats

    def close(self) -> None:
        """Take Opacus's hooks off: evaluation and the next round see the plain model."""
        self.module.remove_hooks()
        for p in self.params:
            p.grad_sample = None
