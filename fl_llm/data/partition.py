"""Partitioners: which platform each record of a pooled data set belongs to.

For experiments that start from one pooled data set (a public benchmark, the synthetic world) and
must simulate separate companies. Each is a pure function returning an array of platform indices;
every platform's process calls it with the same seed and keeps only its own rows.

- `natural`: by the value of a column (category, region, the company that collected it);
- `iid`: uniformly at random;
- `dirichlet`: label (or category) skew — platform shares of each class drawn from Dir(α)
  (Hsu et al., "Measuring the Effects of Non-Identical Data Distribution", 2019); small α, skewed;
- `size_skew`: platform sizes drawn from Dir(α) (same label mix everywhere, very different sizes).
"""

from __future__ import annotations

import numpy as np

METHODS = ("natural", "iid", "dirichlet", "size_skew")


def natural(values, order: list | None = None) -> tuple[np.ndarray, list]:
    """(platform index per record, the value of each platform), platforms in `order` or sorted."""
    values = np.asarray(values, dtype=object)
    keys = list(order) if order else sorted(set(values.tolist()), key=str)
    index = {v: i for i, v in enumerate(keys)}
    return np.array([index.get(v, -1) for v in values.tolist()], dtype=np.int64), keys


def iid(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(np.arange(n) % k)


def dirichlet_proportions(num_keys: int, k: int, alpha: float, rng: np.random.Generator) -> np.ndarray:
    """(keys x platforms) matrix: row c is how key c's records are shared among platforms."""
    return rng.dirichlet(np.full(k, alpha), size=num_keys)


def assign_by_proportions(keys: np.ndarray, proportions: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each record of key c goes to platform j with probability proportions[c, j]."""
    keys = np.asarray(keys)
    out = np.empty(len(keys), dtype=np.int64)
    for c in range(proportions.shape[0]):
        rows = np.flatnonzero(keys == c)
        out[rows] = rng.choice(proportions.shape[1], size=len(rows), p=proportions[c])
    return out


def dirichlet(
    keys, k: int, alpha: float, rng: np.random.Generator, min_size: int = 1, max_tries: int = 1000
) -> tuple[np.ndarray, np.ndarray]:
    """(platform per record, proportions) with every platform holding at least `min_size` rows.

    Proportions are redrawn until the minimum holds, as is usual for Dirichlet splits; the
    proportions are returned so a held-out split can follow the same skew.
    """
    keys = np.asarray(keys)
    num_keys = int(keys.max()) + 1 if len(keys) else 0
    for _ in range(max_tries):
        p = dirichlet_proportions(num_keys, k, alpha, rng)
        assign = assign_by_proportions(keys, p, rng)
        if np.bincount(assign, minlength=k).min() >= min_size:
            return assign, p
    raise ValueError(f"no Dirichlet({alpha}) split gives every one of {k} platforms {min_size} rows; raise alpha")


def size_skew(n: int, k: int, alpha: float, rng: np.random.Generator, min_size: int = 1) -> np.ndarray:
    """Platform sizes ∝ Dir(α) draws (at least `min_size` each), rows assigned at random."""
    if n < k * min_size:
        raise ValueError(f"{n} rows cannot give {k} platforms {min_size} rows each")
    share = rng.dirichlet(np.full(k, alpha))
    sizes = np.full(k, min_size) + np.floor(share * (n - k * min_size)).astype(int)
    sizes[np.argmax(share)] += n - sizes.sum()
    return rng.permutation(np.repeat(np.arange(k), sizes))
