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
    total, survivors = run_protocol(xs, threshold=4, ring=ring, drop_before_mask=before_mask, drop_before_reveal=before_reveal)
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
