"""The driver's disk writes for a round, off the round's critical path.

A round ends with three writes: the evaluated model (a PEFT adapter of the global state; with
FedEx/FLoRA also the merged base), the full-state checkpoint, and the metrics line — in that
order, so that a crash between them is redone from the checkpoint. For an 8B model with 8
platforms that is ~0.3 GB a round (adapter and checkpoint, each 168 MB), with an fsync.

`RoundWriter` does them on one background thread while the next round trains. At most one
round's writes are pending: `submit` first waits for the previous round's (and raises its error
on the driver's thread), so a slow disk shows up as the driver's own time, never as lost
rounds. What it writes is a snapshot taken on the driver's thread: the state's containers are
copied (`checkpoint.freeze`), its arrays are shared — the driver replaces arrays, it never
changes one in place.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from fl_llm import checkpoint
from fl_llm.data.sources import task_of
from fl_llm.model.adapters import save_adapter
from fl_llm.model.build import is_builtin, save_base
from fl_llm.tracking import RunDir


class RoundWriter:
    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fl-llm-writer")
        self._pending: Future | None = None

    def wait(self) -> None:
        """Until the last submitted round is on disk; its error, if any, is raised here."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def submit(self, write: Callable[[], None]) -> None:
        self.wait()
        self._pending = self._pool.submit(write)

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)


def write_round(cfg, rd: RunDir, rnd: int, *, model, deltas, base_name, rank, frozen, record, samples=None) -> None:
    """Round `rnd`'s files, on the writer thread: exactly what was evaluated — the global adapter
    (standard PEFT; None for FedSA, whose platforms wrote their own) and, once merges exist, the
    base weights with them folded in (built-in model: base_model/; otherwise
    base_delta.safetensors) — then the checkpoint, then the metrics line: a crash in between is
    redone from the checkpoint. `samples`: the platforms' sample generations, appended to
    samples.jsonl (one line per platform and round)."""
    if model is not None:
        save_adapter(model, cfg.model, rd.adapter, base_name, rank=rank)
    if deltas is not None:
        save_base_deltas(cfg, rd, deltas)
    if frozen is not None:
        checkpoint.write(rd.checkpoints, rnd, frozen, keep=cfg.checkpoint.keep)
    if samples:
        import json

        with open(rd.path / "samples.jsonl", "a", encoding="utf-8") as f:
            for name, rows in samples.items():
                f.write(json.dumps({"round": rnd, "platform": name, "samples": rows}, ensure_ascii=False) + "\n")
    rd.log_round(record)


def save_base_deltas(cfg, rd: RunDir, deltas: dict[str, np.ndarray]) -> None:
    if is_builtin(cfg.model):
        save_base(cfg.model, cfg.seed, rd.base_model, num_labels=len(task_of(cfg).verbalizer), deltas=deltas)
    else:
        from safetensors.numpy import save_file

        tmp = rd.path / ".base_delta.safetensors.tmp"
        save_file({k: np.ascontiguousarray(v) for k, v in deltas.items()}, str(tmp))
        tmp.replace(rd.path / "base_delta.safetensors")
