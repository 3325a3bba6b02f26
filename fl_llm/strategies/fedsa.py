"""FedSA-LoRA: share A, keep B on each platform — personalised models.

Paper: Guo et al., "Selective Aggregation for Low-Rank Adaptation in Federated Learning",
ICLR 2025.

A learns what is general across platforms and is averaged; B learns what is specific to each and
never leaves its platform. Each platform is evaluated with the shared A and its own B, and saves
its own personalised adapter. Linear in what it aggregates.
"""

from __future__ import annotations

from fl_llm.strategies.base import Strategy
from fl_llm.strategies.fedavg import FEDAVG
from fl_llm.strategies.lora import is_b


class FedSA(Strategy):
    def personal(self, key: str) -> bool:
        """Each platform's own B factors."""
        return is_b(key)

    @property
    def one_global_model(self) -> bool:
        return False  # each platform saves its own adapter: the shared A, its own B


STRATEGY = FedSA(
    "fedsa",
    "Guo et al., Selective Aggregation for LoRA in FL (FedSA-LoRA), ICLR 2025",
    "A averaged, B kept on each platform: personalised models",
    FEDAVG,
)
