"""Personalisation: each platform's own model, fine-tuned locally from the federated one.

One global model serves platforms whose data differ only on average: a shop's own return windows,
its greeting, its label balance are what the average blurs. Personalising trains P more local
rounds (`client.local_steps` optimizer steps each) on each platform's own data, starting from the
federated model — either as a fresh local run starts them (the schedule's first rounds: warm-up,
then the peak learning rate) or, with the "continue" schedule, past the schedule's end at its
final rate (lr/10 under cosine): a gentle fine-tune that keeps what federation taught. An anchor
μ > 0 adds (μ/2)‖v − w‖² to every step's loss, w the federated model for all P rounds — Ditto's
personal objective (Li et al., 2021, "Ditto: Fair and Robust Federated Learning Through
Personalization"), here trained after the run instead of alongside it — so a fresh schedule can
relearn a platform's own behaviour at the full rate while staying near the shared model (it takes
the place of a FedProx run's own proximal term in these rounds). This is the personalised arm of
`fl-llm compare` and the `fl-llm personalise RUN_DIR` command, one code path for both.

`personalise_run` writes, for a finished run, RUN_DIR/personal/<name>/ — one PEFT adapter per
platform, what `fl-llm generate RUN_DIR --platform NAME` loads — and RUN_DIR/personal/personal.json
with each platform's held-out metrics under the global and under its own adapter. It is refused
where it would break a promise the run made: under differential privacy (the extra rounds spend
privacy the run's ledger does not count, and under client-level DP their updates reach the driver
un-noised), under secure aggregation (the driver would see each platform's plain update), for a
federation of organisations (each personal adapter would pass through the coordinator), and for
strategies without one global adapter (FedSA's and FedPer's models are personal already; FedEx and FLoRA merge
into the base).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np

from fl_llm.client.api import PlatformAPI
from fl_llm.config import RunConfig
from fl_llm.errors import UserError
from fl_llm.progress import Progress
from fl_llm.strategies.lora import update_to_global_rank
from fl_llm.tensors import AdapterState

SCHEDULES = ("fresh", "continue")


# --- the rounds, shared with fl-llm compare ----------------------------------------------------------------------------


def apply_update(cfg: RunConfig, platform: int, state: AdapterState, update: AdapterState) -> AdapterState:
    """state + a platform's update (at its LoRA rank, on the tensors its strategy sends); platform
    -1 is compare's pooled trainer, at the largest rank."""
    lora = cfg.model.lora
    ranks = lora.ranks or [lora.r] * cfg.data.num_platforms
    rank = ranks[platform] if platform >= 0 else max(ranks)
    update = update_to_global_rank(update, state, rank, lora.alpha, max(ranks))
    return {k: state[k] + update[k] if k in update else state[k] for k in state}


def sent_update(answer: dict) -> AdapterState:
    """The update a platform sent: plain, or compressed (compression.name) and decoded here."""
    from fl_llm.compression import decompress

    return decompress(answer["payload"]) if "payload" in answer else answer["update"]


def local_round(
    cfg: RunConfig, backend, states: dict[int, AdapterState], rnd: int, strict: bool = False, anchor: dict | None = None
) -> dict[int, AdapterState]:
    """One local round of round `rnd`'s schedule on every platform, each from its own state; a
    platform that did not answer keeps its state (`strict`: the round fails instead). Each commits
    what it keeps between rounds. `anchor` {"state", "mu"}: every platform's proximal term
    toward that adapter."""
    from fl_llm.server.setup import require_all

    timeout = cfg.server.round_timeout_s
    extra = (0, None, None, None, None, anchor) if anchor else ()  # train's attempt .. secagg, then anchor
    got = backend.call_each({i: (s, rnd, *extra) for i, s in states.items()}, PlatformAPI.train, timeout_s=timeout)
    trained = require_all(got, f"train in local round {rnd}") if strict else got.results
    backend.call(list(trained), PlatformAPI.commit, rnd, timeout_s=timeout)
    return {i: apply_update(cfg, i, s, sent_update(trained[i])) if i in trained else s for i, s in states.items()}


def personalise(
    cfg: RunConfig,
    backend,
    federated: AdapterState,
    rounds: int,
    schedule: str,
    progress: Progress,
    strict=False,
    anchor: float = 0.0,
) -> dict[int, AdapterState]:
    """Each platform's model after `rounds` local rounds from the federated one: rounds 1..P of
    the schedule ("fresh") or rounds R+1..R+P, past its end at the final rate ("continue").
    `anchor` μ > 0: each step also minimises (μ/2)‖v − w‖², w the federated model throughout —
    Ditto's personal objective (Li et al., 2021); 0: plain local fine-tuning.
    `strict`: a platform that fails a round fails the whole (else it keeps its model)."""
    offset = cfg.server.rounds if schedule == "continue" else 0
    states = {i: federated for i in range(cfg.data.num_platforms)}
    pull = {"state": federated, "mu": anchor} if anchor else None  # a nested ref would reach Ray unresolved
    for rnd in range(1, rounds + 1):
        progress.phase(f"personalised: local round {rnd}/{rounds} from the federated model")
        states = local_round(cfg, backend, states, offset + rnd, strict, pull)
    return states


def check_anchor(anchor: float, option: str) -> None:
    """μ of the anchor must be a finite number ≥ 0 (0: none); else a UserError naming `option`."""
    if not (isinstance(anchor, (int, float)) and math.isfinite(anchor) and anchor >= 0):
        raise UserError(f"{option} must be a finite number >= 0 (0: no anchor), got {anchor!r}")


def detailed(backend, states: dict[int, AdapterState], timeout: float, strict: bool = False) -> dict[int, dict]:
    """Each platform's detailed evaluation (interval, calibration; the instruction task: its
    held-out answers generated) of its model in `states`; `strict`: every platform or a failure."""
    from fl_llm.server.setup import require_all

    got = backend.call_each(
        {i: (state, None, True) for i, state in states.items()}, PlatformAPI.evaluate, timeout_s=timeout
    )
    return require_all(got, "evaluate") if strict else got.results


def settings(cfg: RunConfig, schedule: str | None = None, anchor: float | None = None) -> tuple[str, float]:
    """The personal rounds' schedule and anchor μ: the command line's where it gave them, else the
    config's `personalise` section (a task's config can say which schedule suits it)."""
    return (
        cfg.personalise.schedule if schedule is None else schedule,
        cfg.personalise.anchor if anchor is None else anchor,
    )


# --- fl-llm personalise RUN_DIR ----------------------------------------------------------------------------------------


# What an override may change: how the personalisation trains, where it runs and how it is
# evaluated, never the run it starts from (model, data, seeds, strategy, privacy, the parties).
CHANGEABLE = ("server.round_timeout_s", "backend", "ray.", "tracking.", "eval.", "personalise.")


def check_run(run_dir: Path, overwrite: bool, overrides: list[str] = ()) -> RunConfig:
    """The finished run's config (with `overrides` of CHANGEABLE keys), or a UserError (exit 2)
    saying why it cannot be personalised — before anything starts or is written."""
    from fl_llm.config import key_in, load
    from fl_llm.strategies import STRATEGIES
    from fl_llm.tracking import RunDir

    rd = RunDir(run_dir)
    where = f"personalise {str(run_dir)!r}"
    if not rd.config.is_file():
        raise UserError(f"{where}: not a run directory (no config.yaml)")
    for text in overrides:
        key = text.split("=", 1)[0].strip()
        if "=" not in text or not key_in(key, CHANGEABLE):
            raise UserError(f"{where}: override {text!r} — only {', '.join(CHANGEABLE)} may change (KEY=VALUE)")
    cfg = load(str(rd.config), list(overrides))
    status = json.loads(rd.summary.read_text()).get("status") if rd.summary.is_file() else None
    if status != "completed":
        raise UserError(
            f"{where}: the run has not finished (status {status or 'unknown'}); finish it first "
            f"(fl-llm run --resume {run_dir})"
        )
    strategy = STRATEGIES[cfg.strategy.name]
    why = None
    if not strategy.one_global_model:
        why = f"strategy {cfg.strategy.name} keeps a model per platform already (RUN_DIR/personal)"
    elif strategy.merges_into_base:
        why = f"strategy {cfg.strategy.name} merges updates into the base model, so its adapter is not the whole model"
    elif cfg.privacy.dp.level != "none":
        why = (
            f"privacy.dp.level={cfg.privacy.dp.level}: the extra local rounds would spend privacy the run's "
            "ledger does not count"
        )
    elif cfg.privacy.secagg.enabled:
        why = "secure aggregation is on: personalising would show the driver each platform's plain update"
    elif cfg.federation.platforms:
        why = "a federation of organisations: each personal adapter would pass through the coordinator"
    if why:
        raise UserError(f"{where}: {why}")
    if not (rd.adapter / "adapter_model.safetensors").is_file():
        raise UserError(f"{where}: no global adapter at {str(rd.adapter)!r}")
    personal = rd.path / "personal"
    if personal.exists() and not overwrite:
        raise UserError(f"{where}: {str(personal)!r} exists; --overwrite replaces it")
    return cfg


def personalise_run(
    run_dir: Path,
    rounds: int,
    schedule: str | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
    overrides: list[str] = (),
    anchor: float | None = None,
) -> dict:
    """Personalise a finished run's global adapter on every platform; write RUN_DIR/personal/
    (whole or not at all) and return what personal.json holds. `schedule` and `anchor` left None
    are the run's config's (`personalise.schedule`, `personalise.anchor`, overrides applied)."""
    from fl_llm.data.sources import task_of
    from fl_llm.model.adapters import load_init_adapter
    from fl_llm.server.backends import make_backend
    from fl_llm.server.loop import SETUP_TIMEOUT_S
    from fl_llm.server.setup import described
    from fl_llm.tracking import RunDir, atomic_dir, write_json

    if rounds < 1:
        raise UserError(f"--rounds must be >= 1, got {rounds}")
    if schedule is not None and schedule not in SCHEDULES:
        raise UserError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if anchor is not None:
        check_anchor(anchor, "--anchor")
    rd = RunDir(Path(run_dir))
    cfg = check_run(rd.path, overwrite, overrides)
    schedule, anchor = settings(cfg, schedule, anchor)
    progress = progress or Progress(enabled=False)
    # the platforms keep nothing on disk here: the run's own state dirs stay as the run left them
    cfg = dataclasses.replace(cfg, client=dataclasses.replace(cfg.client, state_dir=""))
    ids, timeout = list(range(cfg.data.num_platforms)), cfg.server.round_timeout_s
    with rd.lock():
        progress.phase(f"starting {len(ids)} platforms on the {cfg.backend_in_use} backend")
        backend = make_backend(cfg, rd.path.name)
        try:
            names = {i: d["name"] for i, d in described(backend, ids).items()}  # data that moved: exit 2
            fresh = backend.call([0], PlatformAPI.initial_adapter, timeout_s=SETUP_TIMEOUT_S).results[0]
            run_model = dataclasses.replace(cfg.model, init_adapter=str(rd.adapter))
            global_state = load_init_adapter(run_model, like=fresh)  # checked against this model's shapes
            progress.phase("evaluating the global model on every platform")
            before = detailed(backend, {i: global_state for i in ids}, timeout, strict=True)
            states = personalise(cfg, backend, global_state, rounds, schedule, progress, strict=True, anchor=anchor)
            progress.phase("evaluating each platform's own model")
            after = detailed(backend, states, timeout, strict=True)
        finally:
            backend.shutdown()
        steps = rounds * cfg.client.local_steps
        result = {
            "run_dir": str(rd.path),
            "rounds": rounds,
            "schedule": schedule,
            "anchor": anchor,
            "steps": steps,
            "examples": steps * cfg.client.batch_size,
            "metric": task_of(cfg).primary,
            "platforms": {names[i]: {"global": before[i], "personal": after[i]} for i in ids},
        }
        with atomic_dir(rd.path / "personal") as tmp:
            save_adapters(cfg, rd, {names[i]: states[i] for i in ids}, tmp)
            write_json(tmp / "personal.json", result)
    return result


def save_adapters(cfg: RunConfig, run, states: dict[str, AdapterState], out_dir: Path) -> None:
    """Each named model in `states` as a PEFT adapter directory out_dir/<name>/ on the base model of
    `run` (a RunDir: the built-in model as that run saved it), at the largest LoRA rank — what
    `fl-llm generate RUN_DIR --platform NAME` (or `--adapter DIR`) loads."""
    from fl_llm.client.kept_state import safe_name
    from fl_llm.model.adapters import save_adapter
    from fl_llm.model.build import base_name

    Path(out_dir).mkdir(parents=True, exist_ok=True)
    rank = max(cfg.model.lora.ranks or [cfg.model.lora.r])
    base = base_name(cfg.model, run.base_model)
    for name, state in states.items():
        plain = {k: np.asarray(v, np.float32) for k, v in state.items()}
        save_adapter(plain, cfg.model, Path(out_dir) / safe_name(name), base, rank=rank)


def personal_table(result: dict) -> str:
    """One line per platform: the headline metric and eval loss under the global model and its own."""
    metric = result["metric"]
    lines = [
        f"{result['rounds']} local rounds ({result['steps']} steps, {result['schedule']} schedule"
        + (f", anchored to the global model with μ {result['anchor']:g}" if result.get("anchor") else "")
        + ") per platform",
        f"{'platform':<20} {metric + ' global':>22} {'personal':>10} {'eval loss global':>17} {'personal':>10}",
    ]

    def fmt(d: dict, key: str) -> str:
        value = d.get(key)
        return f"{value:.4f}" if isinstance(value, (int, float)) else "-"

    for name, p in result["platforms"].items():
        g, o = p["global"], p["personal"]
        lines.append(
            f"{name:<20} {fmt(g, metric):>22} {fmt(o, metric):>10} {fmt(g, 'eval_loss'):>17} {fmt(o, 'eval_loss'):>10}"
        )
    return "\n".join(lines)
