"""Partitioners: sizes, minimums, skew, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from fl_llm.config import load
from fl_llm.data import partition
from fl_llm.data.sources import load_platform_data


def rng(seed=0):
    return np.random.default_rng(seed)


def test_iid_is_balanced_and_covers_everything():
    a = partition.iid(1003, 4, rng())
    assert sorted(np.bincount(a).tolist()) == [250, 251, 251, 251]


def test_natural_follows_column_values_in_order():
    a, keys = partition.natural(["b", "a", "c", "a"])
    assert keys == ["a", "b", "c"] and a.tolist() == [1, 0, 2, 0]
    a, keys = partition.natural(["b", "a", "c"], order=["c", "b"])
    assert a.tolist() == [1, -1, 0]


def test_dirichlet_respects_min_size_and_skews_more_at_small_alpha():
    labels = np.repeat(np.arange(5), 400)
    a, props = partition.dirichlet(labels, 4, 0.3, rng(), min_size=50)
    assert np.bincount(a, minlength=4).min() >= 50
    assert np.allclose(props.sum(1), 1)

    def skew(alpha):
        a, _ = partition.dirichlet(labels, 4, alpha, rng(1))
        mix = np.stack([np.bincount(labels[a == j], minlength=5) / max((a == j).sum(), 1) for j in range(4)])
        return np.abs(mix - 0.2).sum(1).mean()  # distance from the uniform label mix

    assert skew(0.1) > skew(1.0) > skew(100.0)
    assert skew(100.0) < 0.15


def test_dirichlet_is_deterministic_for_a_seed():
    labels = np.repeat(np.arange(3), 100)
    assert (partition.dirichlet(labels, 3, 0.5, rng(7))[0] == partition.dirichlet(labels, 3, 0.5, rng(7))[0]).all()


def test_dirichlet_gives_up_with_a_clear_error():
    with pytest.raises(ValueError, match="raise alpha"):
        partition.dirichlet(np.zeros(10, int), 5, 0.01, rng(), min_size=5, max_tries=5)


def test_size_skew_sizes_and_minimum():
    a = partition.size_skew(1000, 5, 0.5, rng(), min_size=10)
    sizes = np.bincount(a, minlength=5)
    assert sizes.sum() == 1000 and sizes.min() >= 10 and sizes.max() > 3 * sizes.min()


def test_synthetic_repartition_splits_the_pool_without_overlap():
    overrides = [
        "data.num_platforms=3",
        "data.synthetic.train_examples=[100]",
        "data.synthetic.eval_examples=40",
        "data.partition.method=dirichlet",
        "data.partition.by=category",
        "data.partition.min_size=5",
        "data.task=ctr",
    ]
    cfg = load(None, overrides)
    parts = [load_platform_data(cfg, i) for i in range(3)]
    assert sum(len(p.train) for p in parts) == 300 and sum(len(p.eval) for p in parts) == 120
    cats = [{r["category"] for r in p.train} for p in parts]
    assert cats[0] != cats[1]
    keys = [tuple(sorted(r.items())) for p in parts for r in p.train]
    assert len(keys) == len(set(keys))
    again = load_platform_data(load(None, overrides), 1)
    assert again.train == parts[1].train  # every process computes the same split
