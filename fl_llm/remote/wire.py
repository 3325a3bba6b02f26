"""What crosses the network between a coordinator and a platform service: a fixed, inert format.

A message is ``MAGIC | u32 header length | JSON header | safetensors blob``. The JSON header holds
the structure (dicts with string keys, lists, strings, numbers, booleans, null; a dict with integer
keys — secure aggregation's party ids — as ``{"$i": [[key, value], ...]}``); every numpy
array, numpy scalar and byte string in it is replaced by a reference ``{"$t": "t7"}`` (``"$s"``
for a scalar, ``"$b"`` for bytes) to a tensor of the safetensors blob, which carries dtype and
shape. Decoding parses JSON and safetensors only: nothing is unpickled, no code crosses, and a
message larger than its limit, a tensor of a dtype outside `DTYPES`, a reference to a missing
tensor, a header nested deeper than `MAX_DEPTH` or a header that is not this structure is a
`WireError` before anything uses it.

`digest(state)` names an adapter state by its content (SHA-256 over keys, dtypes, shapes and
bytes): the coordinator sends a platform the global adapter once per version and refers to it by
digest afterwards (``{"$ref": ...}``), so the bytes on the wire match the adapter-size meter.
"""

from __future__ import annotations

import hashlib
import json
import struct

import numpy as np

MAGIC = b"FLW1"
MAX_DEPTH = 12
DTYPES = frozenset(
    {"float16", "float32", "float64", "bfloat16", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
     "uint64", "bool"}
)  # fmt: skip
RESERVED = ("$t", "$s", "$b", "$i")  # one-key dicts the format itself uses
CHUNK = 1 << 20  # bytes per gRPC stream message: a large adapter streams in 1 MiB pieces


class WireError(ValueError):
    """A message that is not a well-formed fl_llm message (malformed, oversized, unknown dtype)."""


def encode(obj) -> bytes:
    """`obj` (nested dicts/lists/tuples of JSON values, numpy arrays and scalars, bytes) as one message."""
    from safetensors.numpy import save

    tensors: dict[str, np.ndarray] = {}

    def walk(x, depth: int):
        if depth > MAX_DEPTH:
            raise WireError(f"nested deeper than {MAX_DEPTH}")
        if x is None or isinstance(x, (bool, str)):
            return x
        if isinstance(x, (int, float)) and not isinstance(x, np.generic):
            return x
        if isinstance(x, dict) and x and all(isinstance(k, int) and not isinstance(k, bool) for k in x):
            return {"$i": [[k, walk(v, depth + 2)] for k, v in x.items()]}  # integer keys (party ids)
        if isinstance(x, dict):
            if not all(isinstance(k, str) for k in x):
                raise WireError("dict keys must be all strings or all integers")
            if len(x) == 1 and next(iter(x)) in RESERVED:
                raise WireError(f"a one-key dict may not use the reserved key {next(iter(x))!r}")
            return {k: walk(v, depth + 1) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [walk(v, depth + 1) for v in x]
        if isinstance(x, (bytes, bytearray)):
            name = f"t{len(tensors)}"
            tensors[name] = np.frombuffer(bytes(x), dtype=np.uint8).copy()
            return {"$b": name}
        if isinstance(x, (np.ndarray, np.generic)):
            arr = np.asarray(x)
            if arr.dtype.name not in DTYPES:
                raise WireError(f"dtype {arr.dtype} does not cross the wire")
            name = f"t{len(tensors)}"
            tensors[name] = np.ascontiguousarray(arr.reshape(1) if arr.ndim == 0 else arr)
            return {"$s" if arr.ndim == 0 else "$t": name}
        raise WireError(f"{type(x).__name__} does not cross the wire")

    header = json.dumps(walk(obj, 0), separators=(",", ":")).encode()
    blob = save(tensors) if tensors else b""
    return MAGIC + struct.pack("<I", len(header)) + header + blob


def decode(data: bytes, max_bytes: int) -> object:
    """The object `encode` made of `data`; `WireError` for anything else."""
    if len(data) > max_bytes:
        raise WireError(f"message of {len(data)} bytes is over the limit of {max_bytes}")
    if len(data) < 8 or data[:4] != MAGIC:
        raise WireError("not an fl_llm message (bad magic)")
    (size,) = struct.unpack("<I", data[4:8])
    if 8 + size > len(data):
        raise WireError("truncated header")
    try:
        header = json.loads(data[8 : 8 + size].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise WireError(f"header is not JSON ({type(e).__name__})") from None
    tensors = _tensors(data[8 + size :])
    used: set[str] = set()

    def walk(x, depth: int):
        if depth > MAX_DEPTH:
            raise WireError(f"nested deeper than {MAX_DEPTH}")
        if isinstance(x, list):
            return [walk(v, depth + 1) for v in x]
        if not isinstance(x, dict):
            return x
        if len(x) == 1 and next(iter(x)) == "$i":
            pairs = x["$i"]
            if not isinstance(pairs, list) or not all(
                isinstance(p, list) and len(p) == 2 and type(p[0]) is int for p in pairs
            ):
                raise WireError("an integer-keyed dict is a list of [int, value] pairs")
            return {k: walk(v, depth + 2) for k, v in pairs}
        if len(x) == 1 and next(iter(x)) in ("$t", "$s", "$b"):
            ((kind, name),) = x.items()
            if not isinstance(name, str) or name not in tensors or name in used:
                raise WireError(f"reference to a missing tensor {name!r}")
            used.add(name)
            arr = tensors[name]
            if kind == "$b":
                if arr.dtype != np.uint8 or arr.ndim != 1:
                    raise WireError("bytes must be a 1-d uint8 tensor")
                return arr.tobytes()
            if kind == "$s":
                if arr.shape != (1,):
                    raise WireError("a scalar must be a 1-element tensor")
                return arr[0]
            return arr
        return {k: walk(v, depth + 1) for k, v in x.items()}

    out = walk(header, 0)
    if used != set(tensors):
        raise WireError("tensors the header does not refer to")
    return out


def _tensors(blob: bytes) -> dict[str, np.ndarray]:
    if not blob:
        return {}
    from safetensors.numpy import load

    try:
        tensors = load(blob)
    except Exception as e:  # safetensors raises its own error types for malformed input
        raise WireError(f"tensor blob is not safetensors ({type(e).__name__})") from None
    for name, arr in tensors.items():
        if arr.dtype.name not in DTYPES:
            raise WireError(f"dtype {arr.dtype} of {name!r} does not cross the wire")
    return tensors


def chunks(data: bytes, size: int = CHUNK):
    """`data` as the stream of pieces one call sends."""
    for start in range(0, max(len(data), 1), size):
        yield data[start : start + size]


def joined(pieces, max_bytes: int) -> bytes:
    """A streamed message put back together, stopped as soon as it passes `max_bytes`."""
    out, total = [], 0
    for piece in pieces:
        total += len(piece)
        if total > max_bytes:
            raise WireError(f"message over the limit of {max_bytes} bytes")
        out.append(piece)
    return b"".join(out)


def digest(state: dict) -> str:
    """The content name of an adapter state (keys, dtypes, shapes and bytes, keys sorted)."""
    h = hashlib.sha256()
    for k in sorted(state):
        arr = np.ascontiguousarray(state[k])
        h.update(f"{k}|{arr.dtype.str}|{arr.shape}|".encode())
        h.update(arr.tobytes())
    return h.hexdigest()
