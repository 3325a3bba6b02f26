"""FedEx-LoRA: average A and B, and fold the averaging error into the frozen weights — exact.

Paper: Singhal et al., "FedEx-LoRA: Exact Aggregation for Federated and Efficient Fine-Tuning
of Foundation Models", ACL 2025.

    Ā = Σ pᵢAᵢ,  B̄ = Σ pᵢBᵢ
    W₀ ← W₀ + s·Σ pᵢ(Bᵢ − B̄)(Aᵢ − Ā)         on every platform
    so that W₀ + s·B̄Ā equals W₀ + s·Σ pᵢBᵢAᵢ exactly.

The residual is sent as factors — B_res = [p₁(B₁ − B̄) … p_K(B_K − B̄)], A_res = [A₁ − Ā; …;
A_K − Ā], rank ≤ K·r — and each platform multiplies them out into its own base weights. It needs
every platform's individual factors, so it cannot run under secure aggregation.
"""

from __future__ import annotations

import numpy as np

from fl_llm.strategies.base import normalized
from fl_llm.strategies.fedavg import FEDAVG
from fl_llm.strategies.lora import ExactMerge, a_key, b_key, layers
from fl_llm.tensors import AdapterState


def fedex_residual(locals_: list[AdapterState], weights, averaged: AdapterState) -> dict[str, tuple]:
    """{layer: (B_res, A_res)} with B_res·A_res = Σ pᵢBᵢAᵢ − B̄Ā (the scale s is applied on merge)."""
    p = normalized(weights)
    out = {}
    for layer in layers(averaged):
        ak, bk = a_key(averaged, layer), b_key(averaged, layer)
        b_res = np.concatenate([pi * (loc[bk] - averaged[bk]) for pi, loc in zip(p, locals_)], axis=1)
        a_res = np.concatenate([loc[ak] - averaged[ak] for loc in locals_], axis=0)
        out[layer] = (b_res.astype(np.float32), a_res.astype(np.float32))
    return out


class FedEx(ExactMerge):
    def correct(self, new: AdapterState, locals_, weights, *, seed: int, round_: int):
        return new, fedex_residual(locals_, weights, new)


STRATEGY = FedEx(
    "fedex",
    "Singhal et al., FedEx-LoRA, ACL 2025",
    "average A and B, fold the residual Σpᵢ(Bᵢ−B̄)(Aᵢ−Ā) into the base weights: exact",
    FEDAVG,
)
