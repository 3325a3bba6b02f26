"""Strategies as pure functions: hand-computed server steps, exact LoRA aggregation, SCAFFOLD on a
toy heterogeneous problem, robust rules against a bad platform, the registry."""

from __future__ import annotations

import numpy as np
import pytest

from fl_llm.config import StrategyConfig, load
from fl_llm.errors import UserError
from fl_llm.strategies import STRATEGIES
from fl_llm.strategies.base import weighted_mean
from fl_llm.strategies.fedadam import fedadam_apply
from fl_llm.strategies.fedavgm import fedavgm_apply
from fl_llm.strategies.fedyogi import fedyogi_apply
from fl_llm.strategies.krum import multi_krum
from fl_llm.strategies.lora import aggregation_error, frob2_of_sum, from_rank, local_states, to_rank
from fl_llm.strategies.median import median
from fl_llm.strategies.norm_bound import norm_bound
from fl_llm.strategies.scaffold import client_control_update, corrected_gradient, server_control_update
from fl_llm.strategies.step import aggregate_round
from fl_llm.strategies.trimmed_mean import trimmed_mean

P = StrategyConfig()


# --- server optimizers against hand-computed steps ---------------------------------------------


def test_fedadam_two_steps_by_hand():
    x = {"w": np.array([1.0, -1.0], np.float32)}
    d1 = {"w": np.array([0.2, -0.4], np.float32)}
    x1, s1 = fedadam_apply(x, d1, {}, lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    m1 = 0.1 * np.array([0.2, -0.4])
    v1 = 0.99 * 1e-6 + 0.01 * np.array([0.04, 0.16])
    np.testing.assert_allclose(x1["w"], [1.0, -1.0] + 0.1 * m1 / (np.sqrt(v1) + 1e-3), rtol=1e-5)
    d2 = {"w": np.array([-0.1, 0.0], np.float32)}
    x2, _ = fedadam_apply(x1, d2, s1, lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    m2 = 0.9 * m1 + 0.1 * np.array([-0.1, 0.0])
    v2 = 0.99 * v1 + 0.01 * np.array([0.01, 0.0])
    np.testing.assert_allclose(x2["w"], x1["w"] + 0.1 * m2 / (np.sqrt(v2) + 1e-3), rtol=1e-5)


def test_fedams_keeps_the_largest_second_moment_by_hand():
    """Two rounds through the registry: the second Δ is 0, so v decays but v̂ keeps round 1's."""
    p = StrategyConfig(name="fedams", server_lr=0.01, beta1=0.9, beta2=0.99, tau=1e-3)
    x = {"w": np.array([1.0, 1.0], np.float32)}
    one = aggregate_round(STRATEGIES["fedams"], p, x, [{"w": np.array([0.1, -0.2], np.float32)}], [1], {},
                          seed=0, round_=1, num_platforms=1)  # fmt: skip
    # m = 0.1·Δ = (0.01, -0.02), v = 0.01·Δ² = (1e-4, 4e-4) = v̂: x + 0.01·m/√v̂ = x ± 0.01
    np.testing.assert_allclose(one.global_state["w"], [1.01, 0.99], rtol=1e-5)
    two = aggregate_round(STRATEGIES["fedams"], p, one.global_state, [{"w": np.zeros(2, np.float32)}], [1],
                          one.state, seed=0, round_=2, num_platforms=1)  # fmt: skip
    # m = 0.9·m = (0.009, -0.018); v̂ stays (1e-4, 4e-4): x + 0.01·(0.9, -0.9) (FedAdam's v would shrink)
    np.testing.assert_allclose(two.global_state["w"], [1.019, 0.981], rtol=1e-5)
    np.testing.assert_allclose(two.state["vhat"]["w"], [1e-4, 4e-4], rtol=1e-5)
    assert STRATEGIES["fedams"].keys == ("server_lr", "beta1", "beta2", "tau", "robust")


def test_fedyogi_two_steps_by_hand():
    x = {"w": np.array([0.0, 0.0], np.float32)}
    d1 = {"w": np.array([0.3, -0.05], np.float32)}
    x1, s1 = fedyogi_apply(x, d1, {}, lr=0.05, beta1=0.9, beta2=0.99, tau=1e-3)
    v0, g2 = 1e-6, np.array([0.09, 0.0025])
    v1 = v0 - 0.01 * g2 * np.sign(v0 - g2)  # v grows where Δ² > v
    m1 = 0.1 * np.array([0.3, -0.05])
    np.testing.assert_allclose(x1["w"], 0.05 * m1 / (np.sqrt(v1) + 1e-3), rtol=1e-5)
    d2 = {"w": np.array([0.0, 0.0], np.float32)}
    x2, s2 = fedyogi_apply(x1, d2, s1, lr=0.05, beta1=0.9, beta2=0.99, tau=1e-3)
    np.testing.assert_allclose(s2["v"]["w"], v1, rtol=1e-5)  # Δ = 0: sign(v - 0) = 1, v unchanged
    np.testing.assert_allclose(x2["w"], x1["w"] + 0.05 * (0.9 * m1) / (np.sqrt(v1) + 1e-3), rtol=1e-5)


def test_fedavgm_accumulates_momentum():
    x = {"w": np.zeros(1, np.float32)}
    d = {"w": np.ones(1, np.float32)}
    x1, s = fedavgm_apply(x, d, {}, lr=1.0, momentum=0.5)
    x2, _ = fedavgm_apply(x1, d, s, lr=1.0, momentum=0.5)
    np.testing.assert_allclose(x2["w"], [1.0 + 1.5])


# --- LoRA: exact strategies reproduce Σ pᵢBᵢAᵢ, FedIT does not ----------------------------------


def _lora_round(k=4, d=12, kk=10, r=3, same_a=False, seed=0):
    rng = np.random.default_rng(seed)
    g = {
        "l.lora_A.weight": rng.normal(size=(r, kk)).astype(np.float32),
        "l.lora_B.weight": np.zeros((d, r), np.float32),
    }
    updates = []
    for _ in range(k):
        u = {"l.lora_B.weight": rng.normal(size=(d, r)).astype(np.float32)}
        u["l.lora_A.weight"] = np.zeros((r, kk), np.float32) if same_a else rng.normal(size=(r, kk)).astype(np.float32)
        updates.append(u)
    return g, updates, [3, 1, 2, 4][:k]


def _target_and_result(name, same_a=False, **kw):
    g, updates, w = _lora_round(same_a=same_a)
    if name == "ffa":
        updates = [{k: v for k, v in u.items() if "lora_B" in k} for u in updates]
    res = aggregate_round(STRATEGIES[name], P, g, updates, w, {}, seed=0, round_=1, num_platforms=4, **kw)
    locals_ = local_states(g, updates)
    p = np.asarray(w, float) / sum(w)
    target = sum(pi * loc["l.lora_B.weight"].astype(np.float64) @ loc["l.lora_A.weight"] for pi, loc in zip(p, locals_))
    got = res.global_state["l.lora_B.weight"].astype(np.float64) @ res.global_state["l.lora_A.weight"]
    if res.merge:
        bm, am = res.merge["l"]
        got = got + bm.astype(np.float64) @ am
    return target, got, res


@pytest.mark.parametrize("name", ["fedex", "flora", "ffa"])
def test_exact_strategies_reproduce_the_average_product(name):
    target, got, res = _target_and_result(name, same_a=name == "ffa")
    assert np.abs(got - target).max() < 1e-5 * max(1.0, np.abs(target).max())
    assert res.metrics["aggregation_error"] < 1e-5


def test_fedit_is_not_exact_and_says_so():
    target, got, res = _target_and_result("fedit")
    err = np.linalg.norm(got - target) / np.linalg.norm(target)
    assert err > 0.1
    assert res.metrics["aggregation_error"] == pytest.approx(err, rel=1e-4)


def test_flora_starts_a_fresh_lora_each_round():
    _, _, res = _target_and_result("flora")
    assert not res.global_state["l.lora_B.weight"].any()
    bound = 1 / np.sqrt(10)
    assert np.abs(res.global_state["l.lora_A.weight"]).max() <= bound


def test_frobenius_norm_without_forming_the_product():
    rng = np.random.default_rng(1)
    bs = [rng.normal(size=(7, 2)) for _ in range(3)]
    as_ = [rng.normal(size=(2, 5)) for _ in range(3)]
    c = [0.5, -1.0, 2.0]
    dense = sum(ci * b @ a for ci, b, a in zip(c, bs, as_))
    assert frob2_of_sum(bs, as_, c) == pytest.approx(np.sum(dense**2), rel=1e-10)


def test_heterogeneous_ranks_round_trip_and_keep_the_product():
    rng = np.random.default_rng(2)
    g = {
        "l.lora_A.weight": rng.normal(size=(8, 6)).astype(np.float32),
        "l.lora_B.weight": rng.normal(size=(5, 8)).astype(np.float32),
    }
    small = to_rank(g, 4, alpha=16, global_rank=8)
    assert small["l.lora_A.weight"].shape == (4, 6) and small["l.lora_B.weight"].shape == (5, 4)
    # the rank-4 model's s₄·B·A equals the global's s₈·B·A restricted to the first 4 components
    s8, s4 = 16 / 8, 16 / 4
    np.testing.assert_allclose(
        s4 * small["l.lora_B.weight"] @ small["l.lora_A.weight"],
        s8 * g["l.lora_B.weight"][:, :4] @ g["l.lora_A.weight"][:4],
        rtol=1e-5,
    )
    back = from_rank(small, 4, alpha=16, global_rank=8)
    np.testing.assert_allclose(back["l.lora_B.weight"][:, :4], g["l.lora_B.weight"][:, :4], rtol=1e-6)
    assert not back["l.lora_A.weight"][4:].any() and not back["l.lora_B.weight"][:, 4:].any()


def test_aggregation_error_is_zero_when_everyone_agrees():
    g, updates, w = _lora_round()
    same = [updates[0]] * 4
    new = {k: g[k] + same[0][k] for k in g}
    assert aggregation_error(g, local_states(g, same), w, new) < 1e-6


# --- SCAFFOLD: a toy heterogeneous quadratic -----------------------------------------------------


def _quadratic_federation(scaffold: bool, rounds=300, steps=10, lr=0.05):
    """fᵢ(w) = ½(w − bᵢ)ᵀHᵢ(w − bᵢ) on 2 platforms with very different curvature: FedAvg with
    several local steps settles away from the global optimum; SCAFFOLD reaches it."""
    hs = [np.diag([4.0, 0.2]), np.diag([0.2, 4.0])]
    bs = [np.array([1.0, 0.0]), np.array([0.0, 1.0])]
    optimum = np.linalg.solve(sum(hs), sum(h @ b for h, b in zip(hs, bs)))
    x = {"w": np.zeros(2, np.float32)}
    c = {"w": np.zeros(2, np.float32)}
    cis = [{"w": np.zeros(2, np.float32)} for _ in hs]
    for _ in range(rounds):
        dys, dcs = [], []
        for i, (h, b) in enumerate(zip(hs, bs)):
            y = x["w"].astype(np.float64).copy()
            for _ in range(steps):
                g = h @ (y - b)
                if scaffold:
                    g = corrected_gradient(g, cis[i]["w"], c["w"])
                y = y - lr * g
            dy = {"w": (y - x["w"]).astype(np.float32)}
            dys.append(dy)
            if scaffold:
                cis[i], dc = client_control_update(cis[i], c, dy, steps, lr)
                dcs.append(dc)
        x = {"w": x["w"] + weighted_mean(dys, [1, 1])["w"]}
        if scaffold:
            c = server_control_update(c, dcs, num_platforms=2)
    return np.linalg.norm(x["w"] - optimum)


def test_scaffold_reaches_the_optimum_where_fedavg_drifts():
    assert _quadratic_federation(scaffold=False) > 0.05
    assert _quadratic_federation(scaffold=True) < 1e-4


# --- robust rules: one bad platform of five ------------------------------------------------------


def _honest_and_bad(kind):
    rng = np.random.default_rng(4)
    honest = [{"w": (np.ones(50) + 0.1 * rng.normal(size=50)).astype(np.float32)} for _ in range(4)]
    if kind == "scale":
        bad = {"w": honest[0]["w"] * 100}
    else:
        bad = {"w": rng.normal(0, 100, size=50).astype(np.float32)}
    return honest, [*honest, bad]


@pytest.mark.parametrize("kind", ["scale", "noise"])
@pytest.mark.parametrize(
    "rule",
    [
        lambda u, w: norm_bound(u, w, clip=np.linalg.norm(np.ones(50)) * 1.2),
        lambda u, w: median(u),
        lambda u, w: trimmed_mean(u, beta=0.2),
        lambda u, w: multi_krum(u, w, f=1)[0],
    ],
    ids=["norm_bound", "median", "trimmed_mean", "krum"],
)
def test_robust_rules_stay_bounded_with_one_bad_update(rule, kind):
    honest, all5 = _honest_and_bad(kind)
    good = weighted_mean(honest, [1] * 4)["w"]
    plain = weighted_mean(all5, [1] * 5)["w"]
    robust = rule(all5, [1] * 5)["w"]
    assert np.linalg.norm(plain - good) > 5 * np.linalg.norm(good)  # the mean is ruined
    assert np.linalg.norm(robust - good) < 0.35 * np.linalg.norm(good)


def test_krum_drops_the_outlier():
    _, all5 = _honest_and_bad("noise")
    _, kept = multi_krum(all5, [1] * 5, f=1)
    assert 4 not in kept and len(kept) == 4
    _, one = multi_krum(all5, [1] * 5, f=1, select=1)
    assert len(one) == 1 and one[0] != 4


# --- registry and config --------------------------------------------------------------------------


def test_registry_lists_every_family_with_papers():
    expected = {
        "fedavg", "fedavgm", "fedadagrad", "fedadam", "fedyogi", "fedprox", "scaffold",
        "fedit", "ffa", "fedex", "flora", "fedsa", "norm_bound", "median", "trimmed_mean", "krum",
    }  # fmt: skip
    assert expected <= set(STRATEGIES)
    assert all(s.paper and s.summary for s in STRATEGIES.values())
    valid_params = set(StrategyConfig.__dataclass_fields__)
    assert all(set(s.keys) <= valid_params for s in STRATEGIES.values())


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["strategy.name=fedmagic"], "must be one of"),
        (["strategy.name=scaffold"], "client.optimizer=sgd"),
        (["strategy.name=fedex", "strategy.robust=median"], "exact"),
        (["strategy.name=median", "strategy.robust=krum"], "already"),
        (["strategy.name=krum", "data.num_platforms=3"], "needs more than"),
        (["model.lora.ranks=[4, 8]"], "model.lora.ranks"),
    ],
)
def test_bad_strategy_configs_fail_at_load(overrides, words):
    with pytest.raises(UserError, match=words):
        load(None, overrides)


def test_combined_robust_rule_and_server_optimizer_load():
    cfg = load(None, ["strategy.name=fedadam", "strategy.robust=trimmed_mean"])
    assert STRATEGIES[cfg.strategy.name].rule(cfg.strategy.robust) == "trimmed_mean"


def test_aggregation_error_in_the_background_is_the_same_number():
    """The driver computes aggregation_error on a thread while the platforms evaluate: a future
    holding exactly the value computed in line."""
    from concurrent.futures import Future, ThreadPoolExecutor

    g, updates, w = _lora_round()
    inline = aggregate_round(STRATEGIES["fedit"], P, g, updates, w, {}, seed=0, round_=1, num_platforms=4)
    with ThreadPoolExecutor(max_workers=1) as pool:
        deferred = aggregate_round(
            STRATEGIES["fedit"], P, g, updates, w, {}, seed=0, round_=1, num_platforms=4, background=pool
        )
        future = deferred.metrics["aggregation_error"]
        assert isinstance(future, Future)
        assert future.result() == inline.metrics["aggregation_error"] > 0
    for k in g:
        np.testing.assert_array_equal(deferred.global_state[k], inline.global_state[k])
