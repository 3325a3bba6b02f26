"""FedAvg with a server learning rate.

Paper: McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized
Data", AISTATS 2017; server learning rate as in Reddi et al., "Adaptive Federated Optimization",
ICLR 2021.

    Δ = Σ pᵢ (xᵢ − x),  pᵢ = nᵢ / Σ nⱼ     (example-count weights)
    x ← x + η·Δ                             (η = 1 is plain FedAvg)
"""

from __future__ import annotations

import numpy as np

from fl_llm.strategies.base import ServerOptimizer, Strategy, StrategyState, weighted_mean
from fl_llm.tensors import AdapterState


def fedavg_apply(x: AdapterState, delta: AdapterState, state: StrategyState, *, lr: float):
    """x ← x + η·Δ on the keys Δ has; no state."""
    new = {k: (v + np.float32(lr) * delta[k]).astype(np.float32, copy=False) if k in delta else v for k, v in x.items()}
    return new, state


def fedavg_step(
    global_state: AdapterState, updates: list[AdapterState], weights, state: StrategyState, *, server_lr: float
) -> tuple[AdapterState, StrategyState]:
    """The whole FedAvg round: weighted mean of the updates, then the server step."""
    return fedavg_apply(global_state, weighted_mean(updates, weights), state, lr=server_lr)


FEDAVG = ServerOptimizer("fedavg", ("server_lr",), 1.0, lambda x, d, s, p, lr: fedavg_apply(x, d, s, lr=lr))

STRATEGY = Strategy(
    "fedavg",
    "McMahan et al., AISTATS 2017; server lr: Reddi et al., ICLR 2021",
    "example-weighted mean of the updates, x <- x + η·Δ",
    FEDAVG,
)
