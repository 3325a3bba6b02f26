"""FedAvg arithmetic against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from fl_llm.strategies import weighted_mean
from fl_llm.strategies.fedavg import fedavg_step


def test_weighted_mean_by_example_count():
    u1 = {"a": np.array([1.0, 2.0], np.float32), "b": np.array([[0.0]], np.float32)}
    u2 = {"a": np.array([4.0, -1.0], np.float32), "b": np.array([[3.0]], np.float32)}
    out = weighted_mean([u1, u2], [100, 300])
    # 0.25*[1,2] + 0.75*[4,-1] = [3.25, -0.25]; 0.25*0 + 0.75*3 = 2.25
    np.testing.assert_allclose(out["a"], [3.25, -0.25])
    np.testing.assert_allclose(out["b"], [[2.25]])
    assert out["a"].dtype == np.float32


def test_fedavg_step_with_server_lr():
    x = {"w": np.array([1.0, 1.0, 1.0], np.float32)}
    ups = [{"w": np.array([0.3, 0.0, -0.6], np.float32)}, {"w": np.array([0.0, 0.9, 0.0], np.float32)}]
    new, state = fedavg_step(x, ups, [2, 1], {}, server_lr=1.0)
    # Δ = 2/3*[.3,0,-.6] + 1/3*[0,.9,0] = [.2, .3, -.4]
    np.testing.assert_allclose(new["w"], [1.2, 1.3, 0.6], rtol=1e-6)
    assert state == {}
    half, _ = fedavg_step(x, ups, [2, 1], {}, server_lr=0.5)
    np.testing.assert_allclose(half["w"], [1.1, 1.15, 0.8], rtol=1e-6)


def test_fedavg_of_identical_updates_is_that_update():
    x = {"w": np.zeros(4, np.float32)}
    u = {"w": np.arange(4, dtype=np.float32)}
    new, _ = fedavg_step(x, [u, u, u], [5, 1, 9], {}, server_lr=1.0)
    np.testing.assert_array_equal(new["w"], u["w"])


def test_fedavg_does_not_modify_its_inputs():
    x = {"w": np.ones(3, np.float32)}
    u = {"w": np.full(3, 2.0, np.float32)}
    fedavg_step(x, [u], [1], {}, server_lr=1.0)
    np.testing.assert_array_equal(x["w"], 1.0)
    np.testing.assert_array_equal(u["w"], 2.0)


@pytest.mark.parametrize("weights", [[], [0, 0], [-1, 2]])
def test_bad_weights_are_rejected(weights):
    u = {"w": np.zeros(1, np.float32)}
    with pytest.raises(ValueError):
        weighted_mean([u] * max(len(weights), 1), weights)
