"""Full-state checkpoints: everything the driver needs to continue a run exactly.

A checkpoint is a directory `checkpoints/round-00005/` holding

- `arrays.npz`: every numpy array of the state (the global adapter, a server optimizer's moments,
  per-platform state such as control variates), stored exactly (no pickle);
- `state.json`: the rest — round, counters, failure record, byte meter, metrics so far — with
  `{"__array__": n}` where an array sits in the tree.

- `MANIFEST.json`: the SHA-256 of both files, written last.

It is written into a temporary directory, every file and the directory fsynced, and renamed into
place (a checkpoint of the same round, redone after a resume, is moved aside first and removed
after), so a reader (and `--resume`) sees either the whole checkpoint or none of it and there is
never a moment with neither the old nor the new one on disk; a crash mid-write leaves only a
`.tmp-*` directory, which the next save removes. `--resume` verifies the checksums before
anything starts and falls back to the newest intact checkpoint (`latest_intact`). No RNG state
needs saving: every random draw in fl_llm is made from a generator seeded by (seed, round,
platform) or drawn fresh from the OS (DP), so the round number is the RNG state.
"""

from __future__ import annotations

import hashlib
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
    with open(tmp / MANIFEST, "w", encoding="utf-8") as f:
        json.dump({name: _sha256(tmp / name) for name in FILES}, f)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o755)
    _fsync_dir(tmp)
    final = root / f"round-{round_:05d}"
    replaced = None
    if final.exists():  # a round redone after a resume: the old one stays until the new is in place
        replaced = root / f".tmp-replaced-{final.name}-{os.getpid()}"
        os.rename(final, replaced)
    os.rename(tmp, final)
    _fsync_dir(root)
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)
    for old in all_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


FILES = ("arrays.npz", "state.json")
MANIFEST = "MANIFEST.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def damage(path: Path) -> str | None:
    """Why the checkpoint at `path` cannot be trusted (a missing file, a checksum that does not
    match), or None when it is intact."""
    path = Path(path)
    manifest = path / MANIFEST
    if not manifest.is_file():  # written before checkpoints had checksums: it must at least load
        return _legacy_damage(path)
    try:
        sums = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return f"{MANIFEST} is unreadable ({e})"
    for name in FILES:
        if not (path / name).is_file():
            return f"{name} is missing"
        if _sha256(path / name) != sums.get(name):
            return f"{name} does not match its checksum (truncated or changed)"
    return None


def _legacy_damage(path: Path) -> str | None:
    try:
        json.loads((path / "state.json").read_text(encoding="utf-8"))
        with np.load(path / "arrays.npz", allow_pickle=False) as arrays:
            for k in arrays.files:
                arrays[k]
    except Exception as e:  # noqa: BLE001 - any failure to read it is damage
        return f"unreadable ({type(e).__name__}: {e})"
    return None


def latest_intact(root: Path, at_most: int | None = None) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(the newest intact checkpoint under `root` — of round `at_most` or earlier when given —,
    [(each newer damaged checkpoint, what is wrong with it)])."""
    skipped = []
    for path in reversed(all_checkpoints(root)):
        if at_most is not None and round_of(path) > at_most:
            continue
        why = damage(path)
        if why is None:
            return path, skipped
        skipped.append((path, why))
    return None, skipped


def round_of(path: Path) -> int:
    return int(_NAME.match(Path(path).name).group(1))


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


def load(path: Path, verified: bool = False) -> tuple[int, dict]:
    """(round, state) of one checkpoint directory; `verified`: its checksums were just checked
    (by `latest_intact`), so its files are not hashed a second time."""
    path = Path(path)
    why = None if verified else damage(path)
    if why is not None:
        raise ValueError(f"checkpoint {path} is damaged: {why}")
    meta = json.loads((path / "state.json").read_text(encoding="utf-8"))
    if meta.get("format") != FORMAT:
        raise ValueError(f"checkpoint {path} has format {meta.get('format')}, this fl_llm reads {FORMAT}")
    with np.load(path / "arrays.npz", allow_pickle=False) as arrays:
        state = _join(meta["state"], {k: arrays[k] for k in arrays.files})
    return int(meta["round"]), state
