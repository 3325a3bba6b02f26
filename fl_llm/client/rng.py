"""Every random draw on a platform comes from a generator seeded by (seed, round, platform,
purpose) — never the global RNG — so two runs of one config draw the same batches, dropout and
quantization noise, and a resumed run continues as if it never stopped."""

from __future__ import annotations

import numpy as np


def platform_rng(seed: int, round_: int, platform: int, purpose: int = 0) -> np.random.Generator:
    """The generator for one (seed, round, platform) draw; never the global RNG."""
    return np.random.default_rng([seed, round_, platform % 2**32, purpose])  # POOLED is -1
