"""FedAvg with a server learning rate.

Paper: McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized
Data", AISTATS 2017; server learning rate as in Reddi et al., "Adaptive Federated Optimization",
ICLR 2021.

    Δ = Σ pᵢ (xᵢ − x),  pᵢ = nᵢ / Σ nⱼ     (example-count weights)
    x ← x + η·Δ                             (η = 1 is plain FedAvg)
"""

from __future__ import annotations

import numpy as np

from fl_llm.strategies.base import AdapterState, Strategy, StrategyState, weighted_mean


def fedavg_step(
    global_state: AdapterState, updates: list[AdapterState], weights, state: StrategyState, *, server_lr: float
) -> tuple[AdapterState, StrategyState]:
    delta = weighted_mean(updates, weights)
    new = {k: (global_state[k] + np.float32(server_lr) * delta[k]).astype(np.float32) for k in global_state}
    return new, state


FEDAVG = Strategy(
    name="fedavg",
    paper="McMahan et al., AISTATS 2017; server lr: Reddi et al., ICLR 2021",
    summary="example-weighted mean of the updates, scaled by strategy.server_lr",
    step=fedavg_step,
)
