"""Coordinate-wise trimmed mean: drop the β fraction of values at each end, average the rest.

Paper: Yin et al., "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates",
ICML 2018.

    Δ[j] = mean of the sorted Δ₁[j] … Δₙ[j] without the ⌊β·n⌋ smallest and largest

At least one value is dropped at each end whenever n ≥ 3 (β·n < 1 would trim nothing and give
no protection at all), and never so many that nothing is left.
"""

from __future__ import annotations

import numpy as np

from fl_llm.strategies.base import Strategy
from fl_llm.strategies.fedavg import FEDAVG
from fl_llm.tensors import AdapterState, flatten, unflatten


def trim_count(n: int, beta: float) -> int:
    k = int(np.floor(beta * n))
    if n >= 3:
        k = max(k, 1)
    return min(k, (n - 1) // 2)


def trimmed_mean(updates: list[AdapterState], weights=None, *, beta: float) -> AdapterState:
    m, layout = flatten(updates)
    k = trim_count(len(updates), beta)
    ordered = np.sort(m, axis=0)
    return unflatten(ordered[k : len(updates) - k].mean(axis=0), layout)


STRATEGY = Strategy(
    "trimmed_mean",
    "Yin et al., Byzantine-Robust Distributed Learning, ICML 2018",
    "coordinate-wise mean without the β fraction at each end",
    FEDAVG,
    params=("trim_fraction",),
    robust="trimmed_mean",
)
