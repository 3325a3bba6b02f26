"""DP randomness from a cryptographic generator: uniforms and Gaussians from a ChaCha20 keystream
keyed from the operating system (`privacy.dp.secure_rng=true`, the default).

Why not numpy's PCG64 or torch's MT19937 seeded from the OS: their state is small and their
output is linear (MT) or cheaply invertible, so whoever observes enough of the stream — or gets the
seed from a log or a core dump — can predict the rest and subtract the noise. A ChaCha20
keystream under a fresh 256-bit key is indistinguishable from random without the key, which
never leaves this object.

Gaussians by the Box-Muller transform (Box & Muller, Ann. Math. Stat. 1958) on 53-bit uniforms:
exact up to float64 rounding, with tails to ±8.5σ (√(−2 ln 2⁻⁵²)). Floating-point noise is not a
perfect Gaussian (Mironov, CCS 2012, showed the Laplace analogue leaks through its low bits); a
discrete Gaussian (Canonne, Kamath & Steinke, NeurIPS 2020) would close that, at a larger cost.
"""

from __future__ import annotations

import os

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

_BLOCK = 1 << 21  # values per keystream request: bounds the temporary memory (16 MiB a buffer)


class ChaChaRandom:
    """The subset of `numpy.random.Generator` that DP uses (`random`, `normal`), drawn from a
    ChaCha20 keystream. `key`: 32 bytes (default: fresh from os.urandom)."""

    def __init__(self, key: bytes | None = None):
        key = os.urandom(32) if key is None else key
        if len(key) != 32:
            raise ValueError("ChaChaRandom needs a 32-byte key")
        self._stream = Cipher(algorithms.ChaCha20(key, b"\x00" * 16), mode=None).encryptor()

    def _unit(self, n: int) -> np.ndarray:
        """n uniform floats in [1, 2): 52 random mantissa bits under the exponent of 1.0."""
        bits = np.frombuffer(bytearray(self._stream.update(b"\x00" * (8 * n))), dtype=np.uint64)
        bits >>= np.uint64(12)
        bits |= np.uint64(0x3FF0000000000000)
        return bits.view(np.float64)

    def random(self, size=None):
        """Uniform floats in [0, 1), 52 random bits each."""
        n = int(np.prod(size)) if size is not None else 1
        out = np.empty(n, np.float64)
        for s in range(0, n, _BLOCK):
            k = min(_BLOCK, n - s)
            np.subtract(self._unit(k), 1.0, out=out[s : s + k])
        return float(out[0]) if size is None else out.reshape(size)

    def normal(self, loc: float = 0.0, scale: float = 1.0, size=None):
        """N(loc, scale²) draws (Box-Muller: two uniforms make two independent standard normals)."""
        n = int(np.prod(size)) if size is not None else 1
        out = np.empty(n, np.float64)
        for s in range(0, n, 2 * _BLOCK):
            k = min(2 * _BLOCK, n - s)
            half = (k + 1) // 2
            r = self._unit(half)
            np.subtract(2.0, r, out=r)  # (0, 1]: the logarithm is finite
            np.log(r, out=r)
            r *= -2.0
            np.sqrt(r, out=r)
            angle = self._unit(half)
            angle -= 1.0
            angle *= 2 * np.pi
            out[s : s + half] = np.cos(angle)
            out[s : s + half] *= r
            rest = k - half
            np.sin(angle[:rest], out=out[s + half : s + k])
            out[s + half : s + k] *= r[:rest]
        if scale != 1.0:
            out *= scale
        if loc != 0.0:
            out += loc
        return float(out[0]) if size is None else out.reshape(size)


def dp_generator(secure: bool, seed_words: list[int]):
    """The generator for DP noise and sampling: ChaCha20 keyed from the OS (secure), or numpy's
    seeded from `seed_words` (reproducible runs for experiments and tests; anyone who knows the
    config can regenerate and subtract that noise)."""
    return ChaChaRandom() if secure else np.random.default_rng(seed_words)
