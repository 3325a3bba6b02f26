"""FFA-LoRA: freeze A at its shared random initialisation, train and average only B.

Paper: Sun et al., "Improving LoRA in Privacy-preserving Federated Learning", ICLR 2024.

Every platform starts from the same A (drawn from the run seed) and never changes it, so
Σ pᵢBᵢA = (Σ pᵢBᵢ)·A: averaging B is exact. Only B travels — half the bytes of LoRA — and the
aggregate stays linear (works under secure aggregation and with DP).
"""

from __future__ import annotations

from fl_llm.strategies.base import Strategy
from fl_llm.strategies.fedavg import FEDAVG
from fl_llm.strategies.lora import is_a


class FFA(Strategy):
    def frozen(self, key: str) -> bool:
        return is_a(key)


STRATEGY = FFA(
    "ffa",
    "Sun et al., Improving LoRA in Privacy-preserving FL (FFA-LoRA), ICLR 2024",
    "A frozen at its shared init, only B trained and averaged: exact, half the bytes",
    FEDAVG,
)
