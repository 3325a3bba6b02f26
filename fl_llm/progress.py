"""What a person watching `fl-llm run` sees: a live status line and one line per round.

On a terminal the status line (current phase, elapsed time) is redrawn in place on stderr; the
per-round lines go to stdout, so `fl-llm run > log.txt` keeps just the log.
"""

from __future__ import annotations

import sys
import time


def fmt_value(x, spec: str = ".3f") -> str:
    return "  -  " if x is None or x != x else format(x, spec)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def incident_lines(record: dict) -> list[str]:
    """One line per thing that went wrong in a round, for the operator watching the log."""
    lines = []
    for a in record.get("attempts", []):
        lines.append(f"attempt {a['attempt'] + 1} had too few valid updates and was redone")
    for name, err in record.get("failed", {}).items():
        last = [x for x in str(err).strip().splitlines() if x.strip()]
        lines.append(f"{name}: failed: {last[-1][:200] if last else 'error'}")
    lines += [f"{name}: late, left out of this round" for name in record.get("late", [])]
    lines += [f"{name}: {why}" for name, why in record.get("rejected", {}).items()]
    lines += [f"{name}: restarted (new process)" for name in record.get("restarted", [])]
    lines += [f"{name}: evaluation failed: {str(e)[:200]}" for name, e in record.get("eval_failed", {}).items()]
    return lines


MAX_LISTED = 8  # more platforms than this: the round line gives the spread, metrics.jsonl each


def platforms_summary(platforms: dict[str, dict], metric: str) -> str:
    """Each platform's eval loss/metric — or, for a large federation, their min, median and max."""
    if len(platforms) <= MAX_LISTED:
        return "  ".join(
            f"{name} {fmt_value(p.get('eval_loss'), '.2f')}/{fmt_value(p.get(metric), '.2f')}"
            for name, p in platforms.items()
        )
    import numpy as np

    values = np.array([p.get(metric) for p in platforms.values() if isinstance(p.get(metric), (int, float))], float)
    values = values[np.isfinite(values)]
    if not len(values):
        return f"{len(platforms)} platforms"
    return (
        f"{len(platforms)} platforms, {metric} min {values.min():.2f} median {np.median(values):.2f} "
        f"max {values.max():.2f}"
    )


class Progress:
    def __init__(self, enabled: bool = True, out=None, err=None):
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.live = enabled and self.err.isatty()
        self.t0 = time.monotonic()
        self._status = ""

    def info(self, text: str) -> None:
        self._clear()
        print(text, file=self.out, flush=True)

    def warn(self, text: str) -> None:
        """Something the operator must not miss: in the log (stdout) and on the terminal."""
        self.info(f"WARNING: {text}")
        if self.err.isatty() and not self.out.isatty():
            print(f"fl-llm: WARNING: {text}", file=self.err, flush=True)

    def phase(self, text: str) -> None:
        """Redraw the live status line (terminal only)."""
        if not self.live:
            return
        line = f"  [{time.monotonic() - self.t0:6.1f}s] {text}"
        self.err.write("\r" + line.ljust(len(self._status)))
        self.err.flush()
        self._status = line

    def _clear(self) -> None:
        if self.live and self._status:
            self.err.write("\r" + " " * len(self._status) + "\r")
            self.err.flush()
            self._status = ""

    def round_line(self, record: dict, total_rounds: int) -> None:
        """`round  3/10  loss 1.602  auc 0.712 | fashion-mall 1.55/0.74 ... | 7.1 s`"""
        metric = record.get("metric", "auc")
        plats = platforms_summary(record["platforms"], metric)
        note = f"  ε {record['epsilon']:.2f}" if "epsilon" in record else ""
        if record.get("skipped"):
            note += f"  [skipped: {record['skipped']}]"
        elif record.get("late") or record.get("failed"):
            note += f"  [late {len(record.get('late', []))}, failed {len(record.get('failed', []))}]"
        self.info(
            f"round {record['round']:>3}/{total_rounds}  loss {fmt_value(record['eval_loss'])}  "
            f"{metric} {fmt_value(record.get(metric))}  |  {plats}  |  up {human_bytes(record['bytes_up'])} "
            f"down {human_bytes(record['bytes_down'])}  {record['seconds']['round']:.1f} s{note}"
        )
        for line in incident_lines(record):
            self.info(f"          ! {line}")

    def close(self) -> None:
        self._clear()
