"""What the round loop writes down: the per-round record, the run summary, the platform table
and the messages for rounds that could not go on. Plain functions of what the loop collected."""

from __future__ import annotations

from concurrent.futures import Future

from fl_llm.config import RunConfig
from fl_llm.server.backends import Collected
from fl_llm.server.guard import Failures


def weighted(values: dict[int, dict], key: str, weight_key: str) -> float:
    pairs = [(v[key], v[weight_key]) for v in values.values() if v.get(key) is not None and v[key] == v[key]]
    total = sum(w for _, w in pairs)
    return float(sum(x * w for x, w in pairs) / total) if total else float("nan")


def causes_line(trained: Collected, rejected: dict[int, str], names: dict) -> str:
    causes = {**{i: e.splitlines()[0][:160] for i, e in trained.errors.items()}, **rejected}
    causes |= {i: "late" for i in trained.late}
    return "; ".join(f"{names[i]}: {c}" for i, c in sorted(causes.items())) or "none"


def attempt_record(attempt: int, names: dict, trained: Collected, rejected: dict[int, str]) -> dict:
    return {
        "attempt": attempt,
        "arrived": [names[i] for i in sorted(trained.results)],
        "failed": {names[i]: e for i, e in trained.errors.items()},
        "late": [names[i] for i in trained.late],
        "rejected": {names[i]: r for i, r in rejected.items()},
    }


def too_few_message(rnd: int, attempts: list[dict], cfg: RunConfig) -> str:
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


def excluded_message(rnd: int, failures: Failures, names: dict, need: int) -> str:
    lines = [f"round {rnd}: fewer than server.min_platforms ({need}) platforms are left in the federation"]
    lines += [f"  {names[i]}: excluded, {why}" for i, why in sorted(failures.excluded.items())]
    return "\n".join(lines)


def global_metrics(evals: dict[int, dict]) -> dict[str, float]:
    """Every evaluation metric averaged over platforms, weighted by held-out size."""
    keys = sorted({k for e in evals.values() for k in e} - {"num_eval", "eval_seconds", "threshold"})
    return {k: weighted(evals, k, "num_eval") for k in keys}


def round_record(
    rnd, primary, names, cohort, trained: Collected, accepted, rejected, evals: Collected, downlink, dp_level="none"
):
    """The round's line of metrics.jsonl. Under client-level DP the driver holds each update
    before it is noised, so its norm is not written down (it would be an un-noised release)."""
    sent = downlink.take_round()
    platforms = {}
    for i, name in names.items():
        p: dict = {"participated": i in accepted}
        if i in trained.results and i in accepted:
            r = trained.results[i]
            p.update(r["metrics"])
            p["num_examples"] = r["num_examples"]
            p["bytes_up"] = r["bytes"]
            if "update" in r and dp_level != "client":  # under secure aggregation the driver never sees it
                p["update_norm"] = r["update_norm"]  # computed by the validation
        else:
            p["bytes_up"] = trained.results[i]["bytes"] if i in trained.results else 0
        p["bytes_down"] = sent.get(i, 0)
        p.update(evals.results.get(i, {}))
        platforms[name] = p
    train_losses = {
        i: {"train_loss": trained.results[i]["metrics"]["train_loss"], "n": trained.results[i]["num_examples"]}
        for i in accepted
        if "train_loss" in trained.results[i]["metrics"]  # under DP each platform keeps it
    }
    return {
        "round": rnd,
        **global_metrics(evals.results),
        "metric": primary,
        **({"train_loss": weighted(train_losses, "train_loss", "n")} if train_losses else {}),
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
    "wire_bytes",
}


def _number(value) -> bool:
    return isinstance(value, (int, float)) and value == value  # not None (a round without it), not NaN


def run_summary(cfg, primary, rd, history, fed, info, wall) -> dict:
    last = history[-1] if history else {}
    best = max(history, key=lambda r: r[primary] if _number(r.get(primary)) else -1, default={})
    names = {i: p["name"] for i, p in info.items()}
    return {
        "name": cfg.name,
        "status": "completed",
        "run_dir": str(rd.path),
        "task": cfg.data.task,
        "strategy": cfg.strategy.name,
        "backend": cfg.backend_in_use,
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
        **_policies(info),
    }


def _policies(info: dict) -> dict:
    """Remote platforms: the policy each one applied to this job (what it required and reports)."""
    got = {p["name"]: p["policy"] for p in info.values() if "policy" in p}
    return {"policies": got} if got else {}


def platform_table(info: dict, resources: dict | None) -> str:
    lines = [f"{'platform':<16} {'train':>6} {'eval':>6} {'positive':>9}  device"]
    for i in sorted(info):
        p = info[i]
        positive = f"{p['train_positive_rate']:>9.2f}" if "train_positive_rate" in p else f"{'(kept)':>9}"
        if p.get("answers") == "generated":  # conversations: no labels to balance
            positive = f"{'-':>9}"
        workers = p.get("workers") or []
        device = f"{len(workers)} workers: " + ", ".join(f"{w['device']} ({w['worker']})" for w in workers)
        lines.append(
            f"{p['name']:<16} {p['num_train']:>6} {p['num_eval']:>6} {positive}  {device if workers else p['device']}"
        )
    if resources and "workers_per_platform" in resources:
        lines.append(
            f"each platform: {resources['workers_per_platform']} workers in one placement group "
            f"({resources['parallel']}), each {resources['cpus_per_worker']:g} CPU, {resources['gpus_per_worker']:g} GPU"
        )
    elif resources and resources.get("platforms_per_host", 1) > 1:
        lines.append(
            f"{resources['hosts']} host actors, each {resources['platforms_per_host']} platforms on one base model: "
            f"{resources['cpus_per_host']:g} CPU, {resources['gpus_per_host']:g} GPU"
        )
    elif resources and "services" in resources:
        lines.append(f"{resources['services']} platform services of their own organisations (mutual TLS)")
    elif resources:
        lines.append(
            f"each platform actor: {resources['cpus_per_platform']:g} CPU, {resources['gpus_per_platform']:g} GPU"
        )
    return "\n".join(lines)


def strategy_metrics(metrics: dict, accepted: list[int], names: dict) -> dict:
    """The strategy's round metrics for the log: values computed in the background resolved,
    Krum's kept updates by platform name."""
    out = {k: (v.result() if isinstance(v, Future) else v) for k, v in metrics.items() if k != "krum_kept"}
    if "krum_kept" in metrics:
        out["krum_kept"] = [names[accepted[j]] for j in metrics["krum_kept"]]
    return out


def round_entry(r, fed, rs, result, dp_stats: dict, evals) -> dict:
    """The round's line of metrics.jsonl (aggregate numbers only), from the run `r`, the driver's
    state `fed`, the round's bookkeeping `rs`, the strategy's result and the evaluations."""
    names = r.names
    record = round_record(
        rs.rnd,
        r.primary,
        names,
        rs.cohort,
        rs.trained,
        rs.accepted,
        rs.rejected,
        evals,
        fed.downlink,
        fed.privacy.level,
    )
    record.update(
        restarted=[names[i] for i in rs.restarted],
        excluded={names[i]: why for i, why in rs.excluded.items()},
        active=[names[i] for i in fed.failures.active(r.everyone)],
        attempts=rs.attempts,
    )
    record.update(strategy_metrics(result.metrics, rs.accepted, names))
    record.update(dp_stats)
    r.uplink.record(record, rs.trained, names, r.progress)
    fed.privacy.metrics(record)
    if hasattr(r.backend, "take_wire"):  # remote platforms: what really crossed the network
        record["wire_bytes"] = r.backend.take_wire()
    return record
