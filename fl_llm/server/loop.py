"""The federated round loop, top to bottom.

    setup:  start the platforms (each loads its own data), take the initial adapter
    round:  sample -> broadcast -> local training (deadline) -> aggregate -> evaluate -> log/save

Only adapter tensors and aggregate numbers pass through here; records never do.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fl_llm.config import RunConfig, to_dict
from fl_llm.data.sources import task_of
from fl_llm.errors import UserError
from fl_llm.model.adapters import AdapterState, save_adapter, state_nbytes
from fl_llm.model.build import is_builtin, resolve_name, save_base
from fl_llm.progress import Progress
from fl_llm.server.backends import Collected, make_backend
from fl_llm.strategies import STRATEGIES
from fl_llm.tracking import RunDir, write_json

SETUP_TIMEOUT_S = 1800.0  # loading a large base model on every platform can take a while


class RunFailed(RuntimeError):
    """The federation cannot go on (e.g. too few platforms answered); the message says why."""


def sample_cohort(seed: int, round_: int, num_platforms: int, per_round: int) -> list[int]:
    """Platforms that train this round: all, or `per_round` drawn without replacement."""
    if per_round in (0, num_platforms):
        return list(range(num_platforms))
    rng = np.random.default_rng([seed, round_, 0x5A3])
    return sorted(rng.choice(num_platforms, size=per_round, replace=False).tolist())


@dataclass
class Downlink:
    """Meters the global adapter sent to platforms: a platform downloads each version once."""

    size: int
    version: int = 0
    held: dict[int, int] = field(default_factory=dict)
    sent: dict[int, int] = field(default_factory=dict)

    def send(self, ids) -> None:
        for i in ids:
            if self.held.get(i) != self.version:
                self.held[i] = self.version
                self.sent[i] = self.sent.get(i, 0) + self.size

    def take_round(self) -> dict[int, int]:
        sent, self.sent = self.sent, {}
        return sent


def weighted(values: dict[int, dict], key: str, weight_key: str) -> float:
    pairs = [(v[key], v[weight_key]) for v in values.values() if v.get(key) is not None and v[key] == v[key]]
    total = sum(w for _, w in pairs)
    return float(sum(x * w for x, w in pairs) / total) if total else float("nan")


def run(cfg: RunConfig, run_dir: Path, progress: Progress | None = None) -> dict:
    progress = progress or Progress(enabled=False)
    rd = RunDir(run_dir)
    rd.path.mkdir(parents=True, exist_ok=True)
    n = cfg.data.num_platforms
    everyone = list(range(n))
    strategy = STRATEGIES[cfg.strategy.name]
    task = task_of(cfg)
    primary = task.primary
    t_start = time.monotonic()

    # --- Setup: resolved config, base model for plain-transformers users, the platforms -------
    rd.save_config(to_dict(cfg))
    if is_builtin(cfg.model):
        progress.phase("saving the built-in base model")
        save_base(cfg.model, cfg.seed, rd.base_model, num_labels=len(task.verbalizer))
    base_name = str(rd.base_model.resolve()) if is_builtin(cfg.model) else resolve_name(cfg.model.name_or_path)
    progress.phase(f"starting {n} platforms on the {cfg.backend} backend (each loads its own data)")
    backend = make_backend(cfg)
    try:
        info = _require_all(backend.call(everyone, "describe", timeout_s=SETUP_TIMEOUT_S), "start")
        bad = [info[i]["user_error"] for i in everyone if info[i].get("user_error")]
        if bad:
            raise UserError(bad[0])
        names = {i: info[i]["name"] for i in everyone}
        write_json(rd.platforms, [info[i] for i in everyone])
        progress.info(_platform_table(info, getattr(backend, "resources", None)))
        global_state: AdapterState = _require_all(
            backend.call([0], "initial_adapter", timeout_s=SETUP_TIMEOUT_S), "initialise"
        )[0]
        downlink = Downlink(size=state_nbytes(global_state))
        strategy_state: dict = {}
        handle = backend.put(global_state)
        progress.phase("evaluating the initial adapter")
        downlink.send(everyone)
        initial = backend.call(everyone, "evaluate", handle, timeout_s=cfg.server.round_timeout_s).results
        downlink.take_round()  # the initial download is setup, not round 1's traffic
        initial_metrics = global_metrics(initial)
        progress.info(
            f"round   0/{cfg.server.rounds}  loss {initial_metrics['eval_loss']:.3f}  "
            f"{primary} {initial_metrics.get(primary, float('nan')):.3f}  (before training)"
        )
        history = []

        for rnd in range(1, cfg.server.rounds + 1):
            secs: dict[str, float] = {}
            t_round = t = time.monotonic()

            # 1. Sample this round's cohort ------------------------------------------------------
            cohort = sample_cohort(cfg.seed, rnd, n, cfg.server.platforms_per_round)
            secs["sample"] = time.monotonic() - t

            # 2. Broadcast the global adapter: stored once, every platform reads the same copy ---
            t = time.monotonic()
            downlink.send(cohort)
            secs["broadcast"] = time.monotonic() - t

            # 3. Local training on each sampled platform, collected until the deadline -----------
            progress.phase(f"round {rnd}: {len(cohort)} platforms training")
            t = time.monotonic()
            trained = backend.call(cohort, "train", handle, rnd, timeout_s=cfg.server.round_timeout_s)
            secs["train"] = time.monotonic() - t

            # 4. Aggregate: weighted mean of the updates, server step --------------------------
            t = time.monotonic()
            arrived = sorted(trained.results)
            skipped = None
            if len(arrived) >= cfg.server.min_platforms:
                updates = [trained.results[i]["update"] for i in arrived]
                weights = [trained.results[i]["num_examples"] for i in arrived]
                global_state, strategy_state = strategy.step(
                    global_state, updates, weights, strategy_state, server_lr=cfg.strategy.server_lr
                )
                handle = backend.put(global_state)
                downlink.version += 1
            else:
                if trained.errors and not trained.late:
                    raise RunFailed(_failure_message(rnd, trained, names, cfg.server.min_platforms))
                skipped = f"{len(arrived)} of {cfg.server.min_platforms} required updates arrived"
            secs["aggregate"] = time.monotonic() - t

            # 5. Evaluate the global adapter on every platform's held-out split -----------------
            progress.phase(f"round {rnd}: evaluating on {n} platforms")
            t = time.monotonic()
            downlink.send(everyone)
            evals = backend.call(everyone, "evaluate", handle, timeout_s=cfg.server.round_timeout_s)
            secs["evaluate"] = time.monotonic() - t

            # 6. Log the round and save the global adapter ---------------------------------------
            t = time.monotonic()
            record = _round_record(rnd, primary, names, cohort, trained, evals, downlink.take_round(), skipped)
            save_adapter(global_state, cfg.model, rd.adapter, base_name)
            secs["save"] = time.monotonic() - t
            secs["round"] = time.monotonic() - t_round
            record["adapter_bytes"] = downlink.size
            record["seconds"] = {k: round(v, 4) for k, v in secs.items()}
            rd.log_round(record)
            history.append(record)
            progress.round_line(record, cfg.server.rounds)
    finally:
        progress.phase("stopping the platforms")
        backend.shutdown()
        progress.close()

    summary = _summary(cfg, primary, rd, history, initial_metrics, info, downlink.size, time.monotonic() - t_start)
    write_json(rd.summary, summary)
    return summary


def _require_all(collected: Collected, what: str) -> dict:
    if collected.errors or collected.late:
        parts = [f"platform {i}: {e}" for i, e in sorted(collected.errors.items())]
        parts += [f"platform {i}: no answer in time" for i in collected.late]
        raise RunFailed(f"platforms failed to {what}:\n" + "\n".join(parts))
    return collected.results


def _failure_message(rnd: int, trained: Collected, names: dict, need: int) -> str:
    lines = [f"round {rnd}: {len(trained.results)} updates arrived, {need} needed (server.min_platforms)"]
    lines += [f"  {names[i]}: {err}" for i, err in sorted(trained.errors.items())]
    return "\n".join(lines)


def global_metrics(evals: dict[int, dict]) -> dict[str, float]:
    """Every evaluation metric averaged over platforms, weighted by held-out size."""
    keys = sorted({k for e in evals.values() for k in e} - {"num_eval", "eval_seconds"})
    return {k: weighted(evals, k, "num_eval") for k in keys}


def _round_record(rnd, primary, names, cohort, trained: Collected, evals: Collected, sent: dict, skipped) -> dict:
    platforms = {}
    for i, name in names.items():
        p: dict = {"participated": i in trained.results}
        if i in trained.results:
            r = trained.results[i]
            p.update(r["metrics"])
            p["num_examples"] = r["num_examples"]
            p["bytes_up"] = r["bytes"]
        else:
            p["bytes_up"] = 0
        p["bytes_down"] = sent.get(i, 0)
        p.update(evals.results.get(i, {}))
        platforms[name] = p
    ev = evals.results
    train_losses = {
        i: {"train_loss": trained.results[i]["metrics"]["train_loss"], "n": trained.results[i]["num_examples"]}
        for i in trained.results
    }
    record = {
        "round": rnd,
        **global_metrics(ev),
        "metric": primary,
        "train_loss": weighted(train_losses, "train_loss", "n"),
        "platforms": platforms,
        "cohort": [names[i] for i in cohort],
        "late": [names[i] for i in trained.late],
        "failed": {names[i]: e for i, e in trained.errors.items()},
        "eval_failed": {names[i]: e for i, e in evals.errors.items()} | {names[i]: "late" for i in evals.late},
        "bytes_up": int(sum(p["bytes_up"] for p in platforms.values())),
        "bytes_down": int(sum(sent.values())),
    }
    if skipped:
        record["skipped"] = skipped
    return record


def _summary(cfg, primary, rd, history, initial, info, adapter_bytes, wall) -> dict:
    last = history[-1] if history else {}
    best = max(history, key=lambda r: r.get(primary) if r.get(primary) == r.get(primary) else -1, default={})
    skip = {
        "round",
        "platforms",
        "cohort",
        "late",
        "failed",
        "eval_failed",
        "bytes_up",
        "bytes_down",
        "seconds",
        "adapter_bytes",
        "metric",
        "skipped",
    }
    return {
        "name": cfg.name,
        "run_dir": str(rd.path),
        "task": cfg.data.task,
        "strategy": cfg.strategy.name,
        "backend": cfg.backend,
        "rounds": len(history),
        "initial": initial,
        "metric": primary,
        "final": {k: v for k, v in last.items() if k not in skip},
        "final_platforms": {
            name: {k: v for k, v in p.items() if k in last or k == "eval_loss"}
            for name, p in last.get("platforms", {}).items()
        },
        "best_round": {"round": best.get("round"), primary: best.get(primary)},
        "adapter_bytes": adapter_bytes,
        "bytes_up_total": int(sum(r["bytes_up"] for r in history)),
        "bytes_down_total": int(sum(r["bytes_down"] for r in history)),
        "wall_seconds": round(wall, 2),
        "platforms": [info[i] for i in sorted(info)],
    }


def _platform_table(info: dict, resources: dict | None) -> str:
    lines = [f"{'platform':<16} {'train':>6} {'eval':>6} {'positive':>9}  device"]
    for i in sorted(info):
        p = info[i]
        lines.append(
            f"{p['name']:<16} {p['num_train']:>6} {p['num_eval']:>6} {p['train_positive_rate']:>9.2f}  {p['device']}"
        )
    if resources:
        lines.append(
            f"each platform actor: {resources['cpus_per_platform']:g} CPU, {resources['gpus_per_platform']:g} GPU"
        )
    return "\n".join(lines)
