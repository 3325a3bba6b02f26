"""FedAMS: AMSGrad as the server optimizer — the second moment never shrinks.

Paper: Wang, Lin & Chen, "Communication-Efficient Adaptive Federated Learning", ICML 2022
(Algorithm 2, FedAMS).

    m ← β₁·m + (1 − β₁)·Δ
    v ← β₂·v + (1 − β₂)·Δ²
    v̂ ← max(v̂, v, ε)                        (ε = τ², so the step's denominator is at least τ)
    x ← x + η·m / √v̂

m and v start at 0, v̂ at ε. FedAdam's step grows again when the updates shrink and v decays;
the running maximum keeps the effective rate from rising, which the paper's convergence proof
needs and which damps the late-round overshoot of FedAdam under non-IID data.
"""

from __future__ import annotations

import numpy as np

from fl_llm.strategies.base import Strategy, StrategyState
from fl_llm.strategies.fedadagrad import adam_like, first_moment
from fl_llm.tensors import AdapterState


def fedams_apply(x: AdapterState, delta: AdapterState, state: StrategyState, *, lr, beta1, beta2, tau):
    m = first_moment(state, delta, beta1)
    v_old, vhat_old, eps = state.get("v", {}), state.get("vhat", {}), np.float32(tau) ** 2
    v, vhat = {}, {}
    for k, d in delta.items():
        v[k] = (np.float32(beta2) * v_old.get(k, 0.0) + np.float32(1 - beta2) * d * d).astype(np.float32)
        vhat[k] = np.maximum(np.maximum(vhat_old.get(k, eps), v[k]), eps).astype(np.float32)
    new = {
        k: (val + np.float32(lr) * m[k] / np.sqrt(vhat[k])).astype(np.float32) if k in m else val
        for k, val in x.items()
    }
    return new, {**state, "m": m, "v": v, "vhat": vhat}


FEDAMS = adam_like("fedams", fedams_apply, 0.01)

STRATEGY = Strategy(
    "fedams",
    "Wang, Lin & Chen, Communication-Efficient Adaptive Federated Learning, ICML 2022",
    "AMSGrad on Δ at the server: Adam whose second moment is a running maximum",
    FEDAMS,
)
