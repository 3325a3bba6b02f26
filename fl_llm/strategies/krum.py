"""Krum and Multi-Krum: keep the updates closest to their neighbours, average those.

Paper: Blanchard et al., "Machine Learning with Adversaries: Byzantine Tolerant Gradient
Descent", NeurIPS 2017 (Krum); El Mhamdi et al., "The Hidden Vulnerability of Distributed
Learning in Byzantium", ICML 2018 (Multi-Krum).

    score(i) = Σ over the n − f − 2 nearest others j of ‖Δᵢ − Δⱼ‖²
    Δ = weighted mean of the m updates with the lowest scores   (m = 1: Krum)

Needs n > 2f + 2. With fewer updates (platforms failed this round), f is lowered to the largest
value the rule supports, and the selection is reported.
"""

from __future__ import annotations

import numpy as np

from fl_llm.strategies.base import Strategy, normalized
from fl_llm.strategies.fedavg import FEDAVG
from fl_llm.tensors import AdapterState, flatten, unflatten


def krum_scores(m: np.ndarray, f: int) -> np.ndarray:
    n = len(m)
    sq = np.sum(m * m, axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * (m @ m.T), 0.0)
    neighbours = max(n - f - 2, 1)
    return np.array([np.sort(np.delete(d2[i], i))[:neighbours].sum() for i in range(n)])


def effective_f(n: int, f: int) -> int:
    """The largest f' ≤ f with n > 2f' + 2 (0 when n ≤ 2)."""
    return max(0, min(f, (n - 3) // 2))


def multi_krum(updates: list[AdapterState], weights, *, f: int, select: int = 0) -> tuple[AdapterState, list[int]]:
    """(Δ, indices of the updates it kept). `select` = m; 0 means n − f."""
    n = len(updates)
    mat, layout = flatten(updates)
    f = effective_f(n, f)
    m = select if select > 0 else n - f
    m = min(max(m, 1), n)
    chosen = sorted(np.argsort(krum_scores(mat, f), kind="stable")[:m].tolist()) if n > 2 else list(range(n))
    p = normalized([np.asarray(weights, dtype=np.float64)[i] for i in chosen])
    return unflatten(p @ mat[chosen], layout), chosen


STRATEGY = Strategy(
    "krum",
    "Blanchard et al., NeurIPS 2017 (Krum); El Mhamdi et al., ICML 2018 (Multi-Krum)",
    "average the m updates closest to their n − f − 2 nearest neighbours",
    FEDAVG,
    params=("krum_byzantine", "krum_select"),
    robust="krum",
)
