"""`fl-llm bench --workers 1,2,4`: how one platform's training scales over workers of its own
(`ray.workers_per_platform`, `client.parallel`). For each N, a short federated run of one
platform with N workers; from its rounds after the first (warm-up): the platform's training
tokens/s (its tokens over its training time), each worker's tokens/s and peak memory, and the
scaling efficiency tokens/s(N) ÷ (N · tokens/s(1)). The config's other keys as given (with files, a config of one platform); same global batch
(`client.batch_size` is the platform's, split over its workers), so only the parallelism changes.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np


def scaling(cfg, workers: list[int], rounds: int) -> dict:
    """{"workers": {N: figures}, "parallel": mode} — one federated run per N (see the module)."""
    from fl_llm.config import from_dict, to_dict
    from fl_llm.server.loop import run
    from fl_llm.tracking import read_metrics

    out: dict = {"parallel": cfg.client.parallel, "batch_size": cfg.client.batch_size, "workers": {}}
    for n in workers:
        one = to_dict(cfg)  # one platform (the synthetic world's first), n workers, validated anew
        one["data"]["num_platforms"] = 1
        one["data"]["synthetic"]["train_examples"] = one["data"]["synthetic"]["train_examples"][:1]
        one["ray"]["workers_per_platform"], one["server"]["rounds"] = n, rounds
        one = from_dict(one)
        with tempfile.TemporaryDirectory(prefix="fl-llm-bench-") as tmp:
            run(one, Path(tmp) / "run")
            rows = read_metrics(Path(tmp) / "run")
        steady = [next(iter(r["platforms"].values())) for r in rows[1:] or rows]
        steady = [p for p in steady if p.get("participated")]
        figures = {
            "tokens_per_s": float(np.mean([p["tokens"] / p["train_seconds"] for p in steady])),
            "train_seconds": float(np.mean([p["train_seconds"] for p in steady])),
            "peak_memory_gib": max(p.get("peak_memory_bytes", 0) for p in steady) / 2**30,
        }
        if n > 1:
            figures["per_worker_tokens_per_s"] = [
                float(np.mean([p["workers"][r]["tokens_per_s"] for p in steady])) for r in range(n)
            ]
            figures["per_worker_peak_memory_gib"] = [
                max(p["workers"][r]["peak_memory_bytes"] for p in steady) / 2**30 for r in range(n)
            ]
        out["workers"][n] = figures
    base = out["workers"].get(1, {}).get("tokens_per_s")
    if base:
        for n, figures in out["workers"].items():
            figures["efficiency"] = figures["tokens_per_s"] / (n * base)
    return out


def scaling_lines(result: dict) -> list[str]:
    lines = [f"one platform on N workers ({result['parallel']}, batch {result['batch_size']} per platform step):"]
    for n, f in result["workers"].items():
        eff = f" efficiency {f['efficiency']:.0%}" if "efficiency" in f else ""
        lines.append(
            f"  N={n:<3} {f['tokens_per_s']:>10.0f} tokens/s{eff}  peak {f['peak_memory_gib']:.2f} GiB per worker"
        )
    return lines
