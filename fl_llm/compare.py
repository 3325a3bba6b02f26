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

Federated results move with the seed (the data, the split, the initial adapter), so one run
can mislead: `seeds=N` repeats the whole comparison for seeds seed..seed+N-1 (each in
`<output dir>/seed-<s>/`) and reports the mean and standard deviation over seeds.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from fl_llm.client.platform import Platform
from fl_llm.config import RunConfig, to_dict
from fl_llm.data.sources import POOLED, task_of
from fl_llm.model.adapters import starting_adapter
from fl_llm.progress import Progress
from fl_llm.server.backends import make_backend
from fl_llm.server.loop import SETUP_TIMEOUT_S, run
from fl_llm.strategies.lora import update_to_global_rank
from fl_llm.tracking import read_metrics, write_json

MODES = ("local", "federated", "centralized")


def _apply(cfg: RunConfig, platform: int, state: dict, update: dict) -> dict:
    """state + a platform's update (at its LoRA rank, on the tensors its strategy sends)."""
    lora = cfg.model.lora
    ranks = lora.ranks or [lora.r] * cfg.data.num_platforms
    rank = ranks[platform] if platform >= 0 else max(ranks)
    update = update_to_global_rank(update, state, rank, lora.alpha, max(ranks))
    return {k: state[k] + update[k] if k in update else state[k] for k in state}


def _weighted_average(per_platform: dict[str, dict], sizes: dict[str, int], metric: str) -> float:
    pairs = [(m.get(metric), sizes[n]) for n, m in per_platform.items()]
    pairs = [(v, w) for v, w in pairs if v is not None and v == v]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else float("nan")


def compare(cfg: RunConfig, out_dir: Path, progress: Progress | None = None, seeds: int = 1) -> dict:
    """Local-only vs federated vs centralized; over `seeds` seeds (mean and std) when > 1."""
    progress = progress or Progress(enabled=False)
    if seeds <= 1:
        return _compare_one(cfg, Path(out_dir), progress)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = []
    try:
        for s in range(cfg.seed, cfg.seed + seeds):
            progress.info(f"==== seed {s} ({s - cfg.seed + 1} of {seeds}) ====")
            runs.append(_compare_one(dataclasses.replace(cfg, seed=s), out_dir / f"seed-{s}", progress))
    finally:
        progress.close()
    result = over_seeds(runs)
    write_json(out_dir / "comparison.json", result)
    _plot(result, out_dir / "comparison.png")
    progress.info(format_table(result))
    return result


def _compare_one(cfg: RunConfig, out_dir: Path, progress: Progress) -> dict:
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
        init = starting_adapter(cfg.model, backend.call([0], "initial_adapter", timeout_s=SETUP_TIMEOUT_S).results[0])
        pooled_cfg = to_dict(dataclasses.replace(cfg, backend="local"))
        pooled_cfg["client"]["batch_size"] = cfg.client.batch_size * n
        pooled = Platform(pooled_cfg, POOLED)
        local = {i: init for i in ids}
        central = init
        for rnd in range(1, rounds + 1):
            progress.phase(f"round {rnd}/{rounds}: local-only training")
            trained = backend.call_each({i: (local[i], rnd) for i in ids}, "train", timeout_s=timeout).results
            local = {i: _apply(cfg, i, local[i], _update(trained[i])) if i in trained else local[i] for i in ids}
            ev = backend.call_each({i: (local[i],) for i in ids}, "evaluate", timeout_s=timeout).results
            per_round["local"].append({names[i]: ev[i] for i in ev})
            progress.phase(f"round {rnd}/{rounds}: centralized training on pooled data")
            central = _apply(cfg, POOLED, central, _update(pooled.train(central, rnd)))
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


def _update(answer: dict) -> dict:
    """The update a platform sent: plain, or compressed (compression.name) and decoded here."""
    from fl_llm.compression import decompress

    return decompress(answer["payload"]) if "payload" in answer else answer["update"]


def sizes_of(per_platform: dict[str, dict]) -> dict[str, int]:
    return {name: int(m.get("num_eval", 1)) for name, m in per_platform.items()}


def _result(cfg: RunConfig, metric: str, per_round: dict) -> dict:
    modes = {}
    for mode in MODES:
        final = per_round[mode][-1]
        sizes = sizes_of(final)
        numeric = {k for m in final.values() for k, v in m.items() if isinstance(v, (int, float))}
        keys = sorted(numeric - {"num_eval", "eval_seconds"})
        modes[mode] = {
            "platforms": {name: {k: m.get(k) for k in keys} for name, m in final.items()},
            "average": {k: _weighted_average(final, sizes, k) for k in keys},
            "per_round": [_weighted_average(r, sizes_of(r), metric) for r in per_round[mode]],
        }
    lo, fed, hi = (modes[m]["average"][metric] for m in MODES)
    return {
        "task": cfg.data.task,
        "metric": metric,
        "rounds": cfg.server.rounds,
        "seeds": [cfg.seed],
        "partition": dataclasses.asdict(cfg.data.partition),
        "modes": modes,
        "federated_minus_local": fed - lo,
        "gap_closed": _gap_closed(lo, fed, hi),
    }


def _gap_closed(local: float, federated: float, centralized: float) -> float:
    """Share of the local-only -> centralized gap that federation closes (nan without a gap)."""
    gap = centralized - local
    return (federated - local) / gap if gap > 0 else float("nan")


def over_seeds(runs: list[dict]) -> dict:
    """Mean and standard deviation over seeds of each mode's averaged metrics and curve; the gap
    closed is taken between the means (a ratio of noisy differences is itself too noisy)."""
    import numpy as np

    metric = runs[0]["metric"]
    modes = {}
    for mode in MODES:
        keys = sorted(set.intersection(*(set(r["modes"][mode]["average"]) for r in runs)))
        vals = {k: np.array([r["modes"][mode]["average"][k] for r in runs], dtype=float) for k in keys}
        curves = np.array([r["modes"][mode]["per_round"] for r in runs], dtype=float)
        modes[mode] = {
            "average": {k: float(np.nanmean(v)) for k, v in vals.items()},
            "std": {k: float(np.nanstd(v, ddof=1)) for k, v in vals.items()},
            "per_round": np.nanmean(curves, axis=0).tolist(),
            "per_round_std": np.nanstd(curves, axis=0, ddof=1).tolist(),
        }
    lo, fed, hi = (modes[m]["average"][metric] for m in MODES)
    diffs = [r["federated_minus_local"] for r in runs]
    return {
        "task": runs[0]["task"],
        "metric": metric,
        "rounds": runs[0]["rounds"],
        "seeds": [r["seeds"][0] for r in runs],
        "partition": runs[0]["partition"],
        "modes": modes,
        "federated_minus_local": fed - lo,
        "federated_minus_local_std": float(np.std(diffs, ddof=1)),
        "federated_wins": int(sum(d > 0 for d in diffs)),
        "gap_closed": _gap_closed(lo, fed, hi),
        "per_seed": runs,
    }


def format_table(result: dict) -> str:
    if len(result["seeds"]) > 1:
        return _format_seeds_table(result)
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


def _format_seeds_table(result: dict) -> str:
    metric, runs = result["metric"], result["per_seed"]
    lines = [
        f"{'seed':<8}  {'local-only':>10}  {'federated':>10}  {'centralized':>11}  {'gap closed':>10}   ({metric})"
    ]
    for r in runs:
        vals = [r["modes"][m]["average"][metric] for m in MODES]
        closed = r["gap_closed"]
        lines.append(
            f"{r['seeds'][0]:<8}  "
            + "  ".join(f"{v:>{w}.4f}" for v, w in zip(vals, (10, 10, 11)))
            + (f"  {100 * closed:>9.0f}%" if closed == closed else f"  {'-':>10}")
        )
    m = result["modes"]
    cells = [f"{m[k]['average'][metric]:.4f}±{m[k]['std'][metric]:.3f}" for k in MODES]
    lines.append(f"{'mean±sd':<8}  " + "  ".join(f"{c:>{w}}" for c, w in zip(cells, (10, 10, 11))))
    closed = result["gap_closed"]
    lines.append(
        f"federated - local-only: {result['federated_minus_local']:+.4f} ± {result['federated_minus_local_std']:.4f} "
        f"(better in {result['federated_wins']} of {len(runs)} seeds)"
        + (f"; closes {100 * closed:.0f}% of the mean gap to centralized" if closed == closed else "")
    )
    return "\n".join(lines)


def _plot(result: dict, path: Path) -> None:
    labels = {"local": "local-only", "federated": "federated", "centralized": "centralized (upper bound)"}
    series = {labels[m]: (result["modes"][m]["per_round"], result["modes"][m].get("per_round_std")) for m in MODES}
    seeds = result["seeds"]
    over = f", mean ± sd over {len(seeds)} seeds" if len(seeds) > 1 else ""
    title = f"{result['task']}: local-only vs federated vs centralized{over}"
    plot_per_round(series, path, title, f"{result['metric']} (held-out, averaged over platforms)")


def plot_per_round(series: dict[str, tuple[list, list | None]], path: Path, title: str, ylabel: str) -> None:
    """One line per label over the rounds; where a standard deviation is given (a mean over
    seeds), one standard deviation is shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for label, (ys, sd) in series.items():
        xs = range(1, len(ys) + 1)
        (line,) = ax.plot(xs, ys, marker="o", markersize=3, label=label)
        if sd:
            lo = [y - d for y, d in zip(ys, sd)]
            hi = [y + d for y, d in zip(ys, sd)]
            ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15)
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
