"""The privacy claims fl_llm prints, checked against first principles: client-level ε recomputed
with dp-accounting from the noise the run actually drew; every vector a platform sends under
client-level DP within C; exactly the documented keys reaching the driver in each DP mode; the
DP randomness from a cryptographic generator; per-platform state and per-record outputs kept on
the platform. The runs use the in-process backend (the code is the same on Ray)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from fl_llm import checkpoint
from fl_llm.config import load
from fl_llm.server import loop
from fl_llm.tracking import read_metrics
from tests.conftest import REPO, SMALL

FAST = [*SMALL, "backend=local", "client.local_steps=3", "data.synthetic.eval_examples=40"]
MODES = {
    "record": ["privacy.dp.level=record", "privacy.target_epsilon=8"],
    "record+secagg": ["privacy.dp.level=record", "privacy.target_epsilon=8", "privacy.secagg.enabled=true"],
    "client": ["privacy.dp.level=client", "privacy.dp.noise_multiplier=0.5"],
    "client+secagg": ["privacy.dp.level=client", "privacy.dp.noise_multiplier=0.5", "privacy.secagg.enabled=true"],
}


# client-level DP, each of 4 platforms joining a round with q = 2/4, reproducible noise
SAMPLED_2_OF_4 = [
    *FAST,
    "data.num_platforms=4",
    "data.synthetic.train_examples=[60]",
    "server.platforms_per_round=2",
    "privacy.dp.level=client",
    "privacy.dp.noise_multiplier=1",
    "privacy.dp.secure_rng=false",
]


def _pld_epsilon(events, delta: float = 1e-5) -> float:
    """ε(δ) of the composition of (dp-accounting event, count) pairs, fine PLD grid."""
    import dp_accounting as dpa
    from dp_accounting import pld

    acc = pld.PLDAccountant(value_discretization_interval=1e-4)
    for event, count in events:
        acc.compose(dpa.SelfComposedDpEvent(event, count))
    return acc.get_epsilon(delta)


# --- what reaches the driver ---------------------------------------------------------------


def _keys(tree, prefix: str = "") -> set[str]:
    return set(tree) if isinstance(tree, dict) else set()


def collect_released(mode: str, out: Path, monkeypatch=None) -> dict[str, set[str]]:
    """Run `mode` and gather every key that reached the driver: the platforms' answers (as the
    backend returned them), metrics.jsonl, summary.json, the checkpoint and the trackers."""
    from fl_llm.server import backends
    from fl_llm.trackers import round_scalars

    seen: dict[str, set[str]] = {}
    original = backends.LocalBackend.call_each

    def spy(self, args_by_id, method, *, timeout_s):
        got = original(self, args_by_id, method, timeout_s=timeout_s)
        method = method.__name__
        for answer in got.results.values():
            if method in ("describe", "train", "evaluate") and isinstance(answer, dict):
                seen.setdefault(f"{method} answer", set()).update(answer)
                if method == "train":
                    seen.setdefault("train metrics", set()).update(answer["metrics"])
        return got

    backends.LocalBackend.call_each = spy
    try:
        loop.run(load(None, [*FAST, "checkpoint.every=1", *MODES[mode]]), Path(out))
    finally:
        backends.LocalBackend.call_each = original
    rows = read_metrics(out)
    seen["metrics.jsonl round"] = set().union(*(r.keys() for r in rows))
    seen["metrics.jsonl platform"] = set().union(*(p.keys() for r in rows for p in r["platforms"].values()))
    if any("secagg" in r for r in rows):
        seen["metrics.jsonl secagg"] = set().union(*(r["secagg"].keys() for r in rows if "secagg" in r))
    summary = json.loads((Path(out) / "summary.json").read_text())
    seen["summary.json"] = set(summary)
    seen["summary.json platforms"] = set().union(*(p.keys() for p in summary["platforms"]))
    seen["platforms.json"] = set().union(*(p.keys() for p in json.loads((Path(out) / "platforms.json").read_text())))
    _, state = checkpoint.load(checkpoint.latest(Path(out) / "checkpoints"))
    seen["checkpoint"] = set(state)
    tracked = set().union(*(round_scalars(r, "auc").keys() for r in rows))
    seen["trackers"] = {k.rsplit("/", 1)[-1] for k in tracked}
    return seen


def _documented() -> dict[str, dict[str, set[str]]]:
    """The table "What reaches the driver under DP, key by key" of docs/privacy.md, as
    {row: {mode: keys}} (a mode's keys: the shared column plus its own)."""
    text = (REPO / "docs" / "privacy.md").read_text(encoding="utf-8")
    section = text.split("### What reaches the driver under DP, key by key", 1)[1].splitlines()
    start = next(k for k, line in enumerate(section) if line.startswith("| where |"))
    rows = []
    for line in section[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(line)
    out: dict[str, dict[str, set[str]]] = {}
    for line in rows:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        names = [set(re.findall(r"`([^`]+)`", c)) for c in cells[1:]]
        out[cells[0].replace("`", "")] = {mode: names[0] | names[1 + k] for k, mode in enumerate(MODES)}
    return out


ROWS = {  # the doc's rows, as collect_released names them
    "describe answer": "describe answer",
    "train answer": "train answer",
    "train metrics": "train metrics",
    "evaluate answer": "evaluate answer",
    "metrics.jsonl round": "metrics.jsonl round",
    "metrics.jsonl per platform": "metrics.jsonl platform",
    "metrics.jsonl secagg": "metrics.jsonl secagg",
    "summary.json": "summary.json",
    "platforms.json": "platforms.json",
    "checkpoint state.json": "checkpoint",
    "trackers": "trackers",
}


@pytest.mark.parametrize("mode", list(MODES))
def test_exactly_the_documented_keys_reach_the_driver(mode, tmp_path):
    """Under record- and client-level DP, with and without secure aggregation: every key of every
    platform answer, of metrics.jsonl, summary.json, platforms.json, the checkpoint and the
    trackers is in the docs' table, and every key there shows up. What DP keeps from the driver
    is in the platform's own log instead."""
    documented = _documented()
    assert set(documented) == set(ROWS)
    seen = collect_released(mode, tmp_path)
    seen["summary.json platforms"] -= seen["platforms.json"]  # the same records: checked once
    for row, name in ROWS.items():
        assert seen.get(name, set()) == documented[row][mode], f"{mode}: {row}"
    kept = [json.loads(line) for d in (tmp_path / "platforms").iterdir() for line in (d / "metrics.jsonl").open()]
    assert any("train_loss" in k for k in kept) and any("label_counts" in k for k in kept)
    leaked = {"train_loss", "dp_grad_norm", "dp_clipped_fraction", "tokens", "label_counts", "update_norms"}
    assert not leaked & (seen["train metrics"] | seen["metrics.jsonl platform"] | seen["metrics.jsonl round"])


# --- client-level ε from first principles --------------------------------------------------


class _Recorder:
    """Wraps a numpy generator and remembers the scale of every Gaussian it draws."""

    def __init__(self, rng, calls):
        self.rng, self.calls = rng, calls

    def normal(self, loc=0.0, scale=1.0, size=None):
        self.calls.append((float(scale), size))
        return self.rng.normal(loc, scale, size)

    def random(self, size=None):
        return self.rng.random(size)


def test_client_level_epsilon_matches_first_principles(tmp_path, monkeypatch):
    """Three client-level runs; ε recomputed here with dp-accounting from what the run did, within
    1% of what the run reports (summary, privacy.json, the last round line):
    - all 3 platforms every round, z = 1: Gaussian(1) per round;
    - k = 2 of n = 20, z = 1: PoissonSampled(0.1, Gaussian(1)) per round (add/remove); the old
      fixed-cohort accounting would have reported less than the replace-one truth;
    - adaptive clipping, 3 platforms, z = 0.25: the effective multiplier of the update noise and
      the clip count's noise as the run drew them, each std over its sensitivity (C and ½)."""
    import dp_accounting as dpa

    from fl_llm.server import privacy as server_privacy

    calls: list = []
    real = server_privacy.dp_generator
    monkeypatch.setattr(server_privacy, "dp_generator", lambda secure, words: _Recorder(real(False, words), calls))
    base = [*FAST, "privacy.dp.level=client", "privacy.dp.noise_multiplier=1.0", "server.rounds=3"]

    def reported(out):
        summary = json.loads((out / "summary.json").read_text())
        ledger = json.loads((out / "privacy.json").read_text())["parties"]["federation"]
        last = read_metrics(out)[-1]["epsilon"]
        assert summary["privacy"]["epsilon"]["federation"] == ledger["epsilon"] == last
        return last

    full = loop.run(load(None, base), tmp_path / "full")
    assert full["rounds"] == 3
    assert reported(tmp_path / "full") == pytest.approx(_pld_epsilon([(dpa.GaussianDpEvent(1.0), 3)]), rel=0.01)

    many = [
        *base,
        "data.num_platforms=20",
        "data.synthetic.train_examples=[40]",
        "data.synthetic.eval_examples=10",
        "client.local_steps=1",
        "server.platforms_per_round=2",
    ]
    loop.run(load(None, many), tmp_path / "many")
    truth = _pld_epsilon([(dpa.PoissonSampledDpEvent(0.1, dpa.GaussianDpEvent(1.0)), 3)])
    assert reported(tmp_path / "many") == pytest.approx(truth, rel=0.01)
    cohorts = [r["cohort"] for r in read_metrics(tmp_path / "many")]
    assert all(len(c) < 10 for c in cohorts)  # a Poisson sample around k = 2, not the federation

    calls.clear()
    adaptive = [*base, "privacy.dp.noise_multiplier=0.25", "privacy.dp.adaptive_clip=true", "privacy.dp.clip_norm=1.5"]
    loop.run(load(None, adaptive), tmp_path / "adaptive")
    rows = read_metrics(tmp_path / "adaptive")
    update_std = [scale for scale, size in calls if size is not None]
    count_std = [scale for scale, size in calls if size is None]
    assert len(update_std) == len(count_std) == 3
    for r, std_u, std_b in zip(rows, update_std, count_std):
        clip = r["dp_clip_norm"]
        z_eff = ((clip / std_u) ** 2 + (0.5 / std_b) ** 2) ** -0.5  # sensitivities C and ½
        assert z_eff == pytest.approx(0.25, rel=1e-6)
    assert reported(tmp_path / "adaptive") == pytest.approx(_pld_epsilon([(dpa.GaussianDpEvent(0.25), 3)]), rel=0.01)


def test_the_cohort_comes_from_the_os_and_platforms_are_not_handed_it():
    """Sampled client-level DP: two runs with the same seed draw different cohorts (the OS's
    randomness); with secure_rng=false the draw is the run seed's (reproducible experiments)."""
    from fl_llm.server.privacy import Privacy

    def draws(secure: bool):
        cfg = load(
            None,
            [
                "data.num_platforms=100",
                "data.synthetic.train_examples=[40]",
                "server.platforms_per_round=10",
                "privacy.dp.level=client",
                "privacy.dp.noise_multiplier=1",
                f"privacy.dp.secure_rng={str(secure).lower()}",
            ],
        )
        p = Privacy.start(cfg, {})
        return [p.poisson_cohort(list(range(100)), cfg.seed, r, 0) for r in range(1, 21)]

    a, b = draws(True), draws(True)
    assert a != b
    sizes = [len(c) for c in a]
    assert 2 < np.mean(sizes) < 20 and len(set(sizes)) > 1  # Poisson: the size varies around k
    assert draws(False) == draws(False)


def test_self_sampling_under_secure_aggregation_hides_the_cohort(tmp_path):
    """Sampled client-level DP with secure aggregation: every active platform is a party every
    round and sends a masked vector of the same size whether or not its coin said join; ε is the
    Poisson-sampled accounting."""
    import dp_accounting as dpa

    loop.run(load(None, [*SAMPLED_2_OF_4, "privacy.secagg.enabled=true"]), tmp_path)
    rows = read_metrics(tmp_path)
    for r in rows:
        assert len(r["cohort"]) == 4 and r["secagg"]["parties"] == 4
        assert len(set(r["secagg"]["bytes_up"].values())) == 1
    truth = _pld_epsilon([(dpa.PoissonSampledDpEvent(0.5, dpa.GaussianDpEvent(1.0)), 2)])
    assert rows[-1]["epsilon"] == pytest.approx(truth, rel=0.01)


# --- secure aggregation under client-level DP: what is sent is within C --------------------


def test_every_vector_sent_under_client_dp_has_norm_at_most_c():
    """Every ring the config accepts (32-bit, int8, int4; 2 to 100 parties; clip ranges 0.01 to
    1) and clip norms from tight to loose: the quantized vector a platform sends has norm ≤ C.
    Without the bound, stochastic rounding at 4 bits carried a clipped update well past C; and
    the bound keeps the update (rounding toward zero alone sent an int4 update as all zeros)."""
    from fl_llm.client.platform import Platform
    from fl_llm.config import to_dict
    from fl_llm.server.secure import ring_for

    cfg = load(
        None, [*FAST, "privacy.dp.level=client", "privacy.dp.noise_multiplier=1", "privacy.secagg.max_clipped=1"]
    )
    plat = Platform(to_dict(cfg), 0)
    update = plat.train(plat.initial_adapter(), round_=1)["update"]
    vec = update_vector(update)
    norm = float(np.linalg.norm(vec))
    worst_unbounded, kept = 0.0, {}
    for codec in ("none", "int8", "int4"):
        for parties in (2, 10, 100):
            for clip_range in (0.01, 0.1, 1.0):
                ring = ring_for(
                    load(None, [f"compression.name={codec}", f"privacy.secagg.clip_range={clip_range}"]), parties
                )
                step = ring.clip_range / ring.levels
                for clip in (norm / 10, norm, norm * 10):
                    if not _accepted(codec, parties, clip_range, clip):
                        continue  # a ring too coarse for C: the config refuses it
                    sa = {"weight": 1.0, "clip": clip, "ring": (ring.bits, ring.levels, ring.clip_range)}
                    levels, extra, _ = plat.secagg_levels(update, 1, sa)
                    sent = levels.astype(np.float64) * step
                    assert float(np.linalg.norm(sent)) <= clip * (1 + 1e-12), (codec, parties, clip_range, clip)
                    assert extra == [1 if norm <= clip else -1]
                    x = vec * min(1.0, clip / norm)
                    kept[codec, parties, clip_range, clip] = float(sent @ x / (x @ x))  # share of the update sent
                    q, _ = ring.quantize(x, np.random.default_rng(0))
                    worst_unbounded = max(worst_unbounded, float(np.linalg.norm(q.astype(np.float64))) * step / clip)
    assert worst_unbounded > 1.2  # what the bound is there for
    assert len(kept) >= 40 and min(kept.values()) > 0.02  # never the zero vector
    for (codec, _, clip_range, clip), share in kept.items():
        if codec != "int4" and clip_range == 0.1 and clip >= norm:
            assert share > 0.98, (codec, clip_range, clip, share)


def _accepted(codec: str, parties: int, clip_range: float, clip: float) -> bool:
    from fl_llm.errors import UserError

    settings = [f"compression.name={codec}", f"privacy.secagg.clip_range={clip_range}", f"privacy.dp.clip_norm={clip}"]
    settings += [f"data.num_platforms={parties}", "data.synthetic.train_examples=[50]"]
    try:
        load(
            None, [*settings, "privacy.dp.level=client", "privacy.dp.noise_multiplier=1", "privacy.secagg.enabled=true"]
        )
    except UserError:
        return False
    return True


def update_vector(update) -> np.ndarray:
    return np.concatenate([update[k].astype(np.float64).ravel() for k in sorted(update)])


# --- the generator ---------------------------------------------------------------------------


def test_chacha_gaussians_have_the_right_moments_and_tails():
    from scipy import stats

    from fl_llm.privacy.csprng import ChaChaRandom

    n = 2_000_000
    x = ChaChaRandom().normal(0.0, 1.0, size=n)
    se = 1 / math.sqrt(n)
    assert abs(x.mean()) < 5 * se and abs(x.var() - 1) < 5 * math.sqrt(2) * se
    assert abs(stats.skew(x)) < 5 * math.sqrt(6 / n) and abs(stats.kurtosis(x)) < 5 * math.sqrt(24 / n)
    for t in (2.0, 3.0, 4.0):  # two-sided tail mass against the normal's, within 5 binomial s.e.
        p = 2 * stats.norm.sf(t)
        assert abs((np.abs(x) > t).mean() - p) < 5 * math.sqrt(p * (1 - p) / n)
    u = ChaChaRandom().random(200_000)
    assert 0 <= u.min() and u.max() < 1 and stats.kstest(u, "uniform").pvalue > 1e-4
    key = bytes(range(32))
    assert np.array_equal(ChaChaRandom(key).normal(size=5), ChaChaRandom(key).normal(size=5))
    assert not np.array_equal(ChaChaRandom().normal(size=5), ChaChaRandom().normal(size=5))
    assert ChaChaRandom().normal(0.0, 3.0, size=(40, 50)).shape == (40, 50)


def test_secure_dp_noise_is_not_the_seeds():
    """privacy.dp.secure_rng=true (the default): two platforms built from the same config and seed
    send different updates for the same round (noise and batches from the OS); with false, the
    same."""
    from fl_llm.client.platform import Platform
    from fl_llm.config import to_dict

    def update(secure: bool):
        cfg = load(
            None,
            [*FAST, "privacy.dp.level=record", "privacy.dp.noise_multiplier=1", f"privacy.dp.secure_rng={secure}"],
        )
        plat = Platform(to_dict(cfg), 0)
        return update_vector(plat.train(plat.initial_adapter(), round_=1)["update"])

    assert not np.array_equal(update(True), update(True))
    assert np.array_equal(update(False), update(False))


# --- state and per-record outputs stay on the platform ------------------------------------


def test_platform_state_stays_on_the_platform_and_resume_is_exact(tmp_path):
    """SCAFFOLD's cᵢ and top-k's residual live in each platform's own state dir (client.state_dir
    with {name}), not in the driver's checkpoint; a run stopped in round 3 and resumed ends with
    the uninterrupted run's adapter bytes."""
    cfg = [
        *FAST,
        "server.rounds=3",
        "strategy.name=scaffold",
        "client.optimizer=sgd",
        "client.lr=0.5",
        "compression.name=topk",
        f"client.state_dir={tmp_path / 'homes' / '{name}' / 'fl'}",
    ]
    whole = tmp_path / "whole"
    loop.run(load(None, cfg), whole)
    _, state = checkpoint.load(checkpoint.latest(whole / "checkpoints"))
    assert "platform_state" not in state and not (whole / "platforms").exists()
    homes = sorted(p.name for p in (tmp_path / "homes").iterdir())
    assert homes == ["fashion-mall", "gadget-hub", "home-market"]
    states = {h: checkpoint.load(checkpoint.latest(tmp_path / "homes" / h / "fl" / "checkpoints"))[1] for h in homes}
    assert all({"c", "residual"} <= set(s["persistent"]) for s in states.values())

    cut = tmp_path / "cut"
    stop = ["server.min_platforms=3", "server.too_few=stop", "faults.error=[{platform: 1, round: 3}]"]
    own = f"client.state_dir={tmp_path / 'cut-homes' / '{name}'}"
    with pytest.raises(loop.RunFailed):
        loop.run(load(None, [*cfg, own, *stop]), cut)
    loop.run(load(cut / "config.yaml", ["faults.error=[]"]), cut, resume=True)
    adapter = "adapter/adapter_model.safetensors"
    assert (cut / adapter).read_bytes() == (whole / adapter).read_bytes()


def test_per_record_outputs_are_not_in_the_remote_api(small_cfg):
    from fl_llm.server.backends import LocalBackend

    backend = LocalBackend(load(None, [*FAST, "data.num_platforms=1", "data.synthetic.train_examples=[40]"]))
    from fl_llm.client.platform import Platform

    for method in (Platform._example_losses, Platform.audit, Platform.secagg_levels, "evaluate", print):
        with pytest.raises(ValueError, match="not part of the platform's remote API"):
            backend.call([0], method, {}, None, [0], [0], timeout_s=10)
    assert not hasattr(backend.platforms[0], "example_losses")


def test_an_excluded_platform_leaves_the_sampled_population(tmp_path):
    """Client-level DP, k = 2 of 4, a platform that always fails is excluded after one failure:
    from then on each of the 3 left joins with q = 2/3, and the ledger composes both rates."""
    import dp_accounting as dpa

    faults = "faults.error=[{platform: 3, round: 1}, {platform: 3, round: 2}, {platform: 3, round: 3}]"
    loop.run(load(None, [*SAMPLED_2_OF_4, "server.rounds=4", "server.max_failures=1", faults]), tmp_path)
    rows = read_metrics(tmp_path)
    excluded_after = next(r["round"] for r in rows if r["excluded"])
    spent = json.loads((tmp_path / "privacy.json").read_text())["parties"]["federation"]["spent"]
    assert [(s["sample_rate"], s["releases"]) for s in spent] == [(0.5, excluded_after), (2 / 3, 4 - excluded_after)]
    truth = _pld_epsilon(
        [
            (dpa.PoissonSampledDpEvent(0.5, dpa.GaussianDpEvent(1.0)), excluded_after),
            (dpa.PoissonSampledDpEvent(2 / 3, dpa.GaussianDpEvent(1.0)), 4 - excluded_after),
        ]
    )
    assert rows[-1]["epsilon"] == pytest.approx(truth, rel=0.01)
