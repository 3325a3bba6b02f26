"""One round of aggregation for any registered strategy, composed from its declarations.

    1 combine   the updates into Δ: weighted mean, or a robust rule (strategy.robust / the name)
    2 server    x, state ← optimizer.update(x, Δ, state)   (FedAvg, FedAvgM, FedAdagrad, FedAdam, FedYogi)
    3 correct   the strategy's own step after it (FedEx: fold the residual into the base; FLoRA: merge
                the stack, start a fresh LoRA)
    4 end       server state from what the platforms sent besides updates (SCAFFOLD: c)
    5 measure   aggregation_error = ‖Σ pᵢBᵢAᵢ − (B·A + merged)‖ / ‖Σ pᵢBᵢAᵢ‖

Pure: numpy in, numpy out; the state is a dict of arrays the checkpoint carries.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fl_llm.config import StrategyConfig
from fl_llm.strategies.base import Strategy, StrategyState, weighted_mean
from fl_llm.strategies.krum import multi_krum
from fl_llm.strategies.lora import aggregation_error, local_states
from fl_llm.strategies.median import median
from fl_llm.strategies.norm_bound import norm_bound
from fl_llm.strategies.trimmed_mean import trimmed_mean
from fl_llm.tensors import AdapterState


@dataclass
class RoundResult:
    global_state: AdapterState
    state: StrategyState
    merge: dict[str, tuple[np.ndarray, np.ndarray]] | None = None  # base += s·B·A per layer, on every platform
    metrics: dict = field(default_factory=dict)


def combine(rule: str, updates: list[AdapterState], weights, p: StrategyConfig) -> tuple[AdapterState, dict]:
    """Δ from the updates by `rule`, and what the rule wants reported."""
    if rule == "none":
        return weighted_mean(updates, weights), {}
    if rule == "norm_bound":
        return norm_bound(updates, weights, clip=p.clip_norm), {}
    if rule == "median":
        return median(updates), {}
    if rule == "trimmed_mean":
        return trimmed_mean(updates, beta=p.trim_fraction), {}
    if rule == "krum":
        delta, kept = multi_krum(updates, weights, f=p.krum_byzantine, select=p.krum_select)
        return delta, {"krum_kept": kept}
    raise ValueError(f"unknown combination rule {rule!r}")


def aggregate_round(
    strategy: Strategy,
    p: StrategyConfig,
    global_state: AdapterState,
    updates: list[AdapterState],
    weights,
    state: StrategyState,
    *,
    seed: int,
    round_: int,
    num_platforms: int,
    extras: list[dict] | None = None,
    background=None,
) -> RoundResult:
    """The new global adapter (and state, base merge, metrics) from this round's valid updates.

    `updates` are in the global adapter's shapes and may carry a subset of its keys (FFA sends
    no A, FedSA no B); keys nobody sent stay as they were. `background`: an executor that
    computes the `aggregation_error` metric off the round's critical path (the metric is then a
    future; nothing here mutates the arrays it reads).
    """
    locals_ = local_states(global_state, updates) if strategy.needs_locals else None
    weights = strategy.round_weights(weights)
    metrics: dict = {}

    # 1-2. combine, then the server optimizer's step
    delta, info = combine(strategy.rule(p.robust), updates, weights, p)
    metrics.update(info)
    opt = strategy.optimizer
    lr = p.server_lr if p.server_lr is not None else opt.default_lr
    new, state = opt.update(global_state, delta, dict(state) or opt.init(), p, lr)

    # 3-4. the strategy's own correction, and its server state
    new, merge = strategy.correct(new, locals_, weights, seed=seed, round_=round_)
    state = strategy.end_round(state, global_state, extras, num_platforms)

    # 5. how far the new global is from the exact average of the platforms' adapters
    if strategy.one_global_model:  # FedSA keeps B apart on purpose: there is no single product

        def error() -> float | None:
            return aggregation_error(global_state, locals_ or local_states(global_state, updates), weights, new, merge)

        metrics["aggregation_error"] = background.submit(error) if background is not None else error()
    return RoundResult(new, state, merge, metrics)
