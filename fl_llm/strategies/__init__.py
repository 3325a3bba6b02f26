"""Strategy registry: `strategy.name` picks one; each lives in its own file, named after its paper."""

from fl_llm.strategies.base import Strategy, weighted_mean
from fl_llm.strategies.fedavg import FEDAVG

STRATEGIES: dict[str, Strategy] = {s.name: s for s in (FEDAVG,)}

__all__ = ["STRATEGIES", "Strategy", "weighted_mean"]
