"""FedAdagrad: an adaptive server optimizer on the pseudo-gradient Δ.

Paper: Reddi et al., "Adaptive Federated Optimization", ICLR 2021 (Algorithm 2).

    m ← β₁·m + (1 − β₁)·Δ
    v ← v + Δ²
    x ← x + η·m / (√v + τ)

m starts at 0 and v at τ² (the paper asks v₋₁ ≥ τ²); no bias correction, as in the paper.
"""

from __future__ import annotations

import numpy as np

from fl_llm.strategies.base import ServerOptimizer, Strategy, StrategyState
from fl_llm.tensors import AdapterState


def adaptive_apply(x: AdapterState, m: dict, v: dict, *, lr: float, tau: float) -> AdapterState:
    """x + η·m/(√v + τ) on the keys of m: the step FedAdagrad, FedAdam and FedYogi share."""
    return {
        k: (val + np.float32(lr) * m[k] / (np.sqrt(v[k]) + np.float32(tau))).astype(np.float32) if k in m else val
        for k, val in x.items()
    }


def first_moment(state: StrategyState, delta: AdapterState, beta1: float) -> dict:
    m_old = state.get("m", {})
    return {
        k: (np.float32(beta1) * m_old.get(k, 0.0) + np.float32(1 - beta1) * d).astype(np.float32)
        for k, d in delta.items()
    }


def initial_v(state: StrategyState, key: str, like: np.ndarray, tau: float) -> np.ndarray:
    v_old = state.get("v", {})
    return v_old[key] if key in v_old else np.full_like(like, np.float32(tau) ** 2)


def fedadagrad_apply(x, delta, state, *, lr: float, beta1: float, tau: float):
    m = first_moment(state, delta, beta1)
    v = {k: (initial_v(state, k, d, tau) + d * d).astype(np.float32) for k, d in delta.items()}
    return adaptive_apply(x, m, v, lr=lr, tau=tau), {**state, "m": m, "v": v}


FEDADAGRAD = ServerOptimizer(
    "fedadagrad",
    ("server_lr", "beta1", "tau"),
    0.1,
    lambda x, d, s, p, lr: fedadagrad_apply(x, d, s, lr=lr, beta1=p.beta1, tau=p.tau),
)

STRATEGY = Strategy(
    "fedadagrad", "Reddi et al., Adaptive Federated Optimization, ICLR 2021", "Adagrad on Δ at the server", FEDADAGRAD
)


def adam_like(name: str, apply, default_lr: float) -> ServerOptimizer:
    """A server optimizer with FedAdam's hyper-parameters (η, β₁, β₂, τ) around `apply`."""
    return ServerOptimizer(
        name,
        ("server_lr", "beta1", "beta2", "tau"),
        default_lr,
        lambda x, d, s, p, lr: apply(x, d, s, lr=lr, beta1=p.beta1, beta2=p.beta2, tau=p.tau),
    )
