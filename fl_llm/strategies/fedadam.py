"""FedAdam: Adam as the server optimizer on the pseudo-gradient Δ.

Paper: Reddi et al., "Adaptive Federated Optimization", ICLR 2021 (Algorithm 2).

    m ← β₁·m + (1 − β₁)·Δ
    v ← β₂·v + (1 − β₂)·Δ²
    x ← x + η·m / (√v + τ)
"""

from __future__ import annotations

import numpy as np

from fl_llm.strategies.base import Strategy
from fl_llm.strategies.fedadagrad import adam_like, adaptive_apply, first_moment, initial_v


def fedadam_apply(x, delta, state, *, lr: float, beta1: float, beta2: float, tau: float):
    m = first_moment(state, delta, beta1)
    v = {
        k: (np.float32(beta2) * initial_v(state, k, d, tau) + np.float32(1 - beta2) * d * d).astype(np.float32)
        for k, d in delta.items()
    }
    return adaptive_apply(x, m, v, lr=lr, tau=tau), {**state, "m": m, "v": v}


FEDADAM = adam_like("fedadam", fedadam_apply, 0.01)

STRATEGY = Strategy(
    "fedadam", "Reddi et al., Adaptive Federated Optimization, ICLR 2021", "Adam on Δ at the server", FEDADAM
)
