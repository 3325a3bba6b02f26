"""What every aggregation strategy is: a pure function of the global adapter and the updates.

A strategy never sees Ray, files or clocks. It gets the current global adapter, the platforms'
updates (local - global) with their weights, and its own explicit state (for server optimizers;
empty for FedAvg), and returns the new global adapter and the new state. The state is a dict of
numpy arrays and numbers, so the checkpoint can carry it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

AdapterState = dict[str, np.ndarray]
StrategyState = dict[str, Any]


@dataclass(frozen=True)
class Strategy:
    name: str
    paper: str
    summary: str
    step: Callable[..., tuple[AdapterState, StrategyState]]


def normalized(weights) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or len(w) == 0 or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {weights!r}")
    return w / w.sum()


def weighted_mean(updates: list[AdapterState], weights) -> AdapterState:
    """Σ pᵢ·Δᵢ with pᵢ = weights normalised to sum to 1, per tensor, in float64 then float32."""
    p = normalized(weights)
    return {k: sum(pi * u[k].astype(np.float64) for pi, u in zip(p, updates)).astype(np.float32) for k in updates[0]}
