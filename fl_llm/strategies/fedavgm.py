"""FedAvgM: FedAvg with server momentum.

Paper: Hsu, Qi & Brown, "Measuring the Effects of Non-Identical Data Distribution for Federated
Visual Classification", 2019; as written in Reddi et al., ICLR 2021.

    v ← β·v + Δ
    x ← x + η·v
"""

from __future__ import annotations

import numpy as np

from fl_llm.strategies.base import ServerOptimizer, Strategy, StrategyState
from fl_llm.tensors import AdapterState


def fedavgm_apply(x: AdapterState, delta: AdapterState, state: StrategyState, *, lr: float, momentum: float):
    v_old = state.get("v", {})
    v = {k: (np.float32(momentum) * v_old.get(k, 0.0) + d).astype(np.float32) for k, d in delta.items()}
    new = {k: (val + np.float32(lr) * v[k]).astype(np.float32) if k in v else val for k, val in x.items()}
    return new, {**state, "v": v}


FEDAVGM = ServerOptimizer(
    "fedavgm", ("server_lr", "momentum"), 1.0, lambda x, d, s, p, lr: fedavgm_apply(x, d, s, lr=lr, momentum=p.momentum)
)

STRATEGY = Strategy(
    "fedavgm", "Hsu et al., 2019 (arXiv:1909.06335)", "FedAvg with server momentum: v <- βv + Δ, x <- x + η·v", FEDAVGM
)
