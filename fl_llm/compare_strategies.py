"""`fl-llm compare --strategies a,b,...`: which aggregation strategy, round by round.

The same job — config, data, split, seed, rounds, local steps, learning rate — run once per
strategy; only `strategy.name` changes. Each run is a normal run dir,
`<output dir>/<strategy>/seed-<s>/`. Per round it reads the held-out eval loss, the task's primary
metric and the aggregation error (‖Σ pᵢBᵢAᵢ − B·A‖ / ‖Σ pᵢBᵢAᵢ‖, zero for the exact LoRA methods),
averages them over seeds, and counts the rounds in which each strategy's eval loss is below the
first strategy's — the baseline (e.g. `--strategies fedit,fedex,flora,ffa` compares the exact
LoRA methods with FedIT). Writes `strategies.json` and `strategies.png` in the output dir.

Every strategy's config is checked before anything runs, so a name that does not exist, or one
that cannot run with the rest of the config, stops the comparison at once (exit 2).

With `resume=True` the output dir of an earlier comparison is continued: a run it finished with
the same config is read, not run again; one that was stopped resumes from its last checkpoint
(the result is the same as an uninterrupted run); the rest run. So a killed comparison picks up
where it stopped, and more seeds or strategies can be added to one later. A run made with a
different config stops the comparison (exit 2) rather than being mixed in.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from fl_llm import checkpoint
from fl_llm import config as config_mod
from fl_llm.config import RunConfig
from fl_llm.data.sources import task_of
from fl_llm.errors import UserError
from fl_llm.plots import plot_per_round
from fl_llm.progress import Progress
from fl_llm.server.loop import run
from fl_llm.tracking import read_metrics, write_json


def strategy_configs(cfg: RunConfig, names: list[str]) -> dict[str, RunConfig]:
    """One checked config per strategy name; raises UserError for an unknown, repeated or
    incompatible name before any run starts."""
    if len(names) < 2:
        raise UserError(f"--strategies needs at least two names separated by commas, got {','.join(names)!r}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UserError(f"--strategies names {', '.join(repeated)} more than once")
    base = config_mod.to_dict(cfg)
    out = {}
    for name in names:
        try:
            out[name] = config_mod.from_dict({**base, "strategy": {**base["strategy"], "name": name}})
        except UserError as e:
            raise UserError(f"--strategies {name}: {e}") from None
    return out


# What a resumed comparison lets differ from its earlier runs: the name and place, and where/how.
MAY_DIFFER = ("name", "output_dir", *config_mod.WHERE_NOT_WHAT)


def compare_strategies(
    cfgs: dict[str, RunConfig], out_dir: Path, progress: Progress | None = None, seeds: int = 1, resume: bool = False
) -> dict:
    """Run every strategy for seeds seed..seed+seeds-1 (seed by seed, so the first complete
    comparison comes early) and summarise; see the module docstring."""
    progress = progress or Progress(enabled=False)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    first = next(iter(cfgs.values()))
    seed_list = list(range(first.seed, first.seed + seeds))
    curves: dict[str, list[list[dict]]] = {name: [] for name in cfgs}
    total, done = len(cfgs) * seeds, 0
    try:
        for s in seed_list:
            for name, cfg in cfgs.items():
                done += 1
                run_dir, cfg_s = out_dir / name / f"seed-{s}", dataclasses.replace(cfg, seed=s)
                how = earlier_run(cfg_s, run_dir) if resume else "run"
                progress.info(f"==== {name}, seed {s} (run {done} of {total}){RESUMED[how]} ====")
                if how != "reuse":
                    run(cfg_s, run_dir, progress, resume=how == "resume")
                curves[name].append(read_metrics(run_dir))
    finally:
        progress.close()
    result = summarise(curves, task_of(first).primary, seed_list)
    write_json(out_dir / "strategies.json", result)
    _plot(result, out_dir / "strategies.png", first.data.task)
    progress.info(format_strategies_table(result))
    return result


RESUMED = {"run": "", "resume": ": resuming from its last checkpoint", "reuse": ": finished earlier, read"}


def earlier_run(cfg: RunConfig, run_dir: Path) -> str:
    """What a resumed comparison does with one strategy-and-seed run dir: "reuse" a run finished
    with this config, "resume" one stopped after a checkpoint, "run" one that is not there (a run
    stopped before its first checkpoint is removed first). A run made with another config raises
    UserError naming the first setting that differs."""
    if not run_dir.exists():
        return "run"
    if (run_dir / "config.yaml").is_file():
        try:
            was = config_mod.to_dict(config_mod.from_dict(config_mod.read_yaml(run_dir / "config.yaml")))
        except UserError as e:
            raise UserError(f"--resume: {run_dir} holds a run this version cannot read ({e})") from None
        for key, old, new in config_mod.differences(was, config_mod.to_dict(cfg)):
            if not config_mod.key_in(key, MAY_DIFFER):
                raise UserError(
                    f"--resume: {run_dir} was run with {key}={old!r}, this comparison has {key}={new!r}; "
                    "compare into another output_dir, or pass --overwrite to start again"
                )
        if (run_dir / "summary.json").is_file() and len(read_metrics(run_dir)) == cfg.server.rounds:
            return "reuse"
        if checkpoint.latest(run_dir / "checkpoints") is not None:
            return "resume"
    shutil.rmtree(run_dir)
    return "run"


def summarise(curves: dict[str, list[list[dict]]], metric: str, seeds: list[int]) -> dict:
    """Per strategy: the mean (and sd, over seeds) of eval loss, `metric` and aggregation error per
    round; per seed, the rounds with an eval loss below the baseline's (the first strategy). With
    several seeds the difference to the baseline is paired by seed (same data, split and initial
    adapter), and the rounds where its mean is more than two standard errors below (or above) zero
    are listed: a strategy "below" by 0.0001 is not better."""
    import numpy as np

    def per_round(rows_per_seed: list[list[dict]], key: str) -> np.ndarray:
        n = min(len(rows) for rows in rows_per_seed)  # a run stopped early (e.g. a DP budget) is cut to the shortest
        # None (e.g. FedSA's aggregation error: B is never averaged) reads as nan
        return np.array([[np.nan if r.get(key) is None else float(r[key]) for r in rows[:n]] for rows in rows_per_seed])

    baseline = next(iter(curves))
    base_loss = per_round(curves[baseline], "eval_loss")
    out = {}
    for name, rows_per_seed in curves.items():
        loss, scores = per_round(rows_per_seed, "eval_loss"), per_round(rows_per_seed, metric)
        n = min(loss.shape[1], base_loss.shape[1])
        diff = loss[:, :n] - base_loss[:, :n]  # paired: the same seed's data, split and initial adapter
        mean_diff = diff.mean(axis=0)
        se = diff.std(axis=0, ddof=1) / np.sqrt(len(diff)) if len(diff) > 1 else np.full(n, np.nan)
        sd = loss.std(axis=0, ddof=1) if len(seeds) > 1 else np.zeros(loss.shape[1])
        out[name] = {
            "eval_loss": loss.mean(axis=0).tolist(),
            "eval_loss_std": sd.tolist(),
            metric: scores.mean(axis=0).tolist(),
            "aggregation_error": [
                float(np.nanmean(c)) if np.isfinite(c).any() else float("nan")
                for c in per_round(rows_per_seed, "aggregation_error").T
            ],
            "final_eval_loss_per_seed": loss[:, -1].tolist(),
            f"final_{metric}_per_seed": scores[:, -1].tolist(),
            "rounds_below_baseline_per_seed": (diff < 0).sum(axis=1).tolist(),
            "rounds_below_baseline": int((mean_diff < 0).sum()),
            "rounds_compared": n,
            "difference_to_baseline": mean_diff.tolist(),
            "difference_to_baseline_se": se.tolist(),
            "rounds_clearly_below_baseline": [r + 1 for r in range(n) if mean_diff[r] < -2 * se[r]],
            "rounds_clearly_above_baseline": [r + 1 for r in range(n) if mean_diff[r] > 2 * se[r]],
        }
    return {"metric": metric, "seeds": seeds, "baseline": baseline, "strategies": out}


def format_strategies_table(result: dict, max_columns: int = 10) -> str:
    """Eval loss per round (mean over seeds), the final metric, the aggregation error in the first
    and last round, and the rounds below the baseline. Long runs show `max_columns` rounds,
    evenly spaced, always with the first and the last."""
    metric, baseline, seeds = result["metric"], result["baseline"], result["seeds"]
    strategies = result["strategies"]
    rounds = max(len(s["eval_loss"]) for s in strategies.values())
    if rounds <= max_columns:
        shown = list(range(rounds))
    else:
        shown = sorted({round(k * (rounds - 1) / (max_columns - 1)) for k in range(max_columns)})
    width = max(8, *(len(n) for n in strategies))
    over = f"mean over seeds {seeds[0]}..{seeds[-1]}" if len(seeds) > 1 else f"seed {seeds[0]}"
    head = f"{'round':<{width}}  " + " ".join(f"{r + 1:>6}" for r in shown)
    lines = [
        f"held-out eval loss per round ({over}); lower is better",
        head + f"  {'final ' + metric:>14}  {'agg. error first/last':>21}  below {baseline}",
    ]
    for name, s in strategies.items():
        loss = s["eval_loss"]
        cells = " ".join(f"{loss[r]:>6.3f}" if r < len(loss) else f"{'-':>6}" for r in shown)
        err = s["aggregation_error"]
        err_cell = f"{_percent(err[0])} / {_percent(err[-1])}" if err and err[0] == err[0] else "-"
        if name == baseline:
            below = "(baseline)"
        else:
            per_seed = ", ".join(str(b) for b in s["rounds_below_baseline_per_seed"])
            below = f"{s['rounds_below_baseline']} of {s['rounds_compared']}" + (
                f" (per seed {per_seed})" if len(seeds) > 1 else ""
            )
        lines.append(f"{name:<{width}}  {cells}  {s[metric][-1]:>14.4f}  {err_cell:>21}  {below}")
    if len(seeds) > 1:
        lines.append(
            f"paired by seed, eval loss more than 2 standard errors below / above {baseline}'s (mean difference):"
        )
        for name, s in strategies.items():
            if name != baseline:
                below, above = (
                    _rounds(s[f"rounds_clearly_{k}_baseline"], s["difference_to_baseline"]) for k in ("below", "above")
                )
                lines.append(f"  {name:<{width}}  below in {below}; above in {above}")
    return "\n".join(lines)


def _rounds(rounds: list[int], diff: list[float]) -> str:
    """'rounds 1 (-0.030), 5 (-0.001)': which rounds, by how much on average."""
    if not rounds:
        return "no round"
    return ("round " if len(rounds) == 1 else "rounds ") + ", ".join(f"{r} ({diff[r - 1]:+.3f})" for r in rounds)


def _percent(x: float) -> str:
    if x < 1e-8:  # rounding in float32 factors: exact
        return "0%"
    return f"{100 * x:.1f}%" if x >= 1e-3 else f"{100 * x:.2g}%"


def _plot(result: dict, path: Path, task: str) -> None:
    several = len(result["seeds"]) > 1
    series = {
        name: (s["eval_loss"], s["eval_loss_std"] if several else None) for name, s in result["strategies"].items()
    }
    over = f", mean ± sd over {len(result['seeds'])} seeds" if several else ""
    title = f"{task}: aggregation strategies{over}"
    plot_per_round(series, path, title, "eval loss (held-out, averaged over platforms)")
