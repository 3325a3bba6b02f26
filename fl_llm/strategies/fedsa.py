"""FedSA-LoRA: share A, keep B on each platform — personalised models.

Paper: Guo et al., "Selective Aggregation for Low-Rank Adaptation in Federated Learning",
ICLR 2025.

A learns what is general across platforms and is averaged; B learns what is specific to each and
never leaves its platform. Each platform is evaluated with the shared A and its own B, and saves
its own personalised adapter. Linear in what it aggregates.
"""

from __future__ import annotations

from fl_llm.strategies.lora import is_b


def fedsa_upload_keys(keys) -> list[str]:
    """What a platform sends: everything but its own B factors."""
    return [k for k in keys if not is_b(k)]
