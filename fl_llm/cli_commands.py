"""The `fl-llm` commands besides `run`: compare, audit, bench, config, tasks, strategies (generate and personalise:
`fl_llm.cli_model`). Each takes the parsed arguments and returns the exit code; `fl_llm.cli` parses and dispatches."""

from __future__ import annotations

import sys
from datetime import datetime
from pathlib import Path

from fl_llm import config as config_mod
from fl_llm.cli import Replacement, _check_model, _resolve_run_dir, _split_config_args
from fl_llm.errors import UserError


def cmd_compare(ns) -> int:
    from fl_llm.compare import compare
    from fl_llm.compare_strategies import compare_strategies, strategy_configs
    from fl_llm.personalise import check_anchor
    from fl_llm.progress import Progress
    from fl_llm.server.loop import RunFailed

    path, overrides = _split_config_args(ns.args)
    cfg = config_mod.load(path, overrides)
    if ns.seeds < 1:
        raise UserError(f"--seeds must be >= 1, got {ns.seeds}")
    if ns.personal_rounds < 1:
        raise UserError(f"--personal-rounds must be >= 1, got {ns.personal_rounds}")
    if ns.personal_anchor is not None:
        check_anchor(ns.personal_anchor, "--personal-anchor")
    if cfg.federation.platforms and ns.strategies is None:
        raise UserError(
            "fl-llm compare pools every platform's data (its centralized arm): it runs on one organisation's "
            "platforms, not on federation.platforms; --strategies compares federated runs and works with them"
        )
    _check_model(cfg)
    per_strategy = None  # {name: config} with --strategies
    if ns.strategies is not None and ns.keep_adapters:
        raise UserError(
            "--keep-adapters keeps the models compare trains itself (local-only, centralized, personalised); "
            "with --strategies every run is federated and its adapter is in its run directory already"
        )
    if ns.strategies is not None:
        per_strategy = strategy_configs(cfg, [n.strip() for n in ns.strategies.split(",") if n.strip()])
    if ns.resume:
        out = _comparison_to_resume(cfg, ns, per_strategy is not None)
    else:
        if not cfg.output_dir:
            stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
            kind = "strategies" if per_strategy else "compare"
            cfg = config_mod.from_dict({**config_mod.to_dict(cfg), "output_dir": f"runs/{cfg.name}-{kind}-{stamp}"})
        replacing = _resolve_run_dir(cfg, ns.overwrite)
        out = replacing.path
    progress = Progress(enabled=cfg.tracking.progress)
    what = f"strategies {', '.join(per_strategy)}" if per_strategy else "local-only vs federated vs centralized"
    progress.info(
        f"fl_llm compare '{cfg.name}': {what}, task {cfg.data.task}"
        + (f", seeds {cfg.seed}..{cfg.seed + ns.seeds - 1}" if ns.seeds > 1 else "")
        + f"\nout: {out}"
    )
    if ns.resume:
        replacing = Replacement(out)
    try:
        from fl_llm.tracking import RunDir

        out.mkdir(parents=True, exist_ok=True)
        RunDir(out).mark()
        if per_strategy:
            compare_strategies(per_strategy, out, progress, seeds=ns.seeds, resume=ns.resume)
        else:
            compare(
                cfg,
                out,
                progress,
                seeds=ns.seeds,
                resume=ns.resume,
                personal_rounds=ns.personal_rounds,
                personal_schedule=ns.personal_schedule,
                personal_anchor=ns.personal_anchor,
                keep_adapters=ns.keep_adapters,
            )
    except UserError:
        if not ns.resume:  # never delete the earlier comparison's runs
            replacing.rollback()
        raise
    except RunFailed as e:
        replacing.commit()
        print(f"fl-llm: compare failed: {e}", file=sys.stderr)
        return 1
    replacing.commit()
    stem = "strategies" if per_strategy else "comparison"
    progress.info(f"wrote {out / (stem + '.json')} and {out / (stem + '.png')}")
    return 0


def _comparison_to_resume(cfg, ns, strategies: bool) -> Path:
    if ns.overwrite:
        raise UserError("--resume and --overwrite contradict each other: pick one")
    if not cfg.output_dir:
        raise UserError("--resume needs the earlier comparison's directory: output_dir=DIR")
    if not Path(cfg.output_dir).is_dir():
        raise UserError(f"--resume: output_dir {cfg.output_dir!r} is not a directory, so there is nothing to resume")
    return Path(cfg.output_dir)


def cmd_config(ns) -> int:
    import yaml

    path, overrides = _split_config_args(ns.args)
    cfg = config_mod.load(path, overrides)
    print(yaml.safe_dump(config_mod.to_dict(cfg), sort_keys=False, allow_unicode=True), end="")
    return 0


def cmd_tasks(ns) -> int:
    from fl_llm.data.tasks import TASKS

    for t in TASKS.values():
        answers = ", ".join(repr(a) for a in t.verbalizer) if t.verbalizer else "generated text"
        print(f"{t.name:<16} {t.description}\n{'':<16} answers: {answers}")
    return 0


def strategies_help() -> str:
    """Every strategy with its paper and the strategy.* keys it reads."""
    from fl_llm.strategies import STRATEGIES

    lines = []
    for s in STRATEGIES.values():
        lines.append(f"  {s.name:<13} {s.summary}")
        lines.append(f"  {'':<13} paper: {s.paper}")
        if s.keys:
            lines.append(f"  {'':<13} keys: {', '.join('strategy.' + p for p in s.keys)}")
    return "\n".join(lines)


def cmd_strategies(ns) -> int:
    print("strategy.name accepts (fl-llm run strategy.name=NAME):\n" + strategies_help())
    print(
        "\nstrategy.robust=norm_bound|median|trimmed_mean|krum combines a robust rule with any server optimizer\n"
        "(e.g. strategy.name=fedadam strategy.robust=trimmed_mean); model.lora.ranks=[4, 8, 16] gives each\n"
        "platform its own LoRA rank (FLoRA stacks them exactly; the others zero-pad to the largest).\n"
        "To choose on your own data: fl-llm compare --strategies fedit,fedex,ffa [CONFIG] [--seeds 3]\n"
        "runs the job once per strategy and prints the eval loss round by round against the first."
    )
    return 0


def cmd_audit(ns) -> int:
    from fl_llm.privacy.audit_run import audit, audit_table

    path = Path(ns.run_dir)
    if not path.is_dir():
        raise UserError(f"audit {ns.run_dir!r}: no such run directory")
    if ns.max_examples < 10:
        raise UserError(f"--max-examples must be >= 10, got {ns.max_examples}")
    result = audit(path, max_examples=ns.max_examples, progress=lambda m: print(m, file=sys.stderr, flush=True))
    print(audit_table(result))
    print(f"audit: {path / 'audit.json'}")
    if result["leak_detected"]:
        proved = max(a["epsilon_lower_bound"] for p in result["platforms"].values() for a in p["attacks"].values())
        print(f"membership leaks: the attacks prove ε ≥ {proved:.2f} at 95% confidence (for the whole run)")
    if not result["bound_holds"]:
        print(
            "AUDIT FAILED: an attack beats the (ε, δ) guarantee in the run's privacy ledger beyond "
            "statistical doubt; the DP pipeline has a bug",
            file=sys.stderr,
        )
        return 1
    return 0


def cmd_bench(ns) -> int:

    from fl_llm.bench import VARIANTS, bench, shape_overrides, summary_lines
    from fl_llm.client.train import device_problem, resolve_device

    variants = [] if ns.variants == "none" else [v for v in ns.variants.split(",") if v]
    if (not variants and ns.variants != "none") or not set(variants) <= set(VARIANTS):
        raise UserError(f"--variants: a comma-separated subset of {', '.join(VARIANTS)}, or none, got {ns.variants!r}")
    if not variants and ns.rounds == 0:
        raise UserError("--variants none --rounds 0 measures nothing")
    if ns.baseline_batch < 1 or (ns.baseline_rows is not None and ns.baseline_rows < 0):
        raise UserError("--baseline-batch must be at least 1 and --baseline-rows at least 0")

    if ns.pack_length < ns.max_length:
        raise UserError(f"--pack-length ({ns.pack_length}) must be at least --max-length ({ns.max_length})")
    if min(ns.steps, ns.examples) < 1 or ns.warmup < 0 or ns.rounds < 0:
        raise UserError("--steps and --examples must be at least 1, --warmup and --rounds at least 0")
    path, overrides = _split_config_args(ns.args)
    cfg = config_mod.load(path, [*shape_overrides(ns.shape, ns.max_length), *overrides])
    problem = device_problem(cfg, resolve_device(cfg.client.device))
    if problem:
        raise UserError(problem)
    if ns.workers:  # one platform's training over 1, 2, 4 ... workers of its own
        from fl_llm.bench import hardware
        from fl_llm.bench_scaling import scaling, scaling_lines

        counts, rounds = _worker_counts(ns.workers), max(ns.rounds, 2)
        result = {"hardware": hardware(), "shape": ns.shape, "scaling": scaling(cfg, counts, rounds)}
        return _write_bench(result, Path(ns.out), scaling_lines(result["scaling"]))
    result = bench(
        cfg,
        shape=ns.shape,
        steps=ns.steps,
        warmup=ns.warmup,
        pack_length=ns.pack_length,
        rounds=ns.rounds,
        examples=ns.examples,
        peak_tflops=ns.peak_tflops,
        variants=variants,
        baseline_batch=ns.baseline_batch,
        baseline_rows=ns.baseline_rows,
    )
    return _write_bench(result, Path(ns.out), summary_lines(result))


def _write_bench(result: dict, out: Path, lines: list[str]) -> int:
    import json

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print("\n".join(lines))
    print(f"bench: {out}")
    return 0


def add_bench_arguments(p) -> None:
    """`fl-llm bench`'s options (its parser from `fl_llm.cli`)."""
    p.add_argument(
        "--shape", choices=["tiny", "1b", "8b"], default="tiny", help="Llama shape of the model (default tiny)"
    )
    p.add_argument("--max-length", type=int, default=1024, help="longest example in tokens (default 1024)")
    p.add_argument("--pack-length", type=int, default=2048, help="tokens per packed row (default 2048)")
    p.add_argument("--steps", type=int, default=10, help="timed training steps per variant (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--examples", type=int, default=512, help="examples drawn at e-commerce lengths (default 512)")
    p.add_argument("--rounds", type=int, default=4, help="federated rounds to time, 0 to skip (default 4)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the hardware's peak, for MFU")
    p.add_argument(
        "--variants",
        default="baseline_packed,baseline_padded,fl_llm_packed,fl_llm_padded",
        help="which step measurements to run, comma-separated (default all four); none: only the federated run",
    )
    p.add_argument(
        "--baseline-batch", type=int, default=16, help="examples per padded baseline step (default 16, the issue's)"
    )
    p.add_argument(
        "--baseline-rows",
        type=int,
        default=None,
        help="rows of --pack-length per packed baseline step (default: 8 at 1b, 2 at 8b, one batch's examples at tiny)",
    )
    p.add_argument(
        "--workers",
        default="",
        help="e.g. 1,2,4: instead, one platform's training tokens/s on that many workers each "
        "(ray.workers_per_platform, client.parallel as configured) and the scaling efficiency",
    )
    p.add_argument("--out", default="bench.json", help="where the JSON goes (default bench.json)")


def _worker_counts(text: str) -> list[int]:
    try:
        counts = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise UserError(f"--workers: comma-separated worker counts of at least 1, e.g. 1,2,4; got {text!r}")
    return sorted(set(counts))
