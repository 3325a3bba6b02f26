"""The federated round loop, top to bottom.

    setup:  start the platforms (each loads its own data); a fresh run evaluates the initial
            adapter, a resumed run (`--resume`) picks up its newest checkpoint
    round:  sample -> broadcast -> local training (deadline) -> validate -> aggregate
            -> evaluate -> log, save, checkpoint

Only adapter tensors and aggregate numbers pass through here; records never do.

When things go wrong: a platform whose process died, that raised, that missed the deadline or
sent an invalid update is left out of the round. The round goes on if at least
`server.min_platforms` valid updates came in; otherwise it is retried (`server.too_few=retry`,
up to `server.round_retries` times) or the run stops with the reason (`RunFailed`), the global
model untouched. A dead platform is restarted and rejoins the next round; one that fails
`server.max_failures` rounds in a row is excluded from the run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fl_llm import checkpoint
from fl_llm.config import RunConfig, to_dict
from fl_llm.data.sources import task_of
from fl_llm.errors import UserError
from fl_llm.model.adapters import AdapterState, save_adapter, state_nbytes
from fl_llm.model.build import is_builtin, resolve_name, save_base
from fl_llm.progress import Progress
from fl_llm.server.backends import Collected, make_backend
from fl_llm.server.guard import Failures, check_update
from fl_llm.strategies import STRATEGIES
from fl_llm.tracking import RunDir, write_json

SETUP_TIMEOUT_S = 1800.0  # loading a large base model on every platform can take a while


class RunFailed(RuntimeError):
    """The federation cannot go on (e.g. too few platforms answered); the message says why."""


def sample_cohort(seed: int, round_: int, active: list[int], per_round: int) -> list[int]:
    """Platforms that train this round: every active one, or `per_round` of them drawn without
    replacement from a generator seeded by (seed, round)."""
    if per_round == 0 or per_round >= len(active):
        return list(active)
    rng = np.random.default_rng([seed, round_, 0x5A3])
    return sorted(rng.choice(np.asarray(active), size=per_round, replace=False).tolist())


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

    def forget(self, i: int) -> None:
        """A restarted platform holds nothing: it downloads the current version again."""
        self.held.pop(i, None)


@dataclass
class Federation:
    """Everything the driver carries from one round to the next: what a checkpoint holds."""

    round: int
    global_state: AdapterState
    strategy_state: dict
    downlink: Downlink
    failures: Failures
    initial: dict
    platform_state: dict[int, dict] = field(default_factory=dict)
    elapsed_s: float = 0.0  # wall time spent in earlier processes of this run (before a resume)

    def to_checkpoint(self, elapsed_s: float, history: list[dict]) -> dict:
        return {
            "history": history,  # metrics.jsonl up to this round: a resume rewrites the file from it
            "round": self.round,
            "global_state": self.global_state,
            "strategy_state": self.strategy_state,
            "downlink": {
                "size": self.downlink.size,
                "version": self.downlink.version,
                "held": {str(k): v for k, v in self.downlink.held.items()},
            },
            "failures": self.failures.state(),
            "initial": self.initial,
            "platform_state": {str(k): v for k, v in self.platform_state.items()},
            "elapsed_s": elapsed_s,
        }

    @classmethod
    def from_checkpoint(cls, state: dict, max_failures: int) -> Federation:
        d = state["downlink"]
        return cls(
            round=int(state["round"]),
            global_state={k: np.asarray(v) for k, v in state["global_state"].items()},
            strategy_state=state["strategy_state"],
            downlink=Downlink(int(d["size"]), int(d["version"]), {int(k): int(v) for k, v in d["held"].items()}),
            failures=Failures.from_state(max_failures, state["failures"]),
            initial=state["initial"],
            platform_state={int(k): v for k, v in state["platform_state"].items()},
            elapsed_s=float(state["elapsed_s"]),
        )


def weighted(values: dict[int, dict], key: str, weight_key: str) -> float:
    pairs = [(v[key], v[weight_key]) for v in values.values() if v.get(key) is not None and v[key] == v[key]]
    total = sum(w for _, w in pairs)
    return float(sum(x * w for x, w in pairs) / total) if total else float("nan")


def run(cfg: RunConfig, run_dir: Path, progress: Progress | None = None, resume: bool = False) -> dict:
    progress = progress or Progress(enabled=False)
    rd = RunDir(run_dir)
    rd.path.mkdir(parents=True, exist_ok=True)
    n = cfg.data.num_platforms
    everyone = list(range(n))
    strategy = STRATEGIES[cfg.strategy.name]
    primary = task_of(cfg).primary
    timeout = cfg.server.round_timeout_s
    t_start = time.monotonic()
    resume_from = checkpoint.latest(rd.checkpoints) if resume else None
    if resume and resume_from is None:
        raise UserError(
            f"--resume {str(rd.path)!r}: no checkpoint there (checkpoint.every was 0, or it never ended a round)"
        )

    # --- Setup: resolved config, base model for plain-transformers users, the platforms -------
    if not resume:
        rd.save_config(to_dict(cfg))
    if is_builtin(cfg.model) and not (rd.base_model / "config.json").exists():
        progress.phase("saving the built-in base model")
        save_base(cfg.model, cfg.seed, rd.base_model, num_labels=len(task_of(cfg).verbalizer))
    base_name = str(rd.base_model.resolve()) if is_builtin(cfg.model) else resolve_name(cfg.model.name_or_path)
    progress.phase(f"starting {n} platforms on the {cfg.backend} backend (each loads its own data)")
    backend = make_backend(cfg, rd.path.name)
    fed: Federation | None = None
    history: list[dict] = []
    info: dict = {}
    try:
        info = _require_all(backend.call(everyone, "describe", timeout_s=SETUP_TIMEOUT_S), "start")
        bad = [info[i]["user_error"] for i in everyone if info[i].get("user_error")]
        if bad:
            raise UserError(bad[0])
        names = {i: info[i]["name"] for i in everyone}
        write_json(rd.platforms, [info[i] for i in everyone])
        progress.info(_platform_table(info, getattr(backend, "resources", None)))
        if resume_from is not None:
            ckpt_round, state = checkpoint.load(resume_from)
            fed = Federation.from_checkpoint(state, cfg.server.max_failures)
            history = state["history"]
            rd.rewrite_metrics(history)  # rounds logged after the checkpoint are redone
            for i, st in fed.platform_state.items():
                if st:
                    _require_all(backend.call([i], "import_state", st, timeout_s=SETUP_TIMEOUT_S), "restore")
            fed.downlink.held.clear()  # the new platform processes hold no adapter yet
            progress.info(f"resuming after round {fed.round} from {resume_from}")
        else:
            fed = _start_fresh(cfg, backend, everyone, progress, primary)
        handle = backend.put(fed.global_state)

        for rnd in range(fed.round + 1, cfg.server.rounds + 1):
            secs: dict[str, float] = {k: 0.0 for k in ("sample", "broadcast", "train", "validate")}
            t_round = time.monotonic()
            attempts: list[dict] = []
            restarted: list[int] = []
            for attempt in range(1 + (cfg.server.round_retries if cfg.server.too_few == "retry" else 0)):
                # 1. Sample this round's cohort among the platforms still in the federation ------
                t = time.monotonic()
                active = fed.failures.active(everyone)
                if len(active) < cfg.server.min_platforms:
                    raise RunFailed(_excluded_message(rnd, fed.failures, names, cfg.server.min_platforms))
                cohort = sample_cohort(cfg.seed, rnd, active, cfg.server.platforms_per_round)
                secs["sample"] += time.monotonic() - t

                # 2. Broadcast the global adapter: stored once, every platform reads the same copy
                t = time.monotonic()
                fed.downlink.send(cohort)
                secs["broadcast"] += time.monotonic() - t

                # 3. Local training on each sampled platform, collected until the deadline -------
                progress.phase(f"round {rnd}: {len(cohort)} platforms training")
                t = time.monotonic()
                trained = backend.call(cohort, "train", handle, rnd, attempt, timeout, timeout_s=timeout)
                secs["train"] += time.monotonic() - t

                # 4. Validate: only well-formed, finite, bounded updates go on; restart the dead -
                t = time.monotonic()
                accepted, rejected = _validate(trained, fed.global_state, cfg.server.max_update_norm)
                restarted += _restart(backend, trained.dead, fed)
                secs["validate"] += time.monotonic() - t
                if len(accepted) >= cfg.server.min_platforms:
                    break
                attempts.append(_attempt_record(attempt, names, trained, rejected))
                progress.info(
                    f"round {rnd}: {len(accepted)} valid updates, {cfg.server.min_platforms} needed "
                    f"(server.min_platforms); attempt {attempt + 1} failed: {_causes_line(trained, rejected, names)}"
                )
            else:
                raise RunFailed(_too_few_message(rnd, attempts, cfg))
            causes = {**trained.errors, **{i: "late" for i in trained.late}, **rejected}
            newly_excluded = fed.failures.record(cohort, set(accepted), causes)
            for i, why in newly_excluded.items():
                progress.warn(f"platform {names[i]} is EXCLUDED from the rest of the run: {why}")

            # 5. Aggregate: the strategy's step on the valid updates ----------------------------
            t = time.monotonic()
            updates = [trained.results[i]["update"] for i in accepted]
            weights = [trained.results[i]["num_examples"] for i in accepted]
            fed.global_state, fed.strategy_state = strategy.step(
                fed.global_state, updates, weights, fed.strategy_state, server_lr=cfg.strategy.server_lr
            )
            handle = backend.put(fed.global_state)
            fed.downlink.version += 1
            secs["aggregate"] = time.monotonic() - t

            # 6. Evaluate the global adapter on every platform still in the federation ----------
            in_run = fed.failures.active(everyone)
            progress.phase(f"round {rnd}: evaluating on {len(in_run)} platforms")
            t = time.monotonic()
            fed.downlink.send(in_run)
            evals = backend.call(in_run, "evaluate", handle, timeout_s=timeout)
            restarted += _restart(backend, evals.dead, fed)
            secs["evaluate"] = time.monotonic() - t

            # 7. Log the round, save the global adapter, checkpoint the whole state --------------
            t = time.monotonic()
            record = _round_record(rnd, primary, names, cohort, trained, accepted, rejected, evals, fed.downlink)
            record.update(
                restarted=[names[i] for i in restarted],
                excluded={names[i]: why for i, why in newly_excluded.items()},
                active=[names[i] for i in fed.failures.active(everyone)],
                attempts=attempts,
            )
            save_adapter(fed.global_state, cfg.model, rd.adapter, base_name)
            fed.round = rnd
            due = cfg.checkpoint.every and (rnd % cfg.checkpoint.every == 0 or rnd == cfg.server.rounds)
            if due:
                fed.platform_state = _collect_platform_state(backend, in_run, fed.platform_state)
            secs["save"] = time.monotonic() - t
            secs["round"] = time.monotonic() - t_round
            record["adapter_bytes"] = fed.downlink.size
            record["seconds"] = {k: round(v, 4) for k, v in secs.items()}
            history.append(record)
            if due:  # before the metrics line: a crash in between is redone from the checkpoint
                elapsed = fed.elapsed_s + time.monotonic() - t_start
                checkpoint.save(rd.checkpoints, rnd, fed.to_checkpoint(elapsed, history), keep=cfg.checkpoint.keep)
            rd.log_round(record)
            progress.round_line(record, cfg.server.rounds)
    except RunFailed as e:
        if fed is not None:
            summary = _summary(cfg, primary, rd, history, fed, info, time.monotonic() - t_start)
            write_json(rd.summary, {**summary, "status": "failed", "error": str(e)})
        raise
    finally:
        progress.phase("stopping the platforms")
        backend.shutdown()
        progress.close()

    summary = _summary(cfg, primary, rd, history, fed, info, time.monotonic() - t_start)
    write_json(rd.summary, summary)
    return summary


def _start_fresh(cfg: RunConfig, backend, everyone: list[int], progress: Progress, primary: str) -> Federation:
    """Round 0: the initial adapter (identical on every platform: same seed), evaluated."""
    global_state: AdapterState = _require_all(
        backend.call([0], "initial_adapter", timeout_s=SETUP_TIMEOUT_S), "initialise"
    )[0]
    fed = Federation(
        round=0,
        global_state=global_state,
        strategy_state={},
        downlink=Downlink(size=state_nbytes(global_state)),
        failures=Failures(cfg.server.max_failures),
        initial={},
    )
    progress.phase("evaluating the initial adapter")
    fed.downlink.send(everyone)
    initial = backend.call(everyone, "evaluate", backend.put(global_state), timeout_s=cfg.server.round_timeout_s)
    fed.downlink.take_round()  # the initial download is setup, not round 1's traffic
    fed.initial = global_metrics(initial.results)
    progress.info(
        f"round   0/{cfg.server.rounds}  loss {fed.initial['eval_loss']:.3f}  "
        f"{primary} {fed.initial.get(primary, float('nan')):.3f}  (before training)"
    )
    return fed


def _validate(trained: Collected, reference: AdapterState, max_norm: float | None) -> tuple[list[int], dict[int, str]]:
    """(platforms whose update may be aggregated, {platform: why its update was rejected})."""
    accepted, rejected = [], {}
    for i in sorted(trained.results):
        why = check_update(trained.results[i].get("update"), reference, max_norm)
        if why is None:
            accepted.append(i)
        else:
            rejected[i] = f"update rejected: {why}"
    return accepted, rejected


def _restart(backend, dead: list[int], fed: Federation) -> list[int]:
    """Start a new process for each dead platform; it rejoins with the state it last checkpointed."""
    for i in dead:
        backend.restart(i)
        fed.downlink.forget(i)
        if fed.platform_state.get(i):
            backend.call([i], "import_state", fed.platform_state[i], timeout_s=SETUP_TIMEOUT_S)
    return list(dead)


def _collect_platform_state(backend, ids: list[int], previous: dict[int, dict]) -> dict[int, dict]:
    got = backend.call(ids, "export_state", timeout_s=SETUP_TIMEOUT_S).results
    return {**previous, **{i: s for i, s in got.items()}}


def _require_all(collected: Collected, what: str) -> dict:
    if collected.errors or collected.late:
        parts = [f"platform {i}: {e}" for i, e in sorted(collected.errors.items())]
        parts += [f"platform {i}: no answer in time" for i in collected.late]
        raise RunFailed(f"platforms failed to {what}:\n" + "\n".join(parts))
    return collected.results


def _causes_line(trained: Collected, rejected: dict[int, str], names: dict) -> str:
    causes = {**{i: e.splitlines()[0][:160] for i, e in trained.errors.items()}, **rejected}
    causes |= {i: "late" for i in trained.late}
    return "; ".join(f"{names[i]}: {c}" for i, c in sorted(causes.items())) or "none"


def _attempt_record(attempt: int, names: dict, trained: Collected, rejected: dict[int, str]) -> dict:
    return {
        "attempt": attempt,
        "arrived": [names[i] for i in sorted(trained.results)],
        "failed": {names[i]: e for i, e in trained.errors.items()},
        "late": [names[i] for i in trained.late],
        "rejected": {names[i]: r for i, r in rejected.items()},
    }


def _too_few_message(rnd: int, attempts: list[dict], cfg: RunConfig) -> str:
    lines = [
        f"round {rnd}: fewer than server.min_platforms ({cfg.server.min_platforms}) valid updates in "
        f"{len(attempts)} attempt(s); the global model is unchanged since round {rnd - 1} "
        "(resume from the last checkpoint with `fl-llm run --resume RUN_DIR`)"
    ]
    last = attempts[-1]
    lines += [f"  {name}: {err.strip().splitlines()[-1]}" for name, err in last["failed"].items()]
    lines += [f"  {name}: late (server.round_timeout_s)" for name in last["late"]]
    lines += [f"  {name}: {why}" for name, why in last["rejected"].items()]
    return "\n".join(lines)


def _excluded_message(rnd: int, failures: Failures, names: dict, need: int) -> str:
    lines = [f"round {rnd}: fewer than server.min_platforms ({need}) platforms are left in the federation"]
    lines += [f"  {names[i]}: excluded, {why}" for i, why in sorted(failures.excluded.items())]
    return "\n".join(lines)


def global_metrics(evals: dict[int, dict]) -> dict[str, float]:
    """Every evaluation metric averaged over platforms, weighted by held-out size."""
    keys = sorted({k for e in evals.values() for k in e} - {"num_eval", "eval_seconds"})
    return {k: weighted(evals, k, "num_eval") for k in keys}


def _round_record(rnd, primary, names, cohort, trained: Collected, accepted, rejected, evals: Collected, downlink):
    sent = downlink.take_round()
    platforms = {}
    for i, name in names.items():
        p: dict = {"participated": i in accepted}
        if i in trained.results and i in accepted:
            r = trained.results[i]
            p.update(r["metrics"])
            p["num_examples"] = r["num_examples"]
            p["bytes_up"] = r["bytes"]
        else:
            p["bytes_up"] = trained.results[i]["bytes"] if i in trained.results else 0
        p["bytes_down"] = sent.get(i, 0)
        p.update(evals.results.get(i, {}))
        platforms[name] = p
    train_losses = {
        i: {"train_loss": trained.results[i]["metrics"]["train_loss"], "n": trained.results[i]["num_examples"]}
        for i in accepted
    }
    return {
        "round": rnd,
        **global_metrics(evals.results),
        "metric": primary,
        "train_loss": weighted(train_losses, "train_loss", "n"),
        "platforms": platforms,
        "cohort": [names[i] for i in cohort],
        "late": [names[i] for i in trained.late],
        "failed": {names[i]: e for i, e in trained.errors.items()},
        "rejected": {names[i]: why for i, why in rejected.items()},
        "eval_failed": {names[i]: e for i, e in evals.errors.items()} | {names[i]: "late" for i in evals.late},
        "bytes_up": int(sum(p["bytes_up"] for p in platforms.values())),
        "bytes_down": int(sum(sent.values())),
    }


_NOT_METRICS = {
    "round",
    "platforms",
    "cohort",
    "late",
    "failed",
    "rejected",
    "eval_failed",
    "bytes_up",
    "bytes_down",
    "seconds",
    "adapter_bytes",
    "metric",
    "restarted",
    "excluded",
    "active",
    "attempts",
}


def _summary(cfg, primary, rd, history, fed: Federation, info, wall) -> dict:
    last = history[-1] if history else {}
    best = max(history, key=lambda r: r.get(primary) if r.get(primary) == r.get(primary) else -1, default={})
    names = {i: p["name"] for i, p in info.items()}
    return {
        "name": cfg.name,
        "status": "completed",
        "run_dir": str(rd.path),
        "task": cfg.data.task,
        "strategy": cfg.strategy.name,
        "backend": cfg.backend,
        "rounds": len(history),
        "initial": fed.initial,
        "metric": primary,
        "final": {k: v for k, v in last.items() if k not in _NOT_METRICS},
        "final_platforms": {
            name: {k: v for k, v in p.items() if k in last or k == "eval_loss"}
            for name, p in last.get("platforms", {}).items()
        },
        "best_round": {"round": best.get("round"), primary: best.get(primary)},
        "adapter_bytes": fed.downlink.size,
        "bytes_up_total": int(sum(r["bytes_up"] for r in history)),
        "bytes_down_total": int(sum(r["bytes_down"] for r in history)),
        "failures": {
            "failed": sum(len(r.get("failed", {})) for r in history),
            "late": sum(len(r.get("late", [])) for r in history),
            "rejected": sum(len(r.get("rejected", {})) for r in history),
            "restarted": sum(len(r.get("restarted", [])) for r in history),
            "retried_rounds": sum(1 for r in history if r.get("attempts")),
        },
        "excluded": {names.get(i, str(i)): why for i, why in fed.failures.excluded.items()},
        "wall_seconds": round(fed.elapsed_s + wall, 2),
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
