"""The federated round loop, top to bottom.

    setup:  start the platforms (each loads its own data); a fresh run evaluates the initial
            adapter, a resumed run (`--resume`) picks up its newest checkpoint
    round:  sample -> broadcast -> train and collect (deadline) -> validate (or unmask)
            -> aggregate -> evaluate -> record (files written on a thread while the next round trains)

`run` reads as those phases, one function each. How updates travel — plain, compressed, or
masked under secure aggregation, where the driver never holds one platform's update — is the
uplink's business (`fl_llm.server.uplink`): validation and aggregation are one call each.

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
from functools import partial
from pathlib import Path

import numpy as np

from fl_llm import checkpoint
from fl_llm.client.api import PlatformAPI
from fl_llm.config import RunConfig
from fl_llm.generation import generation_due
from fl_llm.progress import Progress
from fl_llm.server.backends import Collected
from fl_llm.server.federation import Federation
from fl_llm.server.privacy import Privacy
from fl_llm.server.records import (
    attempt_record,
    causes_line,
    excluded_message,
    round_entry,
    run_summary,
    too_few_message,
)
from fl_llm.server.setup import (  # noqa: F401 - RunFailed, SETUP_TIMEOUT_S, with_state_dir: for callers
    SETUP_TIMEOUT_S,
    Run,
    RunFailed,
    checkpoint_to_resume,
    control_handle,
    setup,
    start,
    with_state_dir,
)
from fl_llm.server.writer import write_round
from fl_llm.strategies.step import aggregate_round
from fl_llm.tracking import RunDir, write_json


def sample_cohort(seed: int, round_: int, active: list[int], per_round: int) -> list[int]:
    """Platforms that train this round: every active one, or `per_round` of them drawn without
    replacement from a generator seeded by (seed, round)."""
    if per_round == 0 or per_round >= len(active):
        return list(active)
    rng = np.random.default_rng([seed, round_, 0x5A3])
    return sorted(rng.choice(np.asarray(active), size=per_round, replace=False).tolist())


@dataclass
class Round:
    """One round in progress: the last attempt's cohort and answers, and the round's bookkeeping."""

    rnd: int
    t_start: float
    secs: dict = field(default_factory=lambda: {k: 0.0 for k in ("sample", "broadcast", "train", "validate")})
    attempts: list[dict] = field(default_factory=list)
    restarted: list[int] = field(default_factory=list)
    cohort: list[int] = field(default_factory=list)
    trained: Collected | None = None
    accepted: list[int] = field(default_factory=list)
    rejected: dict[int, str] = field(default_factory=dict)
    excluded: dict[int, str] = field(default_factory=dict)
    samples: dict[str, list] = field(default_factory=dict)  # sample generations by platform name


def run(cfg: RunConfig, run_dir: Path, progress: Progress | None = None, resume: bool = False, on_started=None) -> dict:
    """Run (or, with `resume`, continue) the federated job in `run_dir`, holding the directory's
    lock throughout. `on_started()` is called once the platforms have loaded and validated their
    data: the CLI then removes the directory this run replaces (--overwrite)."""
    rd = RunDir(run_dir)
    with rd.lock():
        return _run(cfg, rd, progress or Progress(enabled=False), resume, on_started)


def _run(cfg: RunConfig, rd: RunDir, progress: Progress, resume: bool, on_started) -> dict:
    t_start = time.monotonic()
    rd.path.mkdir(parents=True, exist_ok=True)
    resume_from = checkpoint_to_resume(rd, progress) if resume else None
    # client-level DP calibrates its noise from the config alone: a budget it cannot meet is a
    # user error before anything starts (record level needs each platform's data size)
    privacy = Privacy.start(cfg, {}) if cfg.privacy.dp.level == "client" and not resume else None
    r = start(cfg, rd, progress, resume, t_start)
    fed: Federation | None = None
    try:
        fed = setup(r, resume_from, on_started, privacy)
        for rnd in range(fed.round + 1, cfg.server.rounds + 1):
            rs = _train_round(r, fed, rnd)  # sample -> broadcast -> train and collect -> validate
            if r.stopped:
                progress.warn(f"stopping before round {rnd}: {r.stopped}")
                break
            _count_failures(r, fed, rs)
            result, dp_stats = _aggregate(r, fed, rs)
            evals = _evaluate(r, fed, rs)
            _record(r, fed, rs, result, dp_stats, evals)
    except RunFailed as e:
        _end(r, fed, "failed", {"status": "failed", "error": str(e)})
        raise
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (the CLI turns it into this)
        _end(r, fed, "killed", {"status": "interrupted", "resume": f"fl-llm run --resume {rd.path}"})
        raise
    except BaseException:
        r.trackers.finish("failed")
        raise
    finally:
        _stop(r)
    return _finish(r, fed)


# --- one round --------------------------------------------------------------------------------


def _train_round(r: Run, fed: Federation, rnd: int) -> Round:
    """Sample, broadcast, train and collect, validate — again while too few valid updates came
    in and retries are left (server.too_few=retry), else the run stops."""
    cfg = r.cfg
    rs = Round(rnd, time.monotonic())
    for attempt in range(1 + (cfg.server.round_retries if cfg.server.too_few == "retry" else 0)):
        if not _sample(r, fed, rs, attempt):
            return rs  # the privacy budget is spent: r.stopped says so
        training = _broadcast(r, fed, rs, attempt)
        _collect(r, fed, rs, training)
        _validate(r, fed, rs)
        if len(rs.accepted) >= cfg.server.min_platforms:
            return _commit(r, rs)
        if fed.privacy.no_retry:  # the noise was booked for this sample, whatever its size
            r.progress.info(
                f"round {rnd}: {len(rs.accepted)} valid updates from the sampled cohort, fewer than "
                f"server.min_platforms ({cfg.server.min_platforms}); released with client-level DP noise"
            )
            return _commit(r, rs)
        rs.attempts.append(attempt_record(attempt, r.names, rs.trained, rs.rejected))
        r.progress.info(
            f"round {rnd}: {len(rs.accepted)} valid updates, {cfg.server.min_platforms} needed "
            f"(server.min_platforms); attempt {attempt + 1} failed: {causes_line(rs.trained, rs.rejected, r.names)}"
        )
    raise RunFailed(too_few_message(rnd, rs.attempts, cfg))


def _sample(r: Run, fed: Federation, rs: Round, attempt: int) -> bool:
    """1. This attempt's cohort among the platforms still in the federation; False when the
    privacy budget would be passed."""
    t = time.monotonic()
    active = fed.failures.active(r.everyone)
    if len(active) < r.cfg.server.min_platforms:
        raise RunFailed(excluded_message(rs.rnd, fed.failures, r.names, r.cfg.server.min_platforms))
    rs.cohort = _cohort(r.cfg, fed.privacy, rs.rnd, attempt, active)
    r.stopped = fed.privacy.exhausted([r.names[i] for i in rs.cohort])
    rs.secs["sample"] += time.monotonic() - t
    return not r.stopped


def _broadcast(r: Run, fed: Federation, rs: Round, attempt: int) -> dict[int, tuple]:
    """2. The global adapter, stored once for every platform (plus what each lacks of the base
    merges, and SCAFFOLD's control variate); the uplink may first run its own exchange (secure
    aggregation's keys and shares) and say who trains. Returns each trainer's arguments."""
    t = time.monotonic()
    training = r.uplink.open(r.backend, rs.cohort, rs.rnd, fed)
    fed.downlink.send(training)
    timeout = r.cfg.server.round_timeout_s
    args = {
        i: (r.handle, rs.rnd, attempt, timeout, r.control, fed.merges.payload(i), r.uplink.masking(i, fed))
        for i in training
    }
    for i in training:
        fed.downlink.add(i, fed.merges.payload_bytes(i) + (fed.downlink.size if r.control else 0))
    rs.secs["broadcast"] += time.monotonic() - t
    return args


def _collect(r: Run, fed: Federation, rs: Round, args: dict[int, tuple]) -> None:
    """3. Local training on each platform, collected until the deadline."""
    r.progress.phase(f"round {rs.rnd}: {len(args)} platforms training")
    t = time.monotonic()
    rs.trained = r.backend.call_each(args, PlatformAPI.train, timeout_s=r.cfg.server.round_timeout_s)
    fed.merges.confirm(rs.trained.results)
    fed.privacy.spend_training(rs.trained.results, r.names)  # every update received spent budget
    rs.secs["train"] += time.monotonic() - t


def _validate(r: Run, fed: Federation, rs: Round) -> None:
    """4. Only well-formed, finite, bounded updates go on (under secure aggregation: the masked
    uploads' form, then the survivors' shares unmask the sum); the dead are restarted."""
    t = time.monotonic()
    rs.accepted, rs.rejected = r.uplink.accept(r.backend, rs.trained, fed)
    rs.restarted += _restart(r.backend, rs.trained.dead, fed)
    rs.secs["validate"] += time.monotonic() - t


def _commit(r: Run, rs: Round) -> Round:
    """The round's updates are final: each accepted platform keeps the state its training staged
    (control variates, personal B, optimizer moments, residuals); the others keep theirs as it was."""
    t = time.monotonic()
    if rs.accepted:
        r.backend.call(rs.accepted, PlatformAPI.commit, rs.rnd, timeout_s=SETUP_TIMEOUT_S)
    rs.secs["validate"] += time.monotonic() - t
    return rs


def _count_failures(r: Run, fed: Federation, rs: Round) -> None:
    """Who failed this round, in a row: a platform past server.max_failures is excluded."""
    trained = rs.trained
    causes = {**trained.errors, **{i: "late" for i in trained.late}, **rs.rejected}
    rs.excluded = fed.failures.record(rs.cohort, set(rs.accepted), causes)
    for i, why in rs.excluded.items():
        r.progress.warn(f"platform {r.names[i]} is EXCLUDED from the rest of the run: {why}")


def _aggregate(r: Run, fed: Federation, rs: Round):
    """5. The strategy's step on the valid updates, as the uplink hands them over (at the global
    rank; under client-level DP their clipped, noised mean)."""
    cfg, t = r.cfg, time.monotonic()
    updates, weights, dp_stats = r.uplink.inputs(rs.trained, rs.accepted, fed, rs.rnd)
    if fed.privacy.level == "client":
        fed.privacy.spend_round()
    result = aggregate_round(
        r.strategy,
        cfg.strategy,
        fed.global_state,
        updates,
        weights,
        fed.strategy_state,
        seed=cfg.seed,
        round_=rs.rnd,
        num_platforms=cfg.data.num_platforms,
        extras=[rs.trained.results[i].get("extra", {}) for i in rs.accepted],
        background=r.metrics_pool,  # aggregation_error: computed while the platforms evaluate
    )
    fed.global_state, fed.strategy_state = result.global_state, result.state
    if result.merge:
        fed.merges.add(result.merge)
    r.handle = r.backend.put(fed.global_state)
    r.control = control_handle(r.backend, r.strategy, fed)
    fed.downlink.version += 1
    rs.secs["aggregate"] = time.monotonic() - t
    return result, dp_stats


def _evaluate(r: Run, fed: Federation, rs: Round) -> Collected:
    """6. The new global model on every platform still in the federation."""
    in_run = fed.failures.active(r.everyone)
    r.progress.phase(f"round {rs.rnd}: evaluating on {len(in_run)} platforms")
    t = time.monotonic()
    fed.downlink.send(in_run)
    for i in in_run:
        fed.downlink.add(i, fed.merges.payload_bytes(i))
    generate = generation_due(r.cfg, rs.rnd)  # the instruction task: answers by generation
    evals = r.backend.call_each(
        {i: (r.handle, fed.merges.payload(i), False, generate) for i in in_run},
        PlatformAPI.evaluate,
        timeout_s=r.cfg.server.round_timeout_s,
    )
    rs.samples = {r.names[i]: e.pop("samples") for i, e in evals.results.items() if "samples" in e}
    fed.merges.confirm(evals.results)
    rs.restarted += _restart(r.backend, evals.dead, fed)
    rs.secs["evaluate"] = time.monotonic() - t
    return evals


def _record(r: Run, fed: Federation, rs: Round, result, dp_stats: dict, evals: Collected) -> None:
    """7. The round's record; the platforms save their own state when a checkpoint is due; then,
    on the writer thread while the next round trains, the evaluated model, the checkpoint and the
    metrics line, in that order."""
    cfg, t = r.cfg, time.monotonic()
    r.writer.wait()  # the previous round's files first: a slow disk is the driver's time
    record = round_entry(r, fed, rs, result, dp_stats, evals)
    in_run = fed.failures.active(r.everyone)
    if not r.strategy.one_global_model:  # FedSA: each platform writes its own adapter
        r.backend.call(
            in_run, PlatformAPI.save_personal, str(r.rd.path / "personal"), r.base_name, timeout_s=SETUP_TIMEOUT_S
        )
    fed.round = rs.rnd
    due = cfg.checkpoint.every and (rs.rnd % cfg.checkpoint.every == 0 or rs.rnd == cfg.server.rounds)
    if due:  # every platform saves what it keeps between rounds, in its own state dir
        r.backend.call(in_run, PlatformAPI.save_state, rs.rnd, cfg.checkpoint.keep, timeout_s=SETUP_TIMEOUT_S)
        fed.checkpointed = rs.rnd
    rs.secs["save"] = time.monotonic() - t
    rs.secs["round"] = time.monotonic() - rs.t_start
    record["adapter_bytes"] = fed.downlink.size
    record["seconds"] = {k: round(v, 4) for k, v in rs.secs.items()}
    r.history.append(record)
    elapsed = fed.elapsed_s + time.monotonic() - r.t_start
    r.writer.submit(
        partial(
            write_round,
            cfg,
            r.rd,
            rs.rnd,
            model=fed.global_state if r.strategy.one_global_model else None,
            deltas=fed.merges.base_weight_deltas() if result.merge else None,
            base_name=r.base_name,
            rank=max(r.ranks),
            frozen=checkpoint.freeze(fed.to_checkpoint(elapsed, r.history)) if due else None,
            record=record,
            samples=rs.samples,
        )
    )
    r.trackers.round(record)
    if fed.privacy.ledger is not None:
        write_json(r.rd.path / "privacy.json", fed.privacy.ledger.report())
    r.progress.round_line(record, cfg.server.rounds)


# --- the end ----------------------------------------------------------------------------------


def _end(r: Run, fed: Federation | None, tracker_status: str, status: dict) -> None:
    """A run that stops early: the rounds that ended (and their checkpoints) on disk first, then
    the summary saying how it ended."""
    r.writer.close()
    if fed is not None:
        summary = run_summary(r.cfg, r.primary, r.rd, r.history, fed, r.info, time.monotonic() - r.t_start)
        write_json(r.rd.summary, {**summary, **status})
    r.trackers.finish(tracker_status)


def _stop(r: Run) -> None:
    r.progress.phase("stopping the platforms")
    r.writer.close()
    r.metrics_pool.shutdown(wait=False, cancel_futures=True)
    r.backend.shutdown()
    r.progress.close()


def _finish(r: Run, fed: Federation) -> dict:
    summary = run_summary(r.cfg, r.primary, r.rd, r.history, fed, r.info, time.monotonic() - r.t_start)
    if r.stopped:
        summary["stopped"] = r.stopped
    if fed.privacy.ledger is not None:
        ledger = fed.privacy.ledger.state()
        summary["privacy"] = {k: v for k, v in ledger.items() if k != "parties"}
        summary["privacy"]["epsilon"] = {name: p["epsilon"] for name, p in ledger["parties"].items()}
    write_json(r.rd.summary, summary)
    r.trackers.finish("completed")
    return summary


# --- helpers ----------------------------------------------------------------------------------


def _restart(backend, dead: list[int], fed: Federation) -> list[int]:
    """Start a new process for each dead platform; it rejoins with the state it last checkpointed."""
    for i in dead:
        backend.restart(i)
        fed.downlink.forget(i)
        fed.merges.forget(i)
        if fed.checkpointed:
            backend.call([i], PlatformAPI.load_state, fed.checkpointed, timeout_s=SETUP_TIMEOUT_S)
    return list(dead)


def _cohort(cfg: RunConfig, privacy: Privacy, rnd: int, attempt: int, active: list[int]) -> list[int]:
    """This round's platforms. Sampled client-level DP: a Poisson sample the driver draws from the
    OS's cryptographic source — or, under secure aggregation, every active platform, each of which
    draws its own coin. Otherwise server.platforms_per_round of them, seeded by (seed, round)."""
    privacy.set_population(len(active))
    if privacy.self_sampling:
        return list(active)
    if privacy.sampled:
        return privacy.poisson_cohort(active, cfg.seed, rnd, attempt)
    return sample_cohort(cfg.seed, rnd, active, cfg.server.platforms_per_round)
