"""Compressed uplink: what a platform sends instead of its float32 update.

    fp16, bf16   cast each value (2 bytes); bf16 keeps float32's range, fp16 its precision
    int8, int4   stochastic rounding to 8 / 4-bit integers with one float32 scale per group of
                 GROUP values: unbiased (E[decode(encode(x))] = x), |error| < one scale step
    topk         the `fraction` largest-magnitude values of update + residual, with error
                 feedback (Stich et al., NeurIPS 2018; Karimireddy et al., ICML 2019): the
                 platform keeps e ← p − topk(p), p = e + Δ, and adds it to its next update

A payload is a dict of numpy arrays plus the codec name; `payload_nbytes` counts the arrays,
which is what would cross the network (the tensor layout is known to both sides: it is the
global adapter's). Pure functions; the platform calls `compress`, the driver `decompress`.
"""

from __future__ import annotations

import numpy as np

from fl_llm.tensors import AdapterState, flatten, unflatten

CODECS = ("none", "fp16", "bf16", "int8", "int4", "topk")
GROUP = 256  # values per int8/int4 scale: 4 bytes of scale per 256 values (1.6% for int8)
LEVELS = {"int8": 127, "int4": 7}  # symmetric integer range per value


def _flat(update: AdapterState) -> tuple[np.ndarray, list[tuple[str, tuple[int, ...]]]]:
    vec, layout = flatten([update])
    return vec[0].astype(np.float32), layout


def stochastic_round(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """⌊x + u⌋, u ~ U[0, 1): rounds up with probability frac(x), so E[result] = x."""
    return np.floor(x + rng.random(x.shape, dtype=np.float64)).astype(np.int64)


def quantize_groups(vec: np.ndarray, levels: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(integers in [−levels, levels], one scale per GROUP values): x ≈ q · scale, unbiased."""
    n = len(vec)
    padded = np.zeros(-(-n // GROUP) * GROUP, np.float64)
    padded[:n] = vec
    groups = padded.reshape(-1, GROUP)
    scales = np.abs(groups).max(axis=1) / levels
    safe = np.where(scales > 0, scales, 1.0)
    q = np.clip(stochastic_round(groups / safe[:, None], rng), -levels, levels)
    return q.reshape(-1)[:n], scales.astype(np.float32)


def dequantize_groups(q: np.ndarray, scales: np.ndarray) -> np.ndarray:
    n = len(q)
    padded = np.zeros(len(scales) * GROUP, np.float64)
    padded[:n] = q
    return (padded.reshape(-1, GROUP) * scales[:, None].astype(np.float64)).reshape(-1)[:n].astype(np.float32)


def _pack_int4(q: np.ndarray) -> np.ndarray:
    """Two signed 4-bit values per byte (offset by 8)."""
    u = (q + 8).astype(np.uint8)
    if len(u) % 2:
        u = np.append(u, np.uint8(8))
    return (u[0::2] | (u[1::2] << 4)).astype(np.uint8)


def _unpack_int4(packed: np.ndarray, n: int) -> np.ndarray:
    lo = (packed & 0x0F).astype(np.int64) - 8
    hi = (packed >> 4).astype(np.int64) - 8
    return np.stack([lo, hi], axis=1).reshape(-1)[:n]


def _to_bf16(vec: np.ndarray) -> np.ndarray:
    """float32 → bfloat16 bits (round to nearest even), as uint16."""
    bits = vec.astype(np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype(np.uint16)


def _from_bf16(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def compress(
    update: AdapterState,
    codec: str,
    rng: np.random.Generator,
    residual: AdapterState | None = None,
    fraction: float = 0.01,
) -> tuple[dict, AdapterState | None]:
    """(payload, the new error-feedback residual — topk only, else None)."""
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; one of {', '.join(CODECS)}")
    vec, layout = _flat(update)
    payload: dict = {"codec": codec, "layout": layout, "size": len(vec)}
    if codec == "none":
        payload["values"] = vec
    elif codec == "fp16":
        payload["values"] = vec.astype(np.float16)
    elif codec == "bf16":
        payload["values"] = _to_bf16(vec)
    elif codec in LEVELS:
        q, scales = quantize_groups(vec, LEVELS[codec], rng)
        payload["values"] = q.astype(np.int8) if codec == "int8" else _pack_int4(q)
        payload["scales"] = scales
    else:  # topk with error feedback
        if residual is not None:
            vec = vec + _flat(residual)[0]
        k = max(1, int(round(fraction * len(vec))))
        idx = np.sort(np.argpartition(np.abs(vec), len(vec) - k)[len(vec) - k :]).astype(np.int32)
        payload["indices"], payload["values"] = idx, vec[idx].astype(np.float32)
        rest = vec.copy()
        rest[idx] = 0.0
        return payload, unflatten(rest, layout)
    return payload, None


def decompress(payload: dict) -> AdapterState:
    codec, n = payload["codec"], int(payload["size"])
    if codec == "none":
        vec = np.asarray(payload["values"], np.float32)
    elif codec == "fp16":
        vec = np.asarray(payload["values"]).astype(np.float32)
    elif codec == "bf16":
        vec = _from_bf16(np.asarray(payload["values"]))
    elif codec in LEVELS:
        values = np.asarray(payload["values"])
        q = values.astype(np.int64) if codec == "int8" else _unpack_int4(values, n)
        vec = dequantize_groups(q, np.asarray(payload["scales"]))
    elif codec == "topk":
        vec = np.zeros(n, np.float32)
        vec[np.asarray(payload["indices"])] = payload["values"]
    else:
        raise ValueError(f"unknown codec {codec!r}")
    if len(vec) != n:
        raise ValueError(f"payload holds {len(vec)} values, its header says {n}")
    return unflatten(vec, payload["layout"])


def payload_nbytes(payload: dict) -> int:
    """Bytes on the wire: every array in the payload (the layout is the global adapter's, known)."""
    return int(sum(v.nbytes for v in payload.values() if isinstance(v, np.ndarray)))
