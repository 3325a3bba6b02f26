"""The run directory: config.yaml, metrics.jsonl, summary.json, platforms.json.

Every file is written whole or not at all (temp file + rename); metrics.jsonl is appended one
flushed line per round, so a reader (a notebook, `tail -f`) never sees half a round.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml


def _clean(obj: Any) -> Any:
    """JSON-safe: NaN/inf become null, numpy scalars become Python numbers."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_atomic(path: Path, text: str) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; run dirs are meant to be shared and read
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_dir(out_dir: Path):
    """Write a directory whole or not at all: yields a temporary sibling to fill, then swaps it
    in for `out_dir` (a reader sees the old directory or the new one, never a mix)."""
    out_dir = Path(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    tmp.chmod(0o755)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out_dir.with_name(f".{out_dir.name}-old")
    if out_dir.exists():
        shutil.rmtree(old, ignore_errors=True)
        out_dir.rename(old)
    tmp.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(_clean(obj), indent=2, ensure_ascii=False) + "\n")


class RunDir:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.config = self.path / "config.yaml"
        self.metrics = self.path / "metrics.jsonl"
        self.summary = self.path / "summary.json"
        self.platforms = self.path / "platforms.json"
        self.adapter = self.path / "adapter"
        self.init_adapter = self.path / "init_adapter"  # model.init_adapter as the run read it
        self.base_model = self.path / "base_model"
        self.checkpoints = self.path / "checkpoints"
        self.platform_states = self.path / "platforms"  # each platform's own state dir, by default

    def save_config(self, cfg_dict: dict) -> None:
        write_atomic(self.config, yaml.safe_dump(cfg_dict, sort_keys=False, allow_unicode=True))

    def log_round(self, record: dict) -> None:
        with open(self.metrics, "a", encoding="utf-8") as f:
            f.write(json.dumps(_clean(record), ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def rewrite_metrics(self, rows: list[dict]) -> None:
        """Replace metrics.jsonl with `rows` (a resumed run: the checkpoint's history)."""
        write_atomic(self.metrics, "".join(json.dumps(_clean(r), ensure_ascii=False) + "\n" for r in rows))


def read_metrics(run_dir: Path) -> list[dict]:
    """Every logged round; a last line cut short (the writer was killed mid-line) is ignored."""
    path = Path(run_dir) / "metrics.jsonl"
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = []
    for k, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if k < len(lines) - 1:
                raise
    return rows
