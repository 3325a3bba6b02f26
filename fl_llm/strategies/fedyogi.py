"""FedYogi: Yogi as the server optimizer — v grows or shrinks additively, never explodes.

Paper: Reddi et al., "Adaptive Federated Optimization", ICLR 2021 (Algorithm 2); Yogi from
Zaheer et al., NeurIPS 2018.

    m ← β₁·m + (1 − β₁)·Δ
    v ← v − (1 − β₂)·Δ²·sign(v − Δ²)
    x ← x + η·m / (√v + τ)
"""

from __future__ import annotations

import numpy as np

from fl_llm.strategies.base import Strategy
from fl_llm.strategies.fedadagrad import adam_like, adaptive_apply, first_moment, initial_v


def fedyogi_apply(x, delta, state, *, lr: float, beta1: float, beta2: float, tau: float):
    m = first_moment(state, delta, beta1)
    v = {}
    for k, d in delta.items():
        v_old, d2 = initial_v(state, k, d, tau), d * d
        v[k] = (v_old - np.float32(1 - beta2) * d2 * np.sign(v_old - d2)).astype(np.float32)
    return adaptive_apply(x, m, v, lr=lr, tau=tau), {**state, "m": m, "v": v}


FEDYOGI = adam_like("fedyogi", fedyogi_apply, 0.01)

STRATEGY = Strategy(
    "fedyogi",
    "Reddi et al., Adaptive Federated Optimization, ICLR 2021",
    "Yogi on Δ at the server (additive second moment)",
    FEDYOGI,
)
