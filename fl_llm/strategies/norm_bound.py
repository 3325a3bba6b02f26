"""Norm bounding: scale each update down to L2 norm at most C, then take the weighted mean.

Paper: Sun et al., "Can You Really Backdoor Federated Learning?", 2019.

    Δᵢ ← Δᵢ·min(1, C/‖Δᵢ‖)      Δ = Σ pᵢ Δᵢ

One platform's influence on Δ is then at most pᵢ·C, however large what it sent.
"""

from __future__ import annotations

import numpy as np

from fl_llm.strategies.base import Strategy, normalized
from fl_llm.strategies.fedavg import FEDAVG
from fl_llm.tensors import AdapterState, flatten, unflatten


def norm_bound(updates: list[AdapterState], weights, *, clip: float) -> AdapterState:
    m, layout = flatten(updates)
    norms = np.linalg.norm(m, axis=1)
    scale = np.minimum(1.0, clip / np.maximum(norms, 1e-30))
    return unflatten(normalized(weights) @ (m * scale[:, None]), layout)


STRATEGY = Strategy(
    "norm_bound",
    "Sun et al., Can You Really Backdoor Federated Learning?, 2019",
    "clip each update to norm C, then the weighted mean",
    FEDAVG,
    params=("clip_norm",),
    robust="norm_bound",
)
