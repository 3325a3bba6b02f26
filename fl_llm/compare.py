"""`fl-llm compare`: does joining the federation pay? The same budget three ways.

- local-only:  each platform trains its own adapter on its own data, never shares;
- federated:   the normal run (`server/loop.py`);
- centralized: one adapter trained on every platform's data pooled — impossible in reality
  (the data may not leave its platform), measured only as the upper bound.

Same budget: every mode runs `server.rounds` rounds of `client.local_steps` optimizer steps, with
the same learning-rate schedule. A platform's step takes `client.batch_size` examples; the pooled
trainer's step takes `num_platforms x batch_size` drawn from everyone's data — the examples all
platforms see in a federated round, as one data-parallel trainer on the same machines would. So
centralized differs from federated only in where the data sits. Every mode is evaluated, each
round, on every platform's own held-out split. Writes
`comparison.json` and `comparison.png` in the output dir; the federated run's own run dir is
`<output dir>/federated`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from fl_llm.client.platform import Platform
from fl_llm.config import RunConfig, to_dict
from fl_llm.data.sources import POOLED, task_of
from fl_llm.progress import Progress
from fl_llm.server.backends import make_backend
from fl_llm.server.loop import SETUP_TIMEOUT_S, run
from fl_llm.tracking import read_metrics, write_json

MODES = ("local", "federated", "centralized")


def _apply(state: dict, update: dict) -> dict:
    return {k: state[k] + update[k] for k in state}


def _weighted_average(per_platform: dict[str, dict], sizes: dict[str, int], metric: str) -> float:
    pairs = [(m.get(metric), sizes[n]) for n, m in per_platform.items()]
    pairs = [(v, w) for v, w in pairs if v is not None and v == v]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else float("nan")


def compare(cfg: RunConfig, out_dir: Path, progress: Progress | None = None) -> dict:
    progress = progress or Progress(enabled=False)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metric = task_of(cfg).primary
    n, rounds = cfg.data.num_platforms, cfg.server.rounds
    ids = list(range(n))
    timeout = cfg.server.round_timeout_s
    per_round: dict[str, list[dict[str, dict]]] = {m: [] for m in MODES}

    # --- federated: the real thing ------------------------------------------------------------
    progress.info("== federated ==")
    run(cfg, out_dir / "federated", progress)
    for row in read_metrics(out_dir / "federated"):
        per_round["federated"].append(row["platforms"])

    # --- local-only and centralized, on the same platforms --------------------------------------
    progress.info("== local-only and centralized (pooled data, upper bound) ==")
    backend = make_backend(cfg)
    try:
        info = backend.call(ids, "describe", timeout_s=SETUP_TIMEOUT_S).results
        names = {i: info[i]["name"] for i in ids}
        init = backend.call([0], "initial_adapter", timeout_s=SETUP_TIMEOUT_S).results[0]
        pooled_cfg = to_dict(dataclasses.replace(cfg, backend="local"))
        pooled_cfg["client"]["batch_size"] = cfg.client.batch_size * n
        pooled = Platform(pooled_cfg, POOLED)
        local = {i: init for i in ids}
        central = init
        for rnd in range(1, rounds + 1):
            progress.phase(f"round {rnd}/{rounds}: local-only training")
            trained = backend.call_each({i: (local[i], rnd) for i in ids}, "train", timeout_s=timeout).results
            local = {i: _apply(local[i], trained[i]["update"]) if i in trained else local[i] for i in ids}
            ev = backend.call_each({i: (local[i],) for i in ids}, "evaluate", timeout_s=timeout).results
            per_round["local"].append({names[i]: ev[i] for i in ev})
            progress.phase(f"round {rnd}/{rounds}: centralized training on pooled data")
            central = _apply(central, pooled.train(central, rnd)["update"])
            ev = backend.call(ids, "evaluate", backend.put(central), timeout_s=timeout).results
            per_round["centralized"].append({names[i]: ev[i] for i in ev})
            line = "  ".join(
                f"{m} {_weighted_average(per_round[m][rnd - 1], sizes_of(per_round[m][rnd - 1]), metric):.3f}"
                for m in ("local", "centralized")
            )
            progress.info(f"round {rnd:>3}/{rounds}  {metric}: {line}")
    finally:
        backend.shutdown()
        progress.close()

    result = _result(cfg, metric, per_round)
    write_json(out_dir / "comparison.json", result)
    _plot(result, out_dir / "comparison.png")
    progress.info(format_table(result))
    return result


def sizes_of(per_platform: dict[str, dict]) -> dict[str, int]:
    return {name: int(m.get("num_eval", 1)) for name, m in per_platform.items()}


def _result(cfg: RunConfig, metric: str, per_round: dict) -> dict:
    modes = {}
    for mode in MODES:
        final = per_round[mode][-1]
        sizes = sizes_of(final)
        keys = sorted({k for m in final.values() for k in m} - {"num_eval", "eval_seconds"})
        modes[mode] = {
            "platforms": {name: {k: m.get(k) for k in keys} for name, m in final.items()},
            "average": {k: _weighted_average(final, sizes, k) for k in keys},
            "per_round": [_weighted_average(r, sizes_of(r), metric) for r in per_round[mode]],
        }
    lo, fed, hi = (modes[m]["average"][metric] for m in MODES)
    gap = hi - lo
    return {
        "task": cfg.data.task,
        "metric": metric,
        "rounds": cfg.server.rounds,
        "partition": dataclasses.asdict(cfg.data.partition),
        "modes": modes,
        "federated_minus_local": fed - lo,
        "gap_closed": (fed - lo) / gap if gap > 0 else float("nan"),
    }


def format_table(result: dict) -> str:
    metric = result["metric"]
    modes = result["modes"]
    names = list(modes["federated"]["platforms"])
    width = max(12, *(len(x) for x in names))
    lines = [f"{'platform':<{width}}  {'local-only':>10}  {'federated':>10}  {'centralized':>11}   ({metric})"]
    for name in names:
        vals = [modes[m]["platforms"].get(name, {}).get(metric) for m in MODES]
        lines.append(
            f"{name:<{width}}  "
            + "  ".join(f"{v if v is not None else float('nan'):>{w}.4f}" for v, w in zip(vals, (10, 10, 11)))
        )
    avg = [modes[m]["average"][metric] for m in MODES]
    lines.append(f"{'average':<{width}}  " + "  ".join(f"{v:>{w}.4f}" for v, w in zip(avg, (10, 10, 11))))
    closed = result["gap_closed"]
    if closed == closed:
        lines.append(f"federated closes {100 * closed:.0f}% of the gap between local-only and centralized")
    return "\n".join(lines)


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    labels = {"local": "local-only", "federated": "federated", "centralized": "centralized (upper bound)"}
    for mode in MODES:
        ys = result["modes"][mode]["per_round"]
        ax.plot(range(1, len(ys) + 1), ys, marker="o", markersize=3, label=labels[mode])
    ax.set_xlabel("round")
    ax.set_ylabel(f"{result['metric']} (held-out, averaged over platforms)")
    ax.set_title(f"{result['task']}: local-only vs federated vs centralized")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
