"""FFA-LoRA: freeze A at its shared random initialisation, train and average only B.

Paper: Sun et al., "Improving LoRA in Privacy-preserving Federated Learning", ICLR 2024.

Every platform starts from the same A (drawn from the run seed) and never changes it, so
Σ pᵢBᵢA = (Σ pᵢBᵢ)·A: averaging B is exact. Only B travels — half the bytes of LoRA — and the
aggregate stays linear (works under secure aggregation and with DP).
"""

from __future__ import annotations

from fl_llm.strategies.lora import is_a


def ffa_upload_keys(keys) -> list[str]:
    """What a platform sends: everything but the frozen A factors."""
    return [k for k in keys if not is_a(k)]
