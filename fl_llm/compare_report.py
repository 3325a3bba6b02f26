"""What `fl-llm compare` reports: the per-platform table (four arms, bootstrap intervals, the
platforms where federating costs), the arms' budgets, the gap closed with its noise, the mean
over seeds, and the per-round plot (drawn by `fl_llm.plots`)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from fl_llm.config import RunConfig
from fl_llm.plots import plot_per_round
from fl_llm.progress import fmt_value

MODES = ("local", "federated", "centralized")
PERSONAL = "personalised"


def _weighted_average(per_platform: dict[str, dict], sizes: dict[str, int], metric: str) -> float:
    pairs = [(m.get(metric), sizes[n]) for n, m in per_platform.items()]
    pairs = [(v, w) for v, w in pairs if v is not None and v == v]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else float("nan")


def round_line(now: dict[str, dict[str, dict]], metric: str) -> str:
    """`loss/auc: local 0.612/0.701  centralized 0.590/0.733` — each arm's eval loss and headline
    metric this round, weighted by held-out size; "-" where it was not measured (the instruction
    task generates answers only every eval.generate_every rounds)."""

    def both(v: dict[str, dict]) -> str:
        sizes = sizes_of(v)
        return f"{fmt_value(_weighted_average(v, sizes, 'eval_loss'))}/{fmt_value(_weighted_average(v, sizes, metric))}"

    return f"loss/{metric}: " + "  ".join(f"{arm} {both(v)}" for arm, v in now.items())


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
        "platforms": platforms_over_seeds(runs, metric),
        "tags": tags_over_seeds(runs),
        "per_seed": runs,
    }


def _final(run: dict, arm: str, name: str, metric: str):
    """A platform's headline metric for one arm's final model in one seed's comparison."""
    d = run.get("detail", {}).get(arm, {}).get(name, {})
    value = d.get(metric)
    if value is None and arm in run["modes"]:
        value = run["modes"][arm]["platforms"].get(name, {}).get(metric)
    return float("nan") if value is None else float(value)


def platforms_over_seeds(runs: list[dict], metric: str) -> dict[str, dict]:
    """Per platform: each arm's mean over seeds, and federated (and personalised) minus
    local-only paired by seed — mean, its standard error over the seeds, and `below`: the mean
    more than two standard errors under zero, or a seed where the held-out intervals alone
    already put it below (`below_local`)."""
    import numpy as np

    arms = [*MODES, *([PERSONAL] if all(PERSONAL in r.get("detail", {}) for r in runs) else [])]
    out = {}
    for name in runs[0]["modes"]["federated"]["platforms"]:
        vals = {a: np.array([_final(r, a, name, metric) for r in runs]) for a in arms}
        entry = {"mean": {a: float(np.nanmean(v)) for a, v in vals.items()}}
        for a in arms:
            if a in ("federated", PERSONAL):
                d = vals[a] - vals["local"]
                se = float(np.nanstd(d, ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")
                flagged = [r["seeds"][0] for r in runs if f"{name} ({a})" in r.get("below_local", [])]
                mean = float(np.nanmean(d))
                entry[f"{a}_minus_local"] = {
                    "mean": mean,
                    "se": se,
                    "below": bool(mean + 2 * se < 0) or bool(flagged),
                    "seeds_below_by_intervals": flagged,
                }
        out[name] = entry
    return out


def tags_over_seeds(runs: list[dict]) -> dict[str, dict[str, dict]]:
    """The instruction task's per-tag figures (`exact_match/shared`, `token_f1/title`, ...) of each
    arm's final model, per platform: mean and standard deviation over seeds, and federated (and
    the personalised arm, where there is one) minus local-only paired by seed. Empty for tasks
    without tags."""
    import numpy as np

    arms = [a for a in (*MODES, PERSONAL) if all(a in r.get("detail", {}) for r in runs)]
    if "federated" not in arms:  # FedSA, FedEx, FLoRA: no one global model to score in detail
        return {}
    keys = sorted({k for r in runs for d in r["detail"]["federated"].values() for k in d if "/" in k})
    out: dict[str, dict[str, dict]] = {}
    for key in keys:
        for name in runs[0]["detail"]["federated"]:
            vals = {a: np.array([r["detail"][a].get(name, {}).get(key, np.nan) for r in runs], float) for a in arms}
            sd = lambda v: float(np.nanstd(v, ddof=1)) if len(v) > 1 else float("nan")  # noqa: E731
            entry = {a: [float(np.nanmean(v)), sd(v)] for a, v in vals.items()}
            if "local" in vals:
                for a in ("federated", PERSONAL):
                    if a in vals:
                        d = vals[a] - vals["local"]
                        entry[f"{a}_minus_local"] = [float(np.nanmean(d)), sd(d)]
            out.setdefault(key, {})[name] = entry
    return out


def _tag_lines(result: dict) -> list[str]:
    """Per tag and platform: each arm's mean ± sd over seeds, and federated (and personalised)
    − local-only (one seed: the figures alone, there is no spread to show)."""
    tags = result.get("tags") or {}
    lines = []
    for key, per in tags.items():
        first = next(iter(per.values()))
        arms = [a for a in first if not a.endswith("_minus_local")]
        diffs = [a for a in ("federated", PERSONAL) if f"{a}_minus_local" in first]
        width = max(12, *(len(n) for n in per))
        heads = "".join(f"   {a + ' - local':<20}" for a in diffs)
        lines.append(f"{key:<{width}}  " + "  ".join(f"{a[:11]:>13}" for a in arms) + heads.rstrip())
        for name, e in per.items():
            cells = "  ".join(f"{e[a][0]:>6.3f}{_spread(e[a][1]):<7}" for a in arms)
            d = [e[f"{a}_minus_local"] for a in diffs]
            ds = "".join(f"   {m:+.3f}{_spread(sd, ' ± '):<14}" for m, sd in d)
            lines.append(f"{name:<{width}}  {cells}{ds}".rstrip())
    return lines


def _spread(sd: float, sep: str = "±") -> str:
    return "" if math.isnan(sd) else f"{sep}{sd:.3f}"


def gap_line(local: float, federated: float, centralized: float, noise: float, what: str) -> str:
    """The share of the local-only -> centralized gap that federation closes, with its noise —
    or why there is none: a gap within the noise (or negative: pooling the data did not help)
    makes the ratio meaningless (it printed "-1423%")."""
    gap = centralized - local
    if not gap > noise:
        return (
            f"gap local-only -> centralized: {gap:+.4f}, within its noise (±{noise:.4f}, {what}): no gap to close, "
            f"so no share is computed; federated - local-only: {federated - local:+.4f}"
        )
    closed = (federated - local) / gap
    spread = abs(closed) * noise / gap  # the gap's own noise, carried into the ratio
    return f"federated closes {100 * closed:.0f}% (±{100 * spread:.0f}%) of the gap local-only -> centralized ({gap:+.4f} ± {noise:.4f}, {what})"


def _cell(value, interval) -> str:
    if value is None or value != value:
        return "-"
    return f"{value:.4f}" + (f" [{interval[0]:.3f},{interval[1]:.3f}]" if interval else "")


def format_table(result: dict) -> str:
    if len(result["seeds"]) > 1:
        return _format_seeds_table(result)
    metric = result["metric"]
    modes, detail = result["modes"], result.get("detail", {})
    arms = [*MODES, *([PERSONAL] if PERSONAL in detail else [])]
    titles = {"local": "local-only", "federated": "federated", "centralized": "centralized", PERSONAL: PERSONAL}
    names = list(modes["federated"]["platforms"])
    width = max(12, *(len(x) for x in names))
    lines = [f"{'platform':<{width}}  " + "  ".join(f"{titles[a]:>24}" for a in arms) + f"   ({metric}, 95% interval)"]
    for name in names:
        cells = []
        for a in arms:
            d = detail.get(a, {}).get(name, {})
            value = d.get(metric, modes[a]["platforms"].get(name, {}).get(metric) if a in modes else None)
            cells.append(_cell(value, d.get("interval")))
        lines.append(f"{name:<{width}}  " + "  ".join(f"{c:>24}" for c in cells))
    averages = [modes[a]["average"][metric] if a in modes else _mean(detail[a], metric) for a in arms]
    lines.append(f"{'average':<{width}}  " + "  ".join(f"{v:>24.4f}" for v in averages))
    if "budget" in result:
        lines.append(
            "budget per platform: "
            + "; ".join(
                f"{titles[a]} {b['steps']} steps, {b['examples']:,} examples" for a, b in result["budget"].items()
            )
            + " (centralized: one pooled trainer)"
        )
    if "wall_s" in result:
        lines.append(f"wall time: {result['wall_s'] / 60:.1f} min")
    if "below_local" in result:
        below = result["below_local"]
        lines.append("below local-only beyond the intervals: " + (", ".join(below) if below else "none"))
    if PERSONAL in detail and "personal_rounds" in result:
        lines.append(
            f"to keep the personalised adapters: fl-llm personalise <this dir>/federated --rounds "
            f"{result['personal_rounds']} --schedule {result.get('personal_schedule', 'fresh')}"
            + (f" --anchor {result['personal_anchor']:g}" if result.get("personal_anchor") else "")
        )
    lo, fed, hi = (modes[m]["average"][metric] for m in MODES)
    lines.append(gap_line(lo, fed, hi, _interval_noise(detail, metric), "held-out bootstrap"))
    if detail.get("federated"):
        lines.extend(_tag_lines({"tags": tags_over_seeds([result])}))
    return "\n".join(lines)


def _mean(per_platform: dict[str, dict], metric: str) -> float:
    return _weighted_average(per_platform, sizes_of(per_platform), metric)


def _interval_noise(detail: dict, metric: str) -> float:
    """The noise of a gap between two platform-averaged figures: each arm's mean interval
    half-width (1.96 s.e. per platform) over √platforms, the two combined."""
    halves = []
    for arm in ("local", "centralized"):
        widths = [(d["interval"][1] - d["interval"][0]) / 2 for d in detail.get(arm, {}).values() if d.get("interval")]
        if widths:
            halves.append(sum(widths) / len(widths) / math.sqrt(len(widths)))
    return math.sqrt(sum(h * h for h in halves)) if halves else 0.0


def _format_seeds_table(result: dict) -> str:
    import numpy as np

    metric, runs = result["metric"], result["per_seed"]
    personal = any(PERSONAL in r.get("detail", {}) for r in runs)  # FedSA/FedPer runs are personal already
    head = f"{'seed':<8}  {'local-only':>10}  {'federated':>10}  {'centralized':>11}"
    lines = [head + (f"  {PERSONAL:>12}" if personal else "") + f"   ({metric})"]
    for r in runs:
        vals = [r["modes"][m]["average"][metric] for m in MODES]
        if personal:
            vals.append(_mean(r["detail"][PERSONAL], metric) if PERSONAL in r.get("detail", {}) else float("nan"))
        lines.append(f"{r['seeds'][0]:<8}  " + "  ".join(f"{v:>{w}.4f}" for v, w in zip(vals, (10, 10, 11, 12))))
    m = result["modes"]
    cells = [f"{m[k]['average'][metric]:.4f}±{m[k]['std'][metric]:.3f}" for k in MODES]
    lines.append(f"{'mean±sd':<8}  " + "  ".join(f"{c:>{w}}" for c, w in zip(cells, (10, 10, 11))))
    lines.append(
        f"federated - local-only: {result['federated_minus_local']:+.4f} ± {result['federated_minus_local_std']:.4f} "
        f"(better in {result['federated_wins']} of {len(runs)} seeds)"
    )
    below = [f"seed {r['seeds'][0]}: {', '.join(r['below_local'])}" for r in runs if r.get("below_local")]
    lines.append("below local-only beyond the intervals: " + ("; ".join(below) if below else "none"))
    lines.extend(_platform_lines(result))
    lines.extend(_tag_lines(result))
    gaps = np.array(
        [r["modes"]["centralized"]["average"][metric] - r["modes"]["local"]["average"][metric] for r in runs]
    )
    noise = 2 * float(gaps.std(ddof=1)) / np.sqrt(len(gaps))
    lo, fed, hi = (m[k]["average"][metric] for k in MODES)
    lines.append(gap_line(lo, fed, hi, noise, f"2 s.e. over {len(runs)} seeds"))
    return "\n".join(lines)


def _platform_lines(result: dict) -> list[str]:
    """Per platform, the mean over seeds of each arm and federated (and personalised) minus
    local-only paired by seed, ± 2 standard errors; `BELOW` where it is under zero beyond that."""
    per = result.get("platforms") or {}
    if not per:
        return []
    arms = list(next(iter(per.values()))["mean"])
    width = max(12, *(len(n) for n in per))
    titles = {"local": "local-only", PERSONAL: "personal"}
    head = f"{'per platform':<{width}}  " + "  ".join(f"{titles.get(a, a):>11}" for a in arms)
    lines = [head + "   fed - local (±2 s.e. over seeds)" + ("   personal - local" if PERSONAL in arms else "")]
    for name, e in per.items():
        cells = "  ".join(f"{e['mean'][a]:>11.4f}" for a in arms)
        diffs = []
        for a in ("federated", PERSONAL):
            d = e.get(f"{a}_minus_local")
            if d:
                diffs.append(f"{d['mean']:+.4f} ± {2 * d['se']:.4f}" + ("  BELOW" if d["below"] else ""))
        lines.append(f"{name:<{width}}  {cells}   " + "   ".join(f"{x:<22}" for x in diffs).rstrip())
    return lines


def _plot(result: dict, path: Path) -> None:
    labels = {"local": "local-only", "federated": "federated", "centralized": "centralized (upper bound)"}
    series = {labels[m]: (result["modes"][m]["per_round"], result["modes"][m].get("per_round_std")) for m in MODES}
    seeds = result["seeds"]
    over = f", mean ± sd over {len(seeds)} seeds" if len(seeds) > 1 else ""
    title = f"{result['task']}: local-only vs federated vs centralized{over}"
    plot_per_round(series, path, title, f"{result['metric']} (held-out, averaged over platforms)")
