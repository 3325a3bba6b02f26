"""Full-state checkpoints: everything the driver needs to continue a run exactly.

A checkpoint is a directory `checkpoints/round-00005/` holding

- `arrays.npz`: every numpy array of the state (the global adapter, a server optimizer's moments,
  per-platform state such as control variates), stored exactly (no pickle);
- `state.json`: the rest — round, counters, failure record, byte meter, metrics so far — with
  `{"__array__": n}` where an array sits in the tree.

It is written into a temporary directory and renamed into place, so a reader (and `--resume`)
sees either the whole checkpoint or none of it; a crash mid-write leaves only a `.tmp-*`
directory, which the next save removes. No RNG state needs saving: every random draw in fl_llm
is made from a generator seeded by (seed, round, platform), so the round number is the RNG state.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = 1
_NAME = re.compile(r"^round-(\d+)$")


def _split(tree: Any, arrays: list[np.ndarray]) -> Any:
    """The JSON-able skeleton of `tree`, with its arrays moved into `arrays`."""
    if isinstance(tree, np.ndarray):
        arrays.append(tree)
        return {"__array__": len(arrays) - 1}
    if isinstance(tree, dict):
        return {str(k): _split(v, arrays) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_split(v, arrays) for v in tree]
    if isinstance(tree, np.generic):
        return tree.item()
    return tree


def _join(tree: Any, arrays) -> Any:
    if isinstance(tree, dict):
        if set(tree) == {"__array__"}:
            return arrays[f"a{tree['__array__']}"]
        return {k: _join(v, arrays) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_join(v, arrays) for v in tree]
    return tree


def save(root: Path, round_: int, state: dict, keep: int = 2) -> Path:
    """Write `state` (nested dicts/lists of arrays, numbers, strings) as round `round_`'s checkpoint."""
    return write(root, round_, freeze(state), keep)


def freeze(state: dict) -> tuple[Any, list[np.ndarray]]:
    """`state` as (its JSON-able skeleton, its arrays): a snapshot whose containers later changes
    to `state` cannot reach, for `write` on another thread. The arrays are shared, not copied —
    fl_llm never changes an array in place once it is part of the driver's state."""
    arrays: list[np.ndarray] = []
    return _split(state, arrays), arrays


def write(root: Path, round_: int, frozen: tuple[Any, list[np.ndarray]], keep: int = 2) -> Path:
    """Write a `freeze`d state as round `round_`'s checkpoint (temp dir, then rename)."""
    skeleton, arrays = frozen
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-round-{round_:05d}-", dir=root))
    with open(tmp / "arrays.npz", "wb") as f:
        np.savez(f, **{f"a{i}": a for i, a in enumerate(arrays)})
        f.flush()
        os.fsync(f.fileno())
    with open(tmp / "state.json", "w", encoding="utf-8") as f:
        json.dump({"format": FORMAT, "round": round_, "state": skeleton}, f)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o755)
    final = root / f"round-{round_:05d}"
    if final.exists():  # a round redone after a resume: replace it whole
        shutil.rmtree(final)
    os.rename(tmp, final)
    for old in all_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def all_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest(root: Path) -> Path | None:
    found = all_checkpoints(root)
    return found[-1] if found else None


def load(path: Path) -> tuple[int, dict]:
    """(round, state) of one checkpoint directory."""
    path = Path(path)
    meta = json.loads((path / "state.json").read_text(encoding="utf-8"))
    if meta.get("format") != FORMAT:
        raise ValueError(f"checkpoint {path} has format {meta.get('format')}, this fl_llm reads {FORMAT}")
    with np.load(path / "arrays.npz", allow_pickle=False) as arrays:
        state = _join(meta["state"], {k: arrays[k] for k in arrays.files})
    return int(meta["round"]), state
