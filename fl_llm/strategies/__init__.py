"""Strategy registry: `strategy.name` picks one. Each strategy is one object, `STRATEGY`, in its
own file named after its paper (`base.Strategy` says what it declares); `step.aggregate_round`
runs a round of whichever is chosen; `fl-llm strategies` lists them with their papers and keys.
Adding one is a file, a line here and its test: docs/architecture.md."""

from importlib import import_module

from fl_llm.strategies.base import Strategy, weighted_mean

_FILES = (
    # server optimizers on the pseudo-gradient Δ
    "fedavg",
    "fedavgm",
    "fedadagrad",
    "fedadam",
    "fedyogi",
    "fedams",
    # client-side corrections
    "fedprox",
    "scaffold",
    # LoRA-aware aggregation
    "fedit",
    "ffa",
    "fedex",
    "flora",
    "fedsa",
    "fedper",
    # robust combination (FedAvg server step; strategy.robust combines them with the others)
    "norm_bound",
    "median",
    "trimmed_mean",
    "krum",
)

STRATEGIES: dict[str, Strategy] = {
    s.name: s for s in (import_module(f"fl_llm.strategies.{file}").STRATEGY for file in _FILES)
}

__all__ = ["STRATEGIES", "Strategy", "weighted_mean"]
