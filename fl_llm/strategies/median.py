"""Coordinate-wise median of the updates (unweighted).

Paper: Yin et al., "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates",
ICML 2018.

    Δ[j] = median(Δ₁[j], …, Δₙ[j])

Any minority of arbitrarily bad updates moves each coordinate at most to the range of the good
ones. Example counts are ignored: a weight would let a liar claim a large share.
"""

from __future__ import annotations

import numpy as np

from fl_llm.strategies.base import Strategy
from fl_llm.strategies.fedavg import FEDAVG
from fl_llm.tensors import AdapterState, flatten, unflatten


def median(updates: list[AdapterState], weights=None) -> AdapterState:
    m, layout = flatten(updates)
    return unflatten(np.median(m, axis=0), layout)


STRATEGY = Strategy(
    "median",
    "Yin et al., Byzantine-Robust Distributed Learning, ICML 2018",
    "coordinate-wise median of the updates",
    FEDAVG,
    params=(),
    robust="median",
)
