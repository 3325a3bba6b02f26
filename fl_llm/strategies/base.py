"""What every aggregation strategy is: one object that declares everything about itself.

A strategy never sees Ray, files or clocks. It declares what a platform trains and sends (frozen
parameters, the tensors it uploads, a local loss term, what it keeps to itself between rounds),
how the server combines the updates (a combination rule, then a server optimizer: an
`init`/`update` transform on the pseudo-gradient Δ, as in Optax), any correction after that step
(a base-weight merge, a server control variate) and the configuration it refuses. Its state is a
dict of numpy arrays and numbers, so the checkpoint can carry it. `Strategy` is plain FedAvg;
the others override what they change, each in its own file (see docs/architecture.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from fl_llm.errors import UserError
from fl_llm.tensors import AdapterState

StrategyState = dict[str, Any]


@dataclass(frozen=True)
class ServerOptimizer:
    """A server optimizer as a transform on Δ: `init()` is its empty state (moments start lazily,
    at the shape of the first Δ), `update(x, Δ, state, p, lr)` returns the new global adapter and
    state; `p` is the strategy.* config it reads its hyper-parameters from."""

    name: str
    params: tuple[str, ...]  # the strategy.* keys it reads
    default_lr: float
    update: Callable[..., tuple[AdapterState, StrategyState]]

    def init(self) -> StrategyState:
        return {}


@dataclass(frozen=True)
class Strategy:
    """A registered strategy. The defaults are FedAvg's: train every adapter tensor, send them
    all, the example-weighted mean (or strategy.robust's rule), the optimizer's step, nothing after."""

    name: str
    paper: str
    summary: str
    optimizer: ServerOptimizer
    params: tuple[str, ...] = ()  # strategy.* keys it reads besides its optimizer's
    robust: str | None = None  # the combination rule it stands for (norm_bound, median, ...)
    local_term: str | None = None  # what local training adds: None | "prox" | "scaffold"

    # --- what a platform trains, sends and keeps ----------------------------------------------
    def frozen(self, key: str) -> bool:
        """True for an adapter tensor the platform does not train (FFA: A)."""
        return False

    def personal(self, key: str) -> bool:
        """True for a tensor that never leaves its platform and is kept there between rounds."""
        return False

    def upload_keys(self, keys) -> list[str]:
        """The adapter tensors a platform sends: all but its frozen and personal ones."""
        return [k for k in keys if not self.frozen(k) and not self.personal(k)]

    @property
    def one_global_model(self) -> bool:
        """False when each platform ends with its own model (there is no single product to save)."""
        return True

    # --- how the server combines them ---------------------------------------------------------
    def rule(self, configured: str) -> str:
        """The combination rule in force: the strategy's own, or strategy.robust."""
        return self.robust or configured

    def round_weights(self, weights):
        return weights

    needs_locals = False  # it reads each platform's full adapter, not just the mean (a class attribute)
    merges_into_base = False  # it changes the frozen base weights on every platform

    def correct(self, new: AdapterState, locals_, weights, *, seed: int, round_: int):
        """After the server step: (the new global adapter, base merges for every platform or None)."""
        return new, None

    def end_round(self, state: StrategyState, global_state: AdapterState, extras, num_platforms: int):
        """Server state it advances from what the platforms sent besides their updates."""
        return state

    def needs_individual_updates(self, configured_rule: str) -> bool:
        """True when the driver must see each update in the clear (a robust rule, a merge of the
        factors, a control variate): such a strategy cannot run where only the sum is revealed."""
        return self.rule(configured_rule) != "none" or self.needs_locals

    def shared_host_conflict(self) -> str | None:
        """Why platforms of this strategy cannot share one base model on a host (None: they can)."""
        return None

    def check(self, cfg, cohort: int) -> None:
        """Refuse a configuration this strategy cannot run (a UserError naming the key)."""
        st = cfg.strategy
        if self.robust and st.robust not in ("none", self.robust):
            raise UserError(
                f"config key 'strategy.robust' is {st.robust!r} but strategy.name={self.name} already is the "
                f"{self.robust} rule; use strategy.name=fedavg strategy.robust={st.robust}"
            )

    @property
    def keys(self) -> tuple[str, ...]:
        """Every strategy.* key it reads (listed by `fl-llm strategies`)."""
        robust = ("robust",) if self.robust is None else ()
        return tuple(dict.fromkeys((*self.params, *self.optimizer.params, *robust)))


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
