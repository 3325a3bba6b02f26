"""What every aggregation strategy is: a pure function of the global adapter and the updates.

A strategy never sees Ray, files or clocks. It gets the current global adapter, the platforms'
updates (local - global) with their weights, and its own explicit state (for server optimizers;
empty for FedAvg), and returns the new global adapter and the new state. The state is a dict of
numpy arrays and numbers, so the checkpoint can carry it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from fl_llm.tensors import AdapterState

StrategyState = dict[str, Any]


@dataclass(frozen=True)
class Strategy:
    """A registered strategy: which server optimizer, combination rule, LoRA handling and
    client-side change it uses. The arithmetic lives in the per-paper modules; `step.py` runs them."""

    name: str
    paper: str
    summary: str
    params: tuple[str, ...] = ()  # the strategy.* keys it reads
    server: str = "fedavg"  # fedavg | fedavgm | fedadagrad | fedadam | fedyogi
    robust: str | None = None  # the combination rule it stands for (norm_bound, median, ...)
    lora: str = "naive"  # naive | ffa | fedsa | fedex | flora
    client: str | None = None  # None | prox | scaffold
    default_lr: float = 1.0

    def upload_keys(self, keys) -> list[str]:
        """The adapter tensors a platform sends: FFA keeps its frozen A, FedSA its own B."""
        from fl_llm.strategies.fedsa import fedsa_upload_keys
        from fl_llm.strategies.ffa import ffa_upload_keys

        if self.lora == "ffa":
            return ffa_upload_keys(keys)
        if self.lora == "fedsa":
            return fedsa_upload_keys(keys)
        return list(keys)

    def rule(self, configured: str) -> str:
        """The combination rule in force: the strategy's own, or strategy.robust."""
        return self.robust or configured

    def needs_individual_updates(self, configured_rule: str) -> bool:
        """True when the driver must see each update (robust rules, FedEx, FLoRA): such a strategy
        cannot run where only the sum of the updates is revealed (secure aggregation)."""
        return self.rule(configured_rule) != "none" or self.lora in ("fedex", "flora")


def normalized(weights) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or len(w) == 0 or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {weights!r}")
    return w / w.sum()


def weighted_mean(updates: list[AdapterState], weights) -> AdapterState:
    """Σ pᵢ·Δᵢ with pᵢ = weights normalised to sum to 1, per tensor, in float64 then float32."""
    p = normalized(weights)
    out = {}
    for k in updates[0]:  # one float64 accumulator per tensor, one temporary per update
        acc = np.multiply(updates[0][k], p[0], dtype=np.float64)
        for pi, u in zip(p[1:], updates[1:]):
            acc += np.multiply(u[k], pi, dtype=np.float64)
        out[k] = acc.astype(np.float32)
    return out
