"""The one home of adapter-state types and tensor helpers every layer uses (strategies, privacy,
compression, secure aggregation, the platform).

An adapter state maps PEFT keys (as in a saved adapter) to numpy arrays: what crosses a process
boundary, what a strategy combines, what a checkpoint holds.
"""

from __future__ import annotations

import numpy as np

AdapterState = dict[str, np.ndarray]
Layout = list[tuple[str, tuple[int, ...]]]


def flatten(updates: list[AdapterState]) -> tuple[np.ndarray, Layout]:
    """(n × D float64 matrix of the updates, the (key, shape) layout to undo it), keys sorted."""
    layout = [(k, updates[0][k].shape) for k in sorted(updates[0])]
    rows = [np.concatenate([u[k].astype(np.float64).ravel() for k, _ in layout]) for u in updates]
    return np.stack(rows), layout


def unflatten(vector: np.ndarray, layout: Layout) -> AdapterState:
    """The adapter state a flat vector holds, float32, in `layout`'s keys and shapes."""
    out, pos = {}, 0
    for k, shape in layout:
        size = int(np.prod(shape))
        out[k] = vector[pos : pos + size].reshape(shape).astype(np.float32)
        pos += size
    return out
