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

A fourth arm, **personalised**, starts from the federated model and trains `personal_rounds` more
local rounds (`client.local_steps` steps each) on each platform's own data, as a fresh local run
would start them (the first rounds of the schedule, warm-up included) or, with
`personal_schedule="continue"`, past the schedule's end at its final rate (by default the config's
`personalise.schedule`): the lever when one global model cannot serve platforms whose data differ.
Each arm's budget (optimizer steps and examples per platform) is stated in the result. The final
models of every arm are evaluated once more with detail: a bootstrap interval of the headline
metric over each platform's held-out records, the calibration bins, and — for yes/no tasks — the
threshold chosen on half of the held-out records with the precision and recall it gets on the other
half. A platform where federated is below local-only by more than the intervals allow is named.

Federated results move with the seed (the data, the split, the initial adapter), so one run
can mislead: `seeds=N` repeats the whole comparison for seeds seed..seed+N-1 (each in
`<output dir>/seed-<s>/`) and reports the mean and standard deviation over seeds. `resume=True`
reads the seeds already compared and continues a federated run from its checkpoint.
`keep_adapters=True` writes the arms compare trains itself as PEFT adapters (`_keep_adapters`).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from fl_llm.client.api import PlatformAPI
from fl_llm.client.kept_state import state_dir_of
from fl_llm.client.platform import Platform
from fl_llm.compare_report import (
    MODES,
    PERSONAL,
    _plot,
    _result,
    format_table,
    over_seeds,
    round_line,
)
from fl_llm.config import RunConfig, to_dict
from fl_llm.data.sources import POOLED, task_of
from fl_llm.generation import generation_due
from fl_llm.model.adapters import starting_adapter
from fl_llm.personalise import apply_update, detailed, local_round, personalise, sent_update, settings
from fl_llm.plots import plot_reliability
from fl_llm.progress import Progress
from fl_llm.server.backends import make_backend
from fl_llm.server.loop import SETUP_TIMEOUT_S, run, with_state_dir
from fl_llm.strategies import STRATEGIES
from fl_llm.tracking import RunDir, read_metrics, write_json

__all__ = ["MODES", "PERSONAL", "compare", "format_table", "over_seeds"]


def compare(
    cfg: RunConfig,
    out_dir: Path,
    progress: Progress | None = None,
    seeds: int = 1,
    resume: bool = False,
    personal_rounds: int = 1,
    personal_schedule: str | None = None,
    personal_anchor: float | None = None,
    keep_adapters: bool = False,
) -> dict:
    """Local-only vs federated vs centralized (and personalised); over `seeds` seeds (mean and
    std) when > 1. `resume`: a seed whose comparison.json is there with the same config is read.
    `keep_adapters`: also write the models compare trains itself (`_keep_adapters`).
    `personal_schedule`: the personalised rounds' learning rate — "fresh" (the schedule's first
    rounds, as a new local run) or "continue" (past the schedule's end, at its final rate);
    `personal_anchor` μ: their proximal pull toward the federated model (0: none); either left
    None is the config's (`personalise.schedule`, `personalise.anchor`)."""
    progress = progress or Progress(enabled=False)
    personal = (personal_rounds, *settings(cfg, personal_schedule, personal_anchor))
    if seeds <= 1:
        return _compare_one(cfg, Path(out_dir), progress, resume, personal, keep_adapters)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = []
    try:
        for s in range(cfg.seed, cfg.seed + seeds):
            progress.info(f"==== seed {s} ({s - cfg.seed + 1} of {seeds}) ====")
            seed_dir = out_dir / f"seed-{s}"
            runs.append(
                _compare_one(dataclasses.replace(cfg, seed=s), seed_dir, progress, resume, personal, keep_adapters)
            )
    finally:
        progress.close()
    result = over_seeds(runs)
    write_json(out_dir / "comparison.json", result)
    _plot(result, out_dir / "comparison.png")
    progress.info(format_table(result))
    return result


def _compare_one(
    cfg: RunConfig,
    out_dir: Path,
    progress: Progress,
    resume: bool = False,
    personal: tuple = (1, "fresh", 0.0),
    keep_adapters: bool = False,
) -> dict:
    out_dir = Path(out_dir)
    personal_rounds, personal_schedule, personal_anchor = personal
    done = _earlier(cfg, out_dir, personal) if resume else None
    if done is not None:
        progress.info(f"== seed {cfg.seed}: compared already ({out_dir / 'comparison.json'}) ==")
        if keep_adapters and not (out_dir / ADAPTERS).is_dir():
            progress.warn(
                f"seed {cfg.seed} was compared without --keep-adapters: its models are gone, and only a new "
                "comparison of it (without --resume) keeps them"
            )
        return done
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    metric = task_of(cfg).primary
    n, rounds = cfg.data.num_platforms, cfg.server.rounds
    ids = list(range(n))
    timeout = cfg.server.round_timeout_s
    per_round: dict[str, list[dict[str, dict]]] = {m: [] for m in MODES}

    # --- federated: the real thing ------------------------------------------------------------
    progress.info("== federated ==")
    _federated(cfg, out_dir / "federated", progress, resume)
    for row in read_metrics(out_dir / "federated"):
        per_round["federated"].append(row["platforms"])

    # --- local-only and centralized, on the same platforms --------------------------------------
    progress.info("== local-only and centralized (pooled data, upper bound), then personalised ==")
    alone = _alone(cfg)
    backend = make_backend(alone)
    try:
        info = backend.call(ids, PlatformAPI.describe, timeout_s=SETUP_TIMEOUT_S).results
        names = {i: info[i]["name"] for i in ids}
        init = starting_adapter(
            cfg.model, backend.call([0], PlatformAPI.initial_adapter, timeout_s=SETUP_TIMEOUT_S).results[0]
        )
        pooled_cfg = to_dict(dataclasses.replace(alone, backend="local"))
        pooled_cfg["client"]["batch_size"] = cfg.client.batch_size * n
        pooled = Platform(pooled_cfg, POOLED)
        local = {i: init for i in ids}
        central = init
        for rnd in range(1, rounds + 1):
            progress.phase(f"round {rnd}/{rounds}: local-only training")
            local = local_round(alone, backend, local, rnd)
            gen = generation_due(cfg, rnd)  # the instruction task: answers generated on the run's schedule
            ev = backend.call_each(
                {i: (local[i], None, False, gen) for i in ids}, PlatformAPI.evaluate, timeout_s=timeout
            ).results
            per_round["local"].append({names[i]: ev[i] for i in ev})
            progress.phase(f"round {rnd}/{rounds}: centralized training on pooled data")
            central = apply_update(alone, POOLED, central, sent_update(pooled.train(central, rnd)))
            pooled.commit(rnd)
            ev = backend.call(
                ids, PlatformAPI.evaluate, backend.put(central), None, False, gen, timeout_s=timeout
            ).results
            per_round["centralized"].append({names[i]: ev[i] for i in ev})
            now = {m: per_round[m][rnd - 1] for m in ("local", "centralized")}
            progress.info(f"round {rnd:>3}/{rounds}  {round_line(now, metric)}")
        finals = {"local": local, "centralized": {i: central for i in ids}}
        federated = _federated_final(cfg, out_dir / "federated", names)
        if federated is not None:
            finals["federated"] = federated
            if STRATEGIES[cfg.strategy.name].one_global_model:  # else its models are personal already
                finals[PERSONAL] = personalise(
                    cfg, backend, federated[0], personal_rounds, personal_schedule, progress, anchor=personal_anchor
                )
        detail = {
            mode: {names[i]: r for i, r in detailed(backend, states, timeout).items()}
            for mode, states in finals.items()
        }
    finally:
        backend.shutdown()
        progress.close()
    if keep_adapters:
        _keep_adapters(cfg, out_dir, finals, names)

    result = _result(cfg, metric, per_round)
    result["detail"] = detail
    result["budget"] = budget(cfg, personal_rounds if PERSONAL in detail else 0)
    result["personal_rounds"] = personal_rounds
    result["personal_schedule"] = personal_schedule
    result["personal_anchor"] = personal_anchor
    result["below_local"] = below_local(detail, metric)
    result["wall_s"] = round(time.monotonic() - t_start, 1)
    write_json(out_dir / "comparison.json", result)
    _plot(result, out_dir / "comparison.png")
    undrawn = plot_reliability(detail, out_dir / "reliability.png")
    if undrawn:
        progress.warn(undrawn)
    progress.info(format_table(result))
    return result


ADAPTERS = "adapters"  # --keep-adapters: the arms' models, in the comparison's (or seed's) directory


def _keep_adapters(cfg: RunConfig, out_dir: Path, finals: dict, names: dict[int, str]) -> None:
    """The models compare trains itself, as PEFT adapters on the federated run's base model, for
    `fl-llm generate OUT/federated --adapter DIR`: adapters/local/<platform>/,
    adapters/centralized/ (one model for every platform) and adapters/personalised/<platform>/ —
    written whole or not at all. The federated arm's is the run's own (federated/adapter/; a
    FedSA or FedPer run's personal/<platform>/)."""
    from fl_llm.personalise import save_adapters
    from fl_llm.tracking import RunDir, atomic_dir

    run = RunDir(out_dir / "federated")
    with atomic_dir(out_dir / ADAPTERS) as tmp:
        for mode, states in finals.items():
            if mode == "centralized":
                save_adapters(cfg, run, {mode: states[0]}, tmp)
            elif mode != "federated":
                save_adapters(cfg, run, {names[i]: state for i, state in states.items()}, tmp / mode)


def _alone(cfg: RunConfig) -> RunConfig:
    """The config of the arms compare trains itself (local-only, centralized, personalised). A
    model trained alone has nothing to keep from a federation: where the strategy keeps tensors on
    each platform (FedSA's B, FedPer's head), these arms train them as FedAvg does — the same
    steps, but every tensor is in the state they hand back, so no platform's kept tensors from one
    arm are put into another arm's model when it is evaluated there."""
    strategy = STRATEGIES[cfg.strategy.name]
    if strategy.one_global_model:
        return cfg
    return dataclasses.replace(cfg, strategy=dataclasses.replace(cfg.strategy, name="fedavg"))


def _federated(cfg: RunConfig, run_dir: Path, progress: Progress, resume: bool) -> None:
    """The federated arm: run it — or, resuming, read it when it finished with this config, or
    continue it from its checkpoint (`compare_strategies.earlier_run` decides, as for strategies)."""
    import shutil

    from fl_llm.compare_strategies import earlier_run

    what = earlier_run(cfg, run_dir) if resume else "run"
    if what == "reuse":
        progress.info(f"federated run finished already: {run_dir}")
        return
    if what == "run":
        shutil.rmtree(run_dir, ignore_errors=True)  # ours, inside the comparison's dir
    run(cfg, run_dir, progress, resume=what == "resume")


def _federated_final(cfg: RunConfig, run_dir: Path, names: dict[int, str]) -> dict[int, dict] | None:
    """Each platform's final federated model: the run's last global adapter — with, for a strategy
    that keeps tensors on each platform (FedSA's B, FedPer's head), that platform's own from its
    state dir at the same round. None when the run merged into the base weights (FedEx, FLoRA) or
    a platform's own tensors are not there (checkpoint.every=0)."""
    import numpy as np

    from fl_llm import checkpoint

    strategy = STRATEGIES[cfg.strategy.name]
    if strategy.merges_into_base:
        return None
    path, _ = checkpoint.latest_intact(run_dir / "checkpoints")
    if path is None:
        return None
    rnd, saved = checkpoint.load(path, verified=True)
    final = {k: np.asarray(v) for k, v in saved["global_state"].items()}
    if strategy.one_global_model:
        return {i: final for i in names}
    states = with_state_dir(cfg, RunDir(run_dir)).client.state_dir  # where the run's platforms kept theirs
    out = {}
    for i, name in names.items():
        own_path, _ = checkpoint.latest_intact(state_dir_of(states, name) / "checkpoints", rnd)
        own = checkpoint.load(own_path, verified=True)[1]["persistent"].get("B") if own_path else None
        if not own or any(np.shape(own.get(k)) != final[k].shape for k in final if strategy.personal(k)):
            return None  # not saved, or at another rank than the global adapter's
        out[i] = {k: np.asarray(own[k]) if strategy.personal(k) else v for k, v in final.items()}
    return out


def budget(cfg: RunConfig, personal_rounds: int = 0) -> dict[str, dict[str, int]]:
    """Optimizer steps and examples each arm spends per platform (centralized: its pooled trainer,
    whose step takes every platform's batch; personalised: the federated arm's, then
    `personal_rounds` local rounds)."""
    n, rounds, steps, batch = cfg.data.num_platforms, cfg.server.rounds, cfg.client.local_steps, cfg.client.batch_size
    per_round = cfg.server.platforms_per_round or n
    participation = min(1.0, per_round / n)
    out = {
        "local": {"steps": rounds * steps, "examples": rounds * steps * batch},
        "federated": {
            "steps": int(round(rounds * steps * participation)),
            "examples": int(round(rounds * steps * batch * participation)),
        },
        "centralized": {"steps": rounds * steps, "examples": rounds * steps * batch * n},
    }
    if personal_rounds:
        fed, extra = out["federated"], personal_rounds * steps
        out[PERSONAL] = {"steps": fed["steps"] + extra, "examples": fed["examples"] + extra * batch}
    return out


def below_local(detail: dict, metric: str) -> list[str]:
    """Platforms where federated (and, when there is one, personalised) is below local-only by more
    than the bootstrap intervals allow: its interval's top under local-only's bottom."""
    out = []
    for mode in ("federated", PERSONAL):
        for name, d in detail.get(mode, {}).items():
            lo = detail["local"].get(name, {}).get("interval")
            hi = d.get("interval")
            if lo and hi and hi[1] < lo[0]:
                out.append(f"{name} ({mode})")
    return out


def _earlier(cfg: RunConfig, out_dir: Path, personal: tuple) -> dict | None:
    """A finished comparison of this seed in `out_dir`, when its federated run had this config (a
    run with another config is an error naming the setting) and its personalised arm as many
    rounds on the same schedule and anchor (else the seed is compared again, reusing its federated run)."""
    import json

    from fl_llm.compare_strategies import earlier_run

    done = out_dir / "comparison.json"
    if not done.is_file() or earlier_run(cfg, out_dir / "federated") != "reuse":
        return None
    result = json.loads(done.read_text())
    had = (
        result.get("personal_rounds", 1),
        result.get("personal_schedule", "fresh"),
        result.get("personal_anchor", 0.0),
    )
    return result if had == tuple(personal) else None
