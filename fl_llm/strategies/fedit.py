"""FedIT: federated instruction tuning by averaging the LoRA factors A and B separately.

Paper: Zhang et al., "Towards Building the Federated GPT: Federated Instruction Tuning",
ICASSP 2024.

    Ā = Σ pᵢAᵢ,  B̄ = Σ pᵢBᵢ      (FedAvg on the adapter parameters)

Not exact: B̄·Ā differs from the average of the updates Σ pᵢBᵢAᵢ by Σ pᵢ(Bᵢ − B̄)(Aᵢ − Ā), a
covariance term that grows as platforms disagree (logged every round as `aggregation_error`).
It is what `fedavg` computes; the name is kept so LoRA comparisons can say what they compare.
"""

from __future__ import annotations

from fl_llm.strategies.base import Strategy
from fl_llm.strategies.fedavg import FEDAVG

STRATEGY = Strategy(
    "fedit",
    "Zhang et al., Towards Building the Federated GPT, ICASSP 2024",
    "naive: average A and B separately (not exact; the baseline)",
    FEDAVG,
)
