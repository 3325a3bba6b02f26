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


MARKER = ".fl_llm-run"  # written into every directory fl_llm makes for a run or a comparison


class RunDir:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.marker = self.path / MARKER
        self.lock_file = self.path / ".lock"
        self.config = self.path / "config.yaml"
        self.metrics = self.path / "metrics.jsonl"
        self.summary = self.path / "summary.json"
        self.platforms = self.path / "platforms.json"
        self.adapter = self.path / "adapter"
        self.init_adapter = self.path / "init_adapter"  # model.init_adapter as the run read it
        self.base_model = self.path / "base_model"
        self.checkpoints = self.path / "checkpoints"
        self.platform_states = self.path / "platforms"  # each platform's own state dir, by default

    def mark(self) -> None:
        """Say that fl_llm made this directory: only such a directory may be replaced (--overwrite)."""
        if not self.marker.exists():
            write_atomic(self.marker, json.dumps({"made_by": "fl_llm"}) + "\n")

    @property
    def is_fl_llm(self) -> bool:
        return self.marker.is_file()

    @contextlib.contextmanager
    def lock(self):
        """Hold the run directory for one process at a time, for as long as the run lasts: a second
        `fl-llm run --resume` on it is refused (exit 2) naming the process that holds it."""
        import fcntl

        from fl_llm.errors import UserError

        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UserError(
                f"run dir {str(self.path)!r} is in use by another fl-llm process (pid {holder}); wait for it "
                "to finish or stop it, or choose another output_dir"
            ) from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def holder(self) -> int | None:
        """The pid holding the lock now, or None when the run dir is free."""
        import fcntl

        if not self.lock_file.is_file():
            return None
        fd = os.open(self.lock_file, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        except BlockingIOError:
            text = os.pread(fd, 64, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else -1
        finally:
            os.close(fd)

    def save_config(self, cfg_dict: dict) -> None:
        write_atomic(self.config, yaml.safe_dump(cfg_dict, sort_keys=False, allow_unicode=True))

    def log_round(self, record: dict) -> None:
        with open(self.metrics, "a", encoding="utf-8") as f:
            f.write(json.dumps(_clean(record), ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def rewrite_metrics(self, rows: list[dict]) -> None:
        """Replace metrics.jsonl with `rows` (a resumed run: the checkpoint's history), and keep
        only the sample generations of those rounds (the later ones are generated again)."""
        write_atomic(self.metrics, "".join(json.dumps(_clean(r), ensure_ascii=False) + "\n" for r in rows))
        samples = self.path / "samples.jsonl"
        if samples.is_file():
            last = max((r["round"] for r in rows), default=0)
            kept = []
            for line in samples.read_text(encoding="utf-8").splitlines():
                try:
                    if json.loads(line)["round"] <= last:
                        kept.append(line + "\n")
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a line cut short when the run was killed
            write_atomic(samples, "".join(kept))


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
