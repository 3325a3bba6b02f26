"""FLoRA: stack the platforms' LoRA factors, merge the exact sum into the base, start afresh.

Paper: Wang et al., "FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous
Low-Rank Adaptations", NeurIPS 2024.

    B = [B₁ … B_K],  A = [p₁A₁; …; p_KA_K]      so  B·A = Σ pᵢBᵢAᵢ   (exact, any ranks)
    W₀ ← W₀ + s·B·A on every platform; then every platform starts a fresh LoRA (B = 0, A new)

Ranks may differ per platform: stacking needs no common shape. Needs the individual factors
(not under secure aggregation).
"""

from __future__ import annotations

import numpy as np

from fl_llm.strategies.base import normalized
from fl_llm.strategies.fedavg import FEDAVG
from fl_llm.strategies.lora import ExactMerge, a_key, b_key, is_a, is_b, layers
from fl_llm.tensors import AdapterState


def flora_stack(locals_: list[AdapterState], weights) -> dict[str, tuple]:
    """{layer: (B_stack, A_stack)} with B_stack·A_stack = Σ pᵢBᵢAᵢ."""
    p = normalized(weights)
    out = {}
    for layer in layers(locals_[0]):
        ak, bk = a_key(locals_[0], layer), b_key(locals_[0], layer)
        b = np.concatenate([loc[bk] for loc in locals_], axis=1)
        a = np.concatenate([pi * loc[ak] for pi, loc in zip(p, locals_)], axis=0)
        out[layer] = (b.astype(np.float32), a.astype(np.float32))
    return out


def fresh_lora(like: AdapterState, seed: int, round_: int) -> AdapterState:
    """A new LoRA for the next round: B = 0, A ~ U(±1/√k) (peft's Kaiming-uniform init) drawn
    from (seed, round), the same on every platform. Other parameters (a head) are kept."""
    rng = np.random.default_rng([seed, round_, 0xF10A])
    out = {}
    for k, v in sorted(like.items()):
        if is_a(k):
            bound = 1.0 / np.sqrt(v.shape[1])
            out[k] = rng.uniform(-bound, bound, size=v.shape).astype(np.float32)
        elif is_b(k):
            out[k] = np.zeros_like(v)
        else:
            out[k] = v
    return out


class FLoRA(ExactMerge):
    def correct(self, new: AdapterState, locals_, weights, *, seed: int, round_: int):
        return fresh_lora(new, seed, round_), flora_stack(locals_, weights)


STRATEGY = FLoRA(
    "flora",
    "Wang et al., FLoRA, NeurIPS 2024",
    "stack the factors, merge Σpᵢ BᵢAᵢ into the base, fresh LoRA each round: exact, any ranks",
    FEDAVG,
)
