"""Secure aggregation (Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving
Machine Learning", CCS 2017): the driver learns the sum of the platforms' updates and nothing
else about any one of them, even when platforms drop out mid-round.

One round, every message relayed by the driver (as between companies through a coordinator):

    0 advertise  u makes two X25519 key pairs, c_u (transport) and s_u (masks); sends both
                 public keys
    1 share      u draws a self-mask seed b_u, splits b_u and s_u's secret key into t-of-n
                 Shamir shares, and sends peer v its two shares under an AEAD key from
                 HKDF(X25519(c_u, c_v))
    2 mask       u sends y_u = x_u + PRG(b_u) + Σ_{v>u} PRG(s_uv) − Σ_{v<u} PRG(s_uv)  mod 2^bits,
                 x_u its fixed-point update, s_uv = HKDF(X25519(s_u, s_v)), PRG = ChaCha20
    3 reveal     given the survivors U (sent y) and the dropped D (shared, but sent no y), each
                 survivor opens the shares it holds: b-shares of U, s-shares of D — never both
                 for one peer, and only once per round
    4 unmask     the driver rebuilds b_u (u ∈ U) and s_u (u ∈ D) from ≥ t shares, removes the
                 self-masks and the dropped peers' pairwise masks: Σ_{u∈U} x_u mod 2^bits

Double masking is what keeps a late update secret: if u's y_u arrives after u was declared
dropped, its pairwise masks can be removed but its self-mask b_u was never revealed.

Threat model: an honest-but-curious driver and up to t − 1 colluding parties learn nothing about
an individual update beyond the sum. Not covered (the paper's malicious-server variant): a
driver that shows different dropped sets to different platforms (needs signatures and a
consistency round), and platforms that send garbage (the driver cannot check a masked update).

Fixed point: each value v is clipped to [−R, R] and stochastically rounded to an integer in
[−L, L] (unbiased); the ring 2^bits holds the sum of n of them (2·n·L < 2^bits), so decoding is
exact. Pure functions and one client-side class; no Ray, no files.
"""

from __future__ import annotations

import os
import secrets
import struct
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

PRIME = 2**521 - 1  # Shamir's field: a Mersenne prime, larger than any 32-byte secret
SHARE_BYTES = 66  # one field element
RAW = serialization.Encoding.Raw


class SecAggError(RuntimeError):
    """The protocol cannot go on (too few parties, a bad message): the round has no sum."""


# --- fixed-point encoding in the ring 2^bits -----------------------------------------------------


@dataclass(frozen=True)
class Ring:
    """Values in [−clip_range, clip_range] as integers in [−levels, levels], summed mod 2^bits."""

    bits: int
    levels: int
    clip_range: float

    @classmethod
    def for_cohort(cls, parties: int, clip_range: float, levels: int | None = None) -> Ring:
        """The narrowest of 8/16/32 bits that holds the sum of `parties` values of ±levels
        (levels None: as many as 32 bits allow)."""
        if levels is None:
            return cls(32, (2**31 - 1) // parties, clip_range)
        for bits in (8, 16, 32):
            if 2 * parties * levels < 2**bits:
                return cls(bits, levels, clip_range)
        raise ValueError(f"{parties} parties of ±{levels} do not fit a 32-bit ring")

    @property
    def modulus(self) -> int:
        return 2**self.bits

    @property
    def dtype(self):
        return {8: np.uint8, 16: np.uint16, 32: np.uint32}[self.bits]

    def quantize(self, vec: np.ndarray, rng) -> tuple[np.ndarray, float]:
        """(signed integer levels of `vec`, share of values that had to be clipped to ±clip_range),
        by unbiased stochastic rounding."""
        x = np.asarray(vec, np.float64)
        clipped = float(np.mean(np.abs(x) > self.clip_range)) if len(x) else 0.0
        scaled = np.clip(x, -self.clip_range, self.clip_range) * (self.levels / self.clip_range)
        q = np.clip(np.floor(scaled + rng.random(len(x))), -self.levels, self.levels).astype(np.int64)
        return q, clipped

    def bound(self, q: np.ndarray, norm_bound: float) -> np.ndarray:
        """The levels `q` with the norm of what they decode to at most `norm_bound`: scaled by
        C/‖q‖ and rounded toward zero, every level shrinks, so the norm is C or less. The last
        resort of `quantize_within` (at 4 bits it can round most levels to 0)."""
        step = self.clip_range / self.levels
        norm = float(np.sqrt(np.dot(q.astype(np.float64), q.astype(np.float64)))) * step
        if norm <= norm_bound:
            return q
        return np.trunc(q * (norm_bound / norm)).astype(np.int64)

    def expected_sq_norm(self, vec: np.ndarray) -> float:
        """E‖decode(quantize(vec))‖² of unbiased stochastic rounding: each level is ⌊y⌋ + Bernoulli(f)
        with f the fractional part, so E[q²] = ⌊y⌋² + f·(2⌊y⌋ + 1)."""
        y = np.abs(np.clip(np.asarray(vec, np.float64), -self.clip_range, self.clip_range)) * (
            self.levels / self.clip_range
        )
        low = np.floor(y)
        frac = y - low
        step = self.clip_range / self.levels
        return float(np.sum(low * low + frac * (2 * low + 1))) * step * step

    def quantize_within(self, vec: np.ndarray, rng, norm_bound: float):
        """(levels whose decoded norm is at most `norm_bound`, the scale applied first, the share of
        values clipped to the range). Stochastic rounding moves each value by up to a level, which
        can carry a vector of norm C well past C (1.53·C at 4 bits on the default adapter, with
        privacy.secagg.clip_range 0.1). A draw within C is sent as it is; otherwise the vector is
        scaled until its expected rounded norm² — exact, by bisection — is 99%, 97%, 90%, 75%,
        then 50% of C², and drawn again at each; the last resort is `bound`. What is sent never
        exceeds C, and it shrinks only as much as the rounding needs."""
        x = np.asarray(vec, np.float64)
        step = self.clip_range / self.levels

        def within(q) -> bool:
            return float(np.linalg.norm(q.astype(np.float64))) * step <= norm_bound

        q, clipped = self.quantize(x, rng)
        if within(q):
            return q, 1.0, clipped
        for share in (0.99, 0.97, 0.9, 0.75, 0.5):
            target = share * norm_bound * norm_bound
            lo, hi = 0.0, 1.0
            for _ in range(30):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if self.expected_sq_norm(x * mid) <= target else (lo, mid)
            q, clipped = self.quantize(x * lo, rng)
            if within(q):
                return q, lo, clipped
        return self.bound(q, norm_bound), lo, clipped

    def to_ring(self, q: np.ndarray) -> np.ndarray:
        """Signed integers as elements of the ring 2^bits."""
        return (np.asarray(q, np.int64) % self.modulus).astype(np.uint64)

    def encode(self, vec: np.ndarray, rng) -> tuple[np.ndarray, float]:
        """(ring elements, share of values that had to be clipped to ±clip_range)."""
        q, clipped = self.quantize(vec, rng)
        return self.to_ring(q), clipped

    def signed(self, total: np.ndarray) -> np.ndarray:
        """Ring elements as the signed integers they stand for."""
        t = np.asarray(total, np.uint64).astype(np.int64)
        return np.where(t >= self.modulus // 2, t - self.modulus, t)

    def decode(self, total: np.ndarray) -> np.ndarray:
        """The signed sum of encoded values, back in the original units."""
        return self.signed(total).astype(np.float64) * (self.clip_range / self.levels)

    def add(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return (np.asarray(a, np.uint64) + np.asarray(b, np.uint64)) & np.uint64(self.modulus - 1)

    def sub(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        m = np.uint64(self.modulus)
        return (np.asarray(a, np.uint64) + (m - (np.asarray(b, np.uint64) & (m - 1)))) & (m - np.uint64(1))


def prg(seed: bytes, length: int, bits: int) -> np.ndarray:
    """`length` uniform elements of the ring 2^bits from the ChaCha20 keystream under a one-time
    32-byte key (every key here is fresh per round, so the zero nonce never repeats)."""
    width = bits // 8
    encryptor = Cipher(algorithms.ChaCha20(seed, b"\x00" * 16), mode=None).encryptor()
    stream = encryptor.update(b"\x00" * (length * width))
    return np.frombuffer(stream, dtype={1: np.uint8, 2: np.uint16, 4: np.uint32}[width]).astype(np.uint64)


# --- Shamir secret sharing over GF(2^521 − 1) ---------------------------------------------------


def shamir_split(secret: bytes, threshold: int, xs: list[int]) -> dict[int, int]:
    """{x: f(x)} for a random polynomial f of degree threshold − 1 with f(0) = secret; any
    `threshold` shares rebuild it, fewer reveal nothing. xs must be distinct and non-zero."""
    if not 1 <= threshold <= len(xs) or len(set(xs)) != len(xs) or 0 in xs:
        raise ValueError(f"threshold {threshold} of {len(xs)} distinct non-zero points")
    coeffs = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    out = {}
    for x in xs:
        y = 0
        for c in reversed(coeffs):
            y = (y * x + c) % PRIME
        out[x] = y
    return out


def shamir_join(shares: dict[int, int], threshold: int, size: int = 32) -> bytes:
    """The secret from at least `threshold` shares {x: y} (Lagrange interpolation at 0)."""
    if len(shares) < threshold:
        raise SecAggError(f"{len(shares)} shares, {threshold} needed")
    points = list(shares.items())[:threshold]
    secret = 0
    for j, (xj, yj) in enumerate(points):
        num, den = 1, 1
        for m, (xm, _) in enumerate(points):
            if m != j:
                num = num * (-xm) % PRIME
                den = den * (xj - xm) % PRIME
        secret = (secret + yj * num * pow(den, -1, PRIME)) % PRIME
    if secret >= 2 ** (8 * size):
        raise SecAggError("the shares do not rebuild a secret of the right size (a corrupted share?)")
    return secret.to_bytes(size, "big")


# --- keys ------------------------------------------------------------------------------------


def _kdf(shared: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


def agree(secret_key: bytes, peer_public: bytes, info: bytes) -> bytes:
    """A 32-byte key both ends derive: HKDF(X25519(sk_u, pk_v)), `info` naming its use."""
    shared = X25519PrivateKey.from_private_bytes(secret_key).exchange(X25519PublicKey.from_public_bytes(peer_public))
    return _kdf(shared, info)


def _keypair() -> tuple[bytes, bytes]:
    sk = X25519PrivateKey.generate()
    return (
        sk.private_bytes(RAW, serialization.PrivateFormat.Raw, serialization.NoEncryption()),
        sk.public_key().public_bytes(RAW, serialization.PublicFormat.Raw),
    )


def public_of(secret_key: bytes) -> bytes:
    return (
        X25519PrivateKey.from_private_bytes(secret_key).public_key().public_bytes(RAW, serialization.PublicFormat.Raw)
    )


def _info(kind: str, round_: int, u: int, v: int) -> bytes:
    lo, hi = min(u, v), max(u, v)  # symmetric: both ends derive the same key
    return f"fl_llm secagg {kind} round={round_} pair={lo},{hi}".encode()


def pairwise_mask(secret_key: bytes, peer_public: bytes, round_: int, u: int, v: int, length: int, bits: int):
    """PRG(s_uv): the mask u and v share; u adds it if u < v, subtracts it otherwise."""
    return prg(agree(secret_key, peer_public, _info("mask", round_, u, v)), length, bits)


# --- the platform's side ----------------------------------------------------------------------


@dataclass
class SecAggClient:
    """One platform's state for one round of the protocol (fresh keys every round)."""

    me: int
    round: int
    threshold: int
    c_secret: bytes = b""
    s_secret: bytes = b""
    keys: dict[int, dict[str, bytes]] = field(default_factory=dict)  # U1: the peers' public keys
    inbox: dict[int, bytes] = field(default_factory=dict)  # encrypted shares addressed to me
    own: tuple[int, int] = (0, 0)  # my own (b, s) shares
    self_seed: bytes = b""
    revealed: bool = False

    def advertise(self) -> dict[str, bytes]:
        """Step 0: fresh transport and mask key pairs; the public halves go to the driver."""
        self.c_secret, c_public = _keypair()
        self.s_secret, s_public = _keypair()
        return {"c": c_public, "s": s_public}

    def share(self, keys: dict[int, dict[str, bytes]]) -> dict[int, bytes]:
        """Step 1: {peer: AEAD(b-share, s-share)} for every other party in `keys` (U1)."""
        if self.me not in keys or len(keys) < self.threshold:
            raise SecAggError(f"round {self.round}: {len(keys)} parties advertised keys, {self.threshold} needed")
        self.keys = {int(k): v for k, v in keys.items()}
        self.self_seed = os.urandom(32)
        xs = [v + 1 for v in sorted(self.keys)]
        b_shares = shamir_split(self.self_seed, self.threshold, xs)
        s_shares = shamir_split(self.s_secret, self.threshold, xs)
        self.own = (b_shares[self.me + 1], s_shares[self.me + 1])
        out = {}
        for v in sorted(self.keys):
            if v == self.me:
                continue
            key = agree(self.c_secret, self.keys[v]["c"], _info("shares", self.round, self.me, v))
            plain = struct.pack(">II", self.me, v) + _b(b_shares[v + 1]) + _b(s_shares[v + 1])
            nonce = os.urandom(12)
            out[v] = nonce + ChaCha20Poly1305(key).encrypt(nonce, plain, _aad(self.round, self.me, v))
        return out

    def mask(self, encoded: np.ndarray, inbox: dict[int, bytes], ring: Ring) -> np.ndarray:
        """Step 2: y = x + PRG(b) ± Σ PRG(s_uv) over the parties whose shares reached me (U2)."""
        inbox = {int(k): v for k, v in inbox.items()}
        if not set(inbox) <= set(self.keys) or self.me in inbox:
            raise SecAggError(f"round {self.round}: shares from parties that advertised no keys")
        if len(inbox) + 1 < self.threshold:
            raise SecAggError(f"round {self.round}: shares from {len(inbox) + 1} parties, {self.threshold} needed")
        self.inbox = inbox
        y = ring.add(encoded, prg(self.self_seed, len(encoded), ring.bits))
        for v in sorted(inbox):
            p = pairwise_mask(self.s_secret, self.keys[v]["s"], self.round, self.me, v, len(encoded), ring.bits)
            y = ring.add(y, p) if self.me < v else ring.sub(y, p)
        return y.astype(ring.dtype)

    def reveal(self, survivors: list[int], dropped: list[int]) -> dict[str, dict[int, int]]:
        """Step 3: my b-shares of the survivors and s-shares of the dropped — once per round,
        never both for one party, and only when at least t parties survived."""
        s, d = set(survivors), set(dropped)
        if self.revealed:
            raise SecAggError(f"round {self.round}: shares were already revealed")
        if s & d or self.me not in s:
            raise SecAggError(
                f"round {self.round}: a party listed as both survivor and dropped, or I am not a survivor"
            )
        if not (s | d) <= set(self.inbox) | {self.me}:
            raise SecAggError(f"round {self.round}: asked about parties whose shares I do not hold")
        if len(s) < self.threshold:
            raise SecAggError(f"round {self.round}: {len(s)} survivors, {self.threshold} needed")
        self.revealed = True
        out: dict[str, dict[int, int]] = {"b": {}, "s": {}}
        for u in sorted(s | d):
            if u == self.me:
                b_share, s_share = self.own
            else:
                key = agree(self.c_secret, self.keys[u]["c"], _info("shares", self.round, u, self.me))
                blob = self.inbox[u]
                plain = ChaCha20Poly1305(key).decrypt(blob[:12], blob[12:], _aad(self.round, u, self.me))
                if struct.unpack(">II", plain[:8]) != (u, self.me):
                    raise SecAggError(f"round {self.round}: a share from {u} names the wrong parties")
                b_share = int.from_bytes(plain[8 : 8 + SHARE_BYTES], "big")
                s_share = int.from_bytes(plain[8 + SHARE_BYTES :], "big")
            if u in s:
                out["b"][u] = b_share
            else:
                out["s"][u] = s_share
        return out


def _b(share: int) -> bytes:
    return share.to_bytes(SHARE_BYTES, "big")


def _aad(round_: int, sender: int, receiver: int) -> bytes:
    return f"fl_llm secagg shares round={round_} from={sender} to={receiver}".encode()


# --- the driver's side --------------------------------------------------------------------------


def masked_sum(masked: list[np.ndarray], ring: Ring) -> np.ndarray:
    total = np.zeros(len(masked[0]), np.uint64)
    for y in masked:
        total = ring.add(total, y)
    return total


def unmask(
    total: np.ndarray,
    reveals: dict[int, dict[str, dict[int, int]]],
    survivors: list[int],
    dropped: list[int],
    keys: dict[int, dict[str, bytes]],
    threshold: int,
    round_: int,
    ring: Ring,
) -> np.ndarray:
    """Step 4: Σ_{u ∈ survivors} x_u mod 2^bits from the masked sum of the survivors' y_u and the
    shares `reveals` = {revealer: {"b": {u: share}, "s": {u: share}}} of at least t revealers."""
    if len(reveals) < threshold:
        raise SecAggError(f"round {round_}: {len(reveals)} parties revealed shares, {threshold} needed")
    length = len(total)
    for u in survivors:
        seed = shamir_join({v + 1: r["b"][u] for v, r in reveals.items() if u in r["b"]}, threshold)
        total = ring.sub(total, prg(seed, length, ring.bits))
    for u in dropped:
        secret = shamir_join({v + 1: r["s"][u] for v, r in reveals.items() if u in r["s"]}, threshold)
        if public_of(secret) != keys[u]["s"]:
            raise SecAggError(f"round {round_}: the rebuilt mask key of party {u} does not match its public key")
        for v in survivors:  # v added +PRG(s_uv) if v < u, −PRG(s_uv) if v > u: take it back out
            p = pairwise_mask(secret, keys[v]["s"], round_, u, v, length, ring.bits)
            total = ring.sub(total, p) if v < u else ring.add(total, p)
    return total
