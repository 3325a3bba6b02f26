"""Secure aggregation (Bonawitz et al. 2017), the protocol alone: every message goes through a
simulated driver, so the tests also see exactly what a coordinator would see."""

from __future__ import annotations

import numpy as np
import pytest

from fl_llm.privacy.secagg import (
    Ring,
    SecAggClient,
    SecAggError,
    masked_sum,
    pairwise_mask,
    shamir_join,
    shamir_split,
    unmask,
)
from tests.conftest import start_local_ray


def run_protocol(xs, threshold, ring, drop_before_mask=(), drop_before_reveal=(), round_=1, wire=None):
    """One round among len(xs) parties; returns the unmasked integer sum of the survivors' x.
    `wire` (a list) receives every message the driver gets."""
    wire = wire if wire is not None else []
    n = len(xs)
    clients = {u: SecAggClient(u, round_, threshold) for u in range(n)}
    keys = {u: c.advertise() for u, c in clients.items()}
    wire.extend(keys.values())
    boxes = {u: {} for u in range(n)}
    for u, c in clients.items():
        for v, blob in c.share(keys).items():
            boxes[v][u] = blob
            wire.append(blob)
    masked = {}
    for u, c in clients.items():
        if u in drop_before_mask:
            continue
        masked[u] = c.mask(xs[u], boxes[u], ring)
        wire.append(masked[u])
    survivors = sorted(masked)
    dropped = sorted(set(range(n)) - set(masked))
    reveals = {}
    for u in survivors:
        if u in drop_before_reveal:
            continue
        reveals[u] = clients[u].reveal(survivors, dropped)
        wire.append(reveals[u])
    total = masked_sum([masked[u] for u in survivors], ring)
    return unmask(total, reveals, survivors, dropped, keys, threshold, round_, ring), survivors


@pytest.fixture
def encoded():
    rng = np.random.default_rng(0)
    ring = Ring.for_cohort(6, clip_range=1.0)
    xs = [ring.encode(rng.normal(0, 0.3, 1000), rng)[0] for _ in range(6)]
    return ring, xs


@pytest.mark.parametrize(
    "before_mask, before_reveal",
    [((), ()), ((2,), ()), ((), (4,)), ((1, 3), ()), ((0,), (5,))],
    ids=["no-dropout", "1-before-masking", "1-after-masking", "n-t-before-masking", "n-t-mixed"],
)
def test_masked_sum_equals_plaintext_sum(encoded, before_mask, before_reveal):
    ring, xs = encoded
    total, survivors = run_protocol(
        xs, threshold=4, ring=ring, drop_before_mask=before_mask, drop_before_reveal=before_reveal
    )
    expected = masked_sum([xs[u] for u in survivors], ring)
    np.testing.assert_array_equal(total, expected)
    assert survivors == [u for u in range(6) if u not in before_mask]
    # and decoding gives the float sum to within the quantization step per party
    plain = sum(ring.decode(xs[u]) for u in survivors)
    np.testing.assert_allclose(ring.decode(total), plain, atol=1e-9)


def test_fewer_than_t_survivors_gives_no_sum(encoded):
    ring, xs = encoded
    with pytest.raises(SecAggError, match="survivors"):
        run_protocol(xs, threshold=4, ring=ring, drop_before_mask=(0, 1, 2))
    with pytest.raises(SecAggError, match="revealed"):
        run_protocol(xs, threshold=4, ring=ring, drop_before_reveal=(0, 1, 2))


def test_one_masked_update_is_indistinguishable_from_uniform():
    """A chi-square test on the 256 byte values of one masked update (16-bit ring) passes, while
    the same test on the unmasked encoding fails by a mile."""
    from scipy.stats import chisquare

    rng = np.random.default_rng(1)
    ring = Ring.for_cohort(3, clip_range=1.0, levels=127)
    assert ring.bits == 16
    xs = [ring.encode(rng.normal(0, 0.05, 20000), rng)[0] for _ in range(3)]
    wire: list = []
    run_protocol(xs, threshold=2, ring=ring, wire=wire)
    masked = [m for m in wire if isinstance(m, np.ndarray)]
    assert len(masked) == 3

    def p_value(values):
        counts = np.bincount(np.asarray(values, np.uint16).view(np.uint8), minlength=256)
        return chisquare(counts).pvalue

    assert all(p_value(m) > 1e-4 for m in masked)
    assert p_value(xs[0]) < 1e-12


def test_the_driver_never_receives_an_unmasked_update(encoded):
    ring, xs = encoded
    wire: list = []
    run_protocol(xs, threshold=4, ring=ring, drop_before_mask=(3,), wire=wire)
    arrays = [np.asarray(m, np.uint64) for m in wire if isinstance(m, np.ndarray)]
    for x in xs:
        for a in arrays:
            assert np.mean(a == x) < 0.01  # no coordinate-wise agreement beyond chance
    # shares travel encrypted: no plaintext share value appears in the relayed blobs
    blobs = [m for m in wire if isinstance(m, bytes)]
    assert blobs and all(len(b) == 12 + 8 + 2 * 66 + 16 for b in blobs)


def test_a_late_party_declared_dropped_stays_masked(encoded):
    """Double masking: u sent nothing in time, so the survivors reveal its mask key; if its y_u
    arrives later anyway, removing every pairwise mask still leaves its self-mask on it."""
    ring, xs = encoded
    n, t, late = 6, 4, 2
    clients = {u: SecAggClient(u, 7, t) for u in range(n)}
    keys = {u: c.advertise() for u, c in clients.items()}
    boxes = {u: {} for u in range(n)}
    for u, c in clients.items():
        for v, blob in c.share(keys).items():
            boxes[v][u] = blob
    masked = {u: clients[u].mask(xs[u], boxes[u], ring) for u in range(n)}  # u=late's arrives late
    survivors = [u for u in range(n) if u != late]
    reveals = {u: clients[u].reveal(survivors, [late]) for u in survivors}
    s_secret = shamir_join({v + 1: r["s"][late] for v, r in reveals.items()}, t)
    y = np.asarray(masked[late], np.uint64)
    for v in survivors:
        p = pairwise_mask(s_secret, keys[v]["s"], 7, late, v, len(y), ring.bits)
        y = ring.sub(y, p) if late < v else ring.add(y, p)
    assert np.mean(y == xs[late]) < 0.01
    assert all(late not in r["b"] for r in reveals.values())
    with pytest.raises(SecAggError, match="already"):
        clients[0].reveal(survivors, [late])  # a second request, e.g. for b-shares, is refused
    fresh = SecAggClient(0, 7, t)
    fresh.advertise()
    fresh.keys, fresh.inbox = keys, boxes[0]
    with pytest.raises(SecAggError, match="both"):
        fresh.reveal([0, 1, 2, 3, late], [late])


def test_shamir_threshold():
    secret = bytes(range(32))
    shares = shamir_split(secret, 3, [1, 2, 3, 4, 5])
    assert shamir_join({x: shares[x] for x in (2, 4, 5)}, 3) == secret
    assert shamir_join({x: shares[x] for x in (1, 3, 5)}, 3) == secret
    with pytest.raises(SecAggError):
        shamir_join({x: shares[x] for x in (1, 2)}, 3)
    # two shares pin down nothing: any secret is consistent with them (a degree-2 polynomial
    # through them and any chosen f(0) exists), so a wrong pair plus a forged third rebuilds junk
    forged = dict(list(shares.items())[:2]) | {3: (shares[3] + 1)}
    assert shamir_join(forged, 3, size=66) != secret.rjust(66, b"\0")


def test_ring_encoding_is_unbiased_and_bounded():
    rng = np.random.default_rng(3)
    ring = Ring.for_cohort(10, clip_range=0.5, levels=127)
    x = rng.uniform(-0.5, 0.5, 5000)
    step = ring.clip_range / ring.levels
    decoded = np.stack([ring.decode(ring.encode(x, rng)[0]) for _ in range(200)])
    assert np.abs(decoded - x).max() < step + 1e-12  # one step at most
    assert np.abs(decoded.mean(0) - x).max() < 5 * step / np.sqrt(200)  # unbiased
    big = np.array([2.0, -3.0, 0.1])
    q, clipped = ring.encode(big, rng)
    assert clipped == pytest.approx(2 / 3)
    np.testing.assert_allclose(ring.decode(q)[:2], [0.5, -0.5])
    assert Ring.for_cohort(10, 1.0, levels=7).bits == 8
    assert Ring.for_cohort(3, 1.0, levels=127).bits == 16
    assert Ring.for_cohort(300, 1.0, levels=127).bits == 32


# --- in a run -----------------------------------------------------------------------------------

NAMES = ["fashion-mall", "gadget-hub", "home-market"]


def _run(path, *overrides):
    from fl_llm.config import load
    from fl_llm.server.loop import run
    from fl_llm.tracking import read_metrics
    from tests.conftest import SMALL

    summary = run(load(None, [*SMALL, "server.round_timeout_s=120", *overrides]), path)
    return summary, read_metrics(path)


@pytest.fixture(scope="module")
def plain_and_secure(tmp_path_factory):
    """The small default job with and without secure aggregation (local backend), everything the
    driver received in the secure one recorded at the backend."""
    from fl_llm.server import backends

    root = tmp_path_factory.mktemp("secagg")
    plain = _run(root / "plain", "backend=local")
    received: list = []
    original = backends.LocalBackend.call_each

    def recording(self, args_by_id, method, *, timeout_s):
        got = original(self, args_by_id, method, timeout_s=timeout_s)
        received.extend((method.__name__, i, r) for i, r in got.results.items())
        return got

    backends.LocalBackend.call_each = recording
    try:
        secure = _run(root / "secure", "backend=local", "privacy.secagg.enabled=true")
    finally:
        backends.LocalBackend.call_each = original
    return plain, secure, received


def test_secure_run_reaches_the_plain_run_loss(plain_and_secure):
    (_, plain), (summary, secure), _ = plain_and_secure
    for a, b in zip(plain, secure):
        assert b["eval_loss"] == pytest.approx(a["eval_loss"], abs=2e-3)  # within quantization noise
        assert b["secagg"]["parties"] == 3 and b["secagg"]["dropped"] == [] and b["secagg"]["clipped"] == 0
        assert b["secagg"]["ring_bits"] == 32 and b["secagg"]["threshold"] == 2
        assert "aggregation_error" not in b
        # masked vector (4 bytes per value) + keys, shares and revealed shares; the lists and
        # everyone's keys come down on top of the adapter
        assert b["bytes_up"] > a["bytes_up"] and b["bytes_down"] > a["bytes_down"]
        assert all("update_norm" not in p for p in b["platforms"].values())
    assert summary["status"] == "completed"


def test_the_driver_receives_no_unmasked_update(plain_and_secure):
    """Everything the platforms returned to the driver in the secure run: no float tensor, and
    no integer vector that decodes to anything like a platform's (plain run) update."""
    (_, plain), _, received = plain_and_secure
    masked = [r["masked"] for method, _, r in received if method == "train"]
    assert len(masked) == 6  # 3 platforms × 2 rounds
    for method, _, r in received:
        if method == "train":
            assert set(r) == {"num_examples", "metrics", "masked", "bytes", "secagg_clipped"}
        elif method in ("secagg_advertise", "secagg_share", "secagg_reveal"):
            flat = r.values() if method != "secagg_reveal" else [*r["b"].values(), *r["s"].values()]
            assert all(isinstance(v, (bytes, int)) for v in flat)
    ring = Ring.for_cohort(3, 0.1)
    for y in masked:
        values = ring.decode(np.asarray(y, np.uint64))
        assert np.median(np.abs(values)) > 0.01  # uniform ring elements decode to ~±0.05, not ~1e-3
        assert (np.asarray(y, np.uint64) > 2**31).mean() == pytest.approx(0.5, abs=0.02)


def test_fewer_than_t_survivors_leave_the_global_model_unchanged(tmp_path):
    """t = 3 of 3 and one platform killed mid-training: the attempt has no sum, the global model
    is untouched, and the retry (the kill fires once) completes the round; with too_few=stop
    the run ends cleanly with no round logged."""
    from fl_llm.server.loop import RunFailed

    kill = "faults.kill=[{platform: 0, round: 1}]"
    _, (row, _) = _run(
        tmp_path / "retry", "backend=local", "privacy.secagg.enabled=true", "privacy.secagg.threshold=3", kill
    )
    (failed,) = row["attempts"]
    assert NAMES[0] in failed["failed"]
    assert all("secure aggregation failed" in why for name, why in failed["failed"].items() if name != NAMES[0])
    assert all(p["participated"] for p in row["platforms"].values())
    with pytest.raises(RunFailed):
        _run(
            tmp_path / "stop",
            "backend=local",
            "privacy.secagg.enabled=true",
            "privacy.secagg.threshold=3",
            "server.too_few=stop",
            kill,
        )
    assert not (tmp_path / "stop" / "metrics.jsonl").exists() or (tmp_path / "stop" / "metrics.jsonl").read_text() == ""
    assert not (tmp_path / "stop" / "adapter").exists()


def test_secure_run_with_client_dp_and_int8_on_ray(tmp_path):
    """Ray actors, a platform process killed mid-round (os._exit): its pairwise masks are removed
    with the survivors' shares and the round goes on; client-level DP noises the unmasked sum
    (each platform clipped its own update); int8 narrows the masked ring to 16 bits."""
    ray = start_local_ray()
    try:
        summary, rows = _run(
            tmp_path / "r",
            "server.rounds=3",
            "privacy.secagg.enabled=true",
            "compression.name=int8",
            "privacy.dp.level=client",
            "privacy.dp.noise_multiplier=0.01",
            "privacy.dp.clip_norm=0.5",
            "privacy.dp.secure_rng=false",
            "faults.kill=[{platform: 1, round: 2}]",
        )
    finally:
        ray.shutdown()
    r2 = rows[1]
    assert r2["secagg"]["dropped"] == [NAMES[1]] and r2["restarted"] == [NAMES[1]]
    assert not r2["platforms"][NAMES[1]]["participated"]
    assert all(r["secagg"]["ring_bits"] == 16 for r in rows)
    assert all(r["dp_clip_norm"] == 0.5 and "dp_unclipped" not in r for r in rows)  # no un-noised count
    assert rows[2]["platforms"][NAMES[1]]["participated"] and rows[-1]["epsilon"] > 0
    assert np.isfinite(rows[-1]["eval_loss"]) and rows[-1]["eval_loss"] < rows[0]["eval_loss"] + 0.5
    assert summary["status"] == "completed"
