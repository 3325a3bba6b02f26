"""The driver's side of secure aggregation (`privacy.secagg.enabled`): it relays the platforms'
public keys and encrypted shares, collects masked updates, asks the survivors for the shares
that unmask their sum — and never holds any platform's update. Protocol: fl_llm.privacy.secagg.

    open_round    step 0-1  keys from the cohort, relayed; encrypted shares, routed
    upload_args   step 2    what each platform needs to mask its update (inbox, weight, ring)
    close_round   step 3-4  survivors' shares → Σ wᵢ·q(Δᵢ) → the weighted mean, dequantized

and what the round loop calls: masking (step 2's arguments per platform), unmask_round (checks
the masked uploads, then close_round), mean (the one update the strategy sees), record (the
round log's `secagg` object).

Weights: platform i sends wᵢ·Δᵢ with wᵢ = nᵢ / max nⱼ (its example count over the largest, so
|wᵢ| ≤ 1 keeps the fixed-point range); the driver divides the sum by Σ wᵢ over the survivors.
Under client-level DP every wᵢ = 1 and each platform clips its own update to C — bounding the
norm of the quantized vector it sends, not only of the update — and appends its centred clip
bit 2·(bᵢ − ½); the driver noises the sum (fl_llm.server.privacy). With a sampled cohort every
active platform takes part in the protocol and joins the sum with probability q, decided on the
platform: one that did not join sends a masked zero.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from fl_llm.client.api import PlatformAPI
from fl_llm.compression import LEVELS
from fl_llm.config import RunConfig
from fl_llm.privacy.secagg import Ring, SecAggError, masked_sum, unmask
from fl_llm.server.backends import Collected
from fl_llm.strategies import Strategy
from fl_llm.tensors import AdapterState, unflatten

KEY_BYTES = 64  # two X25519 public keys


def threshold_for(cfg: RunConfig, cohort: int) -> int:
    """t: privacy.secagg.threshold, or a majority of the round's cohort (at least 2)."""
    return cfg.privacy.secagg.threshold or max(2, cohort // 2 + 1)


def ring_for(cfg: RunConfig, parties: int) -> Ring:
    """32-bit fixed point; int8/int4 compression: ±127 / ±7 levels in a 16 / 8-bit ring."""
    return Ring.for_cohort(parties, cfg.privacy.secagg.clip_range, LEVELS.get(cfg.compression.name))


@dataclass
class SecureRound:
    """One round's protocol state on the driver: public material only."""

    round: int
    threshold: int
    ring: Ring
    keys: dict[int, dict[str, bytes]] = field(default_factory=dict)  # U1: who advertised keys
    inboxes: dict[int, dict[int, bytes]] = field(default_factory=dict)  # U2: who shared, and their mail
    failed: Collected = field(default_factory=Collected)  # who dropped during steps 0-1 and 3
    bytes_up: dict[int, int] = field(default_factory=dict)
    bytes_down: dict[int, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def parties(self) -> list[int]:
        return sorted(self.inboxes)

    def _count(self, where: dict[int, int], i: int, n: int) -> None:
        where[i] = where.get(i, 0) + int(n)

    def _absorb(self, got: Collected) -> None:
        self.failed.errors.update(got.errors)
        self.failed.late.extend(got.late)
        self.failed.dead.extend(got.dead)


def open_round(backend, cohort: list[int], round_: int, cfg: RunConfig, timeout_s: float) -> SecureRound:
    """Steps 0-1. The returned round's `parties` (U2) may train; fewer than t means no round."""
    t0 = time.monotonic()
    sr = SecureRound(round_, threshold_for(cfg, len(cohort)), ring_for(cfg, len(cohort)))
    adv = backend.call_each(
        {i: (round_, sr.threshold) for i in cohort}, PlatformAPI.secagg_advertise, timeout_s=timeout_s
    )
    sr._absorb(adv)
    sr.keys = dict(sorted(adv.results.items()))
    if len(sr.keys) >= sr.threshold:
        shared = backend.call_each({i: (sr.keys,) for i in sr.keys}, PlatformAPI.secagg_share, timeout_s=timeout_s)
        sr._absorb(shared)
        senders = sorted(shared.results)
        sr.inboxes = {v: {u: shared.results[u][v] for u in senders if u != v} for v in senders}
        for u in senders:
            sr._count(sr.bytes_up, u, KEY_BYTES + sum(len(b) for b in shared.results[u].values()))
        for v, box in sr.inboxes.items():
            sr._count(sr.bytes_down, v, KEY_BYTES * len(sr.keys) + sum(len(b) for b in box.values()))
    sr.seconds += time.monotonic() - t0
    return sr


def upload_args(sr: SecureRound, i: int, weight: float, clip: float | None, sample_rate: float = 1.0) -> dict:
    """Step 2 inputs for platform i: its inbox, its weight, the ring (and C under client DP, with
    the probability q of joining the round when each platform samples itself)."""
    ring = sr.ring
    out = {"inbox": sr.inboxes[i], "weight": weight, "clip": clip, "ring": (ring.bits, ring.levels, ring.clip_range)}
    if sample_rate < 1.0:
        out["sample_rate"] = sample_rate
    return out


def check_masked(result: dict, length: int, ring: Ring) -> str | None:
    """All the driver can check of a masked update: its form."""
    y = result.get("masked")
    if not isinstance(y, np.ndarray) or y.dtype != ring.dtype or y.shape != (length,):
        got = f"{getattr(y, 'dtype', type(y).__name__)} {getattr(y, 'shape', '')}"
        return f"masked update is {got}, expected {np.dtype(ring.dtype)} ({length},)"
    return None


def close_round(
    sr: SecureRound, backend, masked: dict[int, np.ndarray], size: int, timeout_s: float
) -> tuple[np.ndarray, np.ndarray]:
    """Steps 3-4: (Σ over the survivors of their weighted, clipped update as float64 of length
    `size`, the integer extras they appended). Raises SecAggError when fewer than t survive."""
    t0 = time.monotonic()
    survivors = sorted(masked)
    dropped = sorted(set(sr.parties) - set(survivors))
    if len(survivors) < sr.threshold:
        raise SecAggError(f"{len(survivors)} of the round's platforms sent a masked update, {sr.threshold} needed")
    asked = backend.call_each(
        {i: (survivors, dropped) for i in survivors}, PlatformAPI.secagg_reveal, timeout_s=timeout_s
    )
    sr._absorb(asked)
    for i in survivors:
        sr._count(sr.bytes_down, i, 8 * len(sr.parties))  # the survivor and dropped lists
    for i, r in asked.results.items():
        sr._count(sr.bytes_up, i, 66 * (len(r["b"]) + len(r["s"])))
    total = unmask(
        masked_sum([masked[i] for i in survivors], sr.ring),
        asked.results,
        survivors,
        dropped,
        sr.keys,
        sr.threshold,
        sr.round,
        sr.ring,
    )
    sr.seconds += time.monotonic() - t0
    return sr.ring.decode(total[:size]), sr.ring.signed(total[size:])


# --- the round loop's use of the above -------------------------------------------------------


def masking(sr: SecureRound | None, i: int, privacy, info: dict) -> dict | None:
    """Platform i's inputs for masking its update: its weight nᵢ / max nⱼ (1 under client-level
    DP, which also has it clip to C), and the shares addressed to it. None without secagg."""
    if sr is None:
        return None
    if privacy.level == "client":
        return upload_args(sr, i, 1.0, privacy.clip, privacy.sample_rate() if privacy.self_sampling else 1.0)
    return upload_args(sr, i, weight(info, i), None)


def weight(info: dict, i: int) -> float:
    """wᵢ = nᵢ / max nⱼ: example-count weighting that keeps |wᵢ·Δᵢ| within the fixed-point range."""
    return info[i]["num_train"] / max(d["num_train"] for d in info.values())


def upload_layout(global_state: AdapterState, strategy: Strategy) -> list[tuple[str, tuple[int, ...]]]:
    """The (key, shape) order in which a platform flattens its update (sorted keys)."""
    return [(k, global_state[k].shape) for k in sorted(strategy.upload_keys(global_state))]


def unmask_round(sr: SecureRound, backend, trained: Collected, global_state, strategy: Strategy, cfg: RunConfig):
    """(platforms whose update is in the sum, {platform: why not}, (Σ, extras) or None)."""
    for i, why in sr.failed.errors.items():  # dropped during the key exchange
        trained.errors.setdefault(i, f"secure aggregation: {why}")
    trained.late.extend(i for i in sr.failed.late if i not in trained.late)
    trained.dead.extend(i for i in sr.failed.dead if i not in trained.dead)
    size = sum(int(np.prod(shape)) for _, shape in upload_layout(global_state, strategy))
    extras = 1 if cfg.privacy.dp.level == "client" else 0
    accepted, rejected = [], {}
    for i in sorted(trained.results):
        why = check_masked(trained.results[i], size + extras, sr.ring)
        if why:
            rejected[i] = f"update rejected: {why}"
        else:
            accepted.append(i)
    if len(accepted) < cfg.server.min_platforms:
        return accepted, rejected, None
    try:
        masked = {i: trained.results[i]["masked"] for i in accepted}
        unmasked = close_round(sr, backend, masked, size, cfg.server.round_timeout_s)
    except SecAggError as e:
        return [], {**rejected, **{i: f"secure aggregation failed: {e}" for i in accepted}}, None
    finally:
        trained.dead.extend(i for i in sr.failed.dead if i not in trained.dead)
        for i, r in trained.results.items():  # keys, shares and revealed shares went up too
            r["bytes"] += sr.bytes_up.get(i, 0)
    return accepted, rejected, unmasked


def mean(
    unmasked, accepted: list[int], global_state, privacy, strategy: Strategy, info: dict, cfg: RunConfig, rnd: int
):
    """The one update the strategy sees under secure aggregation: Σ wᵢΔᵢ / Σ wᵢ over the
    survivors — or, under client-level DP, (Σ clip(Δᵢ) + noise) / m."""
    total, extras = unmasked
    layout = upload_layout(global_state, strategy)
    if privacy.level == "client":
        noised, dp_stats = privacy.private_sum(total, int(extras[0]), cfg.seed, rnd)
        return [unflatten(noised, layout)], [1.0], dp_stats
    total_weight = sum(weight(info, i) for i in accepted)
    return [unflatten(total / total_weight, layout)], [1.0], {}


def record(sr: SecureRound, trained: Collected, names: dict) -> dict:
    """What the round log says about secure aggregation (aggregate numbers only)."""
    clipped = [r["secagg_clipped"] for r in trained.results.values() if "secagg_clipped" in r]
    out = {
        "threshold": sr.threshold,
        "ring_bits": sr.ring.bits,
        "parties": len(sr.parties),
        "dropped": [names[i] for i in sr.parties if i not in trained.results],
        "seconds": round(sr.seconds, 4),
        "bytes_up": {names[i]: b for i, b in sr.bytes_up.items()},
        "bytes_down": {names[i]: b for i, b in sr.bytes_down.items()},
    }
    if clipped:  # under DP a platform keeps this (a statistic of its update) in its own log
        out["clipped"] = max(clipped)
    return {"secagg": out}
