"""FedProx: each platform minimises its loss plus a proximal term that keeps it near the global.

Paper: Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020.

    platform i minimises  Fᵢ(w) + (μ/2)·‖w − x‖²   over the adapter parameters w
    server: FedAvg

μ = 0 is FedAvg exactly. The term is added to the training loss on the platform
(`client/train.py`); its gradient μ·(w − x) pulls every step back toward the round's global x.
"""

from __future__ import annotations

from fl_llm.strategies.base import Strategy
from fl_llm.strategies.fedavg import FEDAVG


def proximal_term(params, anchors, mu: float):
    """(μ/2)·Σ‖w − x‖² over matching torch tensors (0 when μ = 0)."""
    if mu == 0:
        return 0.0
    return 0.5 * mu * sum(((w - x) ** 2).sum() for w, x in zip(params, anchors))


STRATEGY = Strategy(
    "fedprox",
    "Li et al., Federated Optimization in Heterogeneous Networks, MLSys 2020",
    "platforms add (μ/2)‖w − x‖² to their loss; FedAvg at the server",
    FEDAVG,
    params=("mu",),
    local_term="prox",
)
