"""`fl-llm`: federated LoRA fine-tuning across e-commerce platforms.

    fl-llm run                                  # the default job: 3 platforms, tiny model, local Ray
    fl-llm run configs/default.yaml server.rounds=3 client.lr=1e-3
    fl-llm run backend=local                    # same platforms in this process, for debugging
    fl-llm run --resume runs/default-20261125-101500   # continue a stopped run from its checkpoint
    fl-llm compare [CONFIG] [KEY=VALUE ...]     # local-only vs federated vs centralized
    fl-llm compare --strategies fedit,fedex,ffa # aggregation strategies, eval loss round by round
    fl-llm bench [CONFIG] [KEY=VALUE ...]       # throughput vs plain transformers + peft, federation overhead
    fl-llm config [CONFIG] [KEY=VALUE ...]      # print the resolved config
    fl-llm tasks | fl-llm strategies            # what data.task / strategy.name accept

Exit codes: 0 done; 2 a user error (config, data, paths, cluster), with one line saying what;
1 the federation could not go on (e.g. too few platforms answered).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import textwrap
from datetime import datetime
from pathlib import Path

from fl_llm import config as config_mod
from fl_llm.errors import EXIT_USER_ERROR, UserError

RUN_HELP = """\
Run a federated job. CONFIG is a YAML file (default: the embedded default, identical to
configs/default.yaml); each KEY=VALUE overrides one dotted key, the value read as YAML
(server.rounds=3, model.lora.target_modules=[q_proj,v_proj], ray.address=auto).

Output: one line per round on stdout —
  round  3/10  loss 1.602  auc 0.712  |  fashion-mall 1.55/0.74 ...  |  up 408 KB down 408 KB  7.1 s
loss/auc: the global adapter's answer loss and AUC on every platform's held-out split, weighted by
its size; then each platform's eval loss/AUC; bytes of adapter updates sent up and global adapters
sent down this round; the round's wall time. The run dir holds config.yaml, metrics.jsonl (one
JSON object per round), summary.json, platforms.json, adapter/ (standard PEFT) and, for the
built-in model, base_model/.
"""


def _split_config_args(args: list[str]) -> tuple[str | None, list[str]]:
    """The one argument without '=' is the config file, wherever it stands (`fl-llm compare
    --seeds 2 seed=3 my.yaml` works too); the others are KEY=VALUE overrides, applied in order."""
    paths = [a for a in args if "=" not in a]
    if len(paths) > 1:
        raise UserError(f"one config file at most, got {', '.join(map(repr, paths))}; overrides look like KEY=VALUE")
    return (paths[0] if paths else None), [a for a in args if "=" in a]


def _config_keys_help() -> str:
    rows = config_mod.describe()
    width = max(len(k) for k, _, _ in rows)
    lines = ["config keys (KEY=VALUE), with defaults:"]
    for key, default, help_ in rows:
        lines.append(f"  {key:<{width}}  {help_}  [default: {default}]")
    return "\n".join(lines)


class Replacement:
    """A run dir being replaced (--overwrite): the old one waits aside until the new run has
    validated its config and data (`commit` deletes it); a run that fails at start puts it back
    (`rollback`), so nothing is lost and nothing half-written is left in its place."""

    def __init__(self, path: Path, aside: Path | None = None):
        self.path, self.aside = path, aside

    def commit(self) -> None:
        if self.aside is not None:
            shutil.rmtree(self.aside, ignore_errors=True)
            self.aside = None

    def rollback(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        if self.aside is not None:
            os.rename(self.aside, self.path)
            self.aside = None


def _resolve_run_dir(cfg, overwrite: bool) -> Replacement:
    """Where a new run (or comparison) writes. An existing, non-empty output_dir is replaced only
    with --overwrite, only if fl_llm made it (its marker file), never the working directory or
    one of its parents, and never while another process runs in it."""
    from fl_llm.tracking import MARKER, RunDir

    if cfg.output_dir:
        path = Path(cfg.output_dir)
    else:
        path = Path("runs") / f"{cfg.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    here, target = Path.cwd().resolve(), path.resolve()
    if target == here or target in here.parents:
        raise UserError(
            f"output_dir {str(path)!r} is the working directory or one of its parents; a run needs a directory "
            "of its own (e.g. output_dir=runs/my-run)"
        )
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        return Replacement(path)
    if not overwrite:
        raise UserError(f"output dir {str(path)!r} already exists; pass --overwrite or choose another output_dir")
    if not path.is_dir() or not RunDir(path).is_fl_llm:
        raise UserError(
            f"--overwrite: {str(path)!r} is not a directory fl_llm made (it has no {MARKER} file), so it is not "
            "replaced; remove it yourself or choose another output_dir"
        )
    holder = RunDir(path).holder()
    if holder is not None:
        raise UserError(f"--overwrite: {str(path)!r} is in use by another fl-llm process (pid {holder})")
    aside = path.with_name(f".{path.name}.replaced-{os.getpid()}")
    os.rename(path, aside)
    return Replacement(path, aside)


# What may change when a run is resumed: how long it goes on and where/how it runs — never what
# it computes (model, data, seeds, strategy), or the continuation would not be the same run.
RESUME_CHANGEABLE = ("server.rounds", *config_mod.WHERE_NOT_WHAT, "faults.")


def _resume_config(run_dir: str, args: list[str], extend: bool = False):
    from fl_llm import checkpoint

    path = Path(run_dir)
    if not path.is_dir():
        raise UserError(f"--resume {run_dir!r}: no such run directory")
    if not (path / "config.yaml").is_file():
        raise UserError(f"--resume {run_dir!r}: not a run directory (it has no config.yaml)")
    if any("=" not in a for a in args):
        raise UserError("--resume continues with the run's own config.yaml; give only KEY=VALUE overrides")
    for text in args:
        key = text.split("=", 1)[0].strip()
        if not config_mod.key_in(key, RESUME_CHANGEABLE):
            raise UserError(
                f"override {text!r}: '{key}' cannot change when resuming (only {', '.join(RESUME_CHANGEABLE)})"
            )
    if checkpoint.latest(path / "checkpoints") is None:
        raise UserError(f"--resume {run_dir!r}: no checkpoint there (checkpoint.every was 0, or no round finished)")
    before = config_mod.load(path / "config.yaml")
    cfg = config_mod.load(path / "config.yaml", args)
    if cfg.server.rounds != before.server.rounds:
        if not extend:
            raise UserError(
                f"--resume with server.rounds={cfg.server.rounds}: the run was made for {before.server.rounds} rounds, "
                "and its learning-rate schedule spans them; pass --extend to continue it to more rounds "
                "(the rounds still to run then follow the schedule for the new total), or start a new run"
            )
        if cfg.server.rounds < before.server.rounds:
            raise UserError(
                f"--extend: server.rounds={cfg.server.rounds} is fewer than the run's {before.server.rounds}"
            )
    elif extend:
        raise UserError("--extend needs server.rounds=N above the run's own server.rounds")
    return cfg, path


def _check_model(cfg, warm_start: bool = True) -> None:
    """The base model's source and, unless resuming, model.init_adapter: a bad one fails before
    any actor starts."""
    from fl_llm.model.adapters import load_init_adapter
    from fl_llm.model.build import check_model_source

    check_model_source(cfg.model)
    if warm_start:
        load_init_adapter(cfg.model)


def cmd_run(ns) -> int:
    from fl_llm.progress import Progress
    from fl_llm.server.loop import RunFailed, run

    if ns.extend and not ns.resume:
        raise UserError("--extend continues a run: use it with --resume RUN_DIR server.rounds=N")
    if ns.resume:
        if ns.overwrite:
            raise UserError("--resume and --overwrite contradict each other: pick one")
        cfg, run_dir = _resume_config(ns.resume, ns.args, ns.extend)
    else:
        path, overrides = _split_config_args(ns.args)
        cfg = config_mod.load(path, overrides)
    _check_model(cfg, warm_start=not ns.resume)  # a resumed run starts from its checkpoint
    replacing = Replacement(run_dir) if ns.resume else _resolve_run_dir(cfg, ns.overwrite)
    run_dir = replacing.path
    progress = Progress(enabled=cfg.tracking.progress)
    progress.info(
        f"fl_llm run '{cfg.name}': {cfg.data.num_platforms} platforms, {cfg.server.rounds} rounds, "
        f"task {cfg.data.task}, strategy {cfg.strategy.name}, model {cfg.model.name_or_path}, "
        f"backend {cfg.backend}\nrun dir: {run_dir}" + (" (resuming)" if ns.resume else "")
    )
    if ns.extend:  # the run's config now says how long it runs
        from fl_llm.tracking import RunDir

        with RunDir(run_dir).lock():
            RunDir(run_dir).save_config(config_mod.to_dict(cfg))
        progress.info(f"extending the run to {cfg.server.rounds} rounds (config.yaml updated)")
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        summary = run(cfg, run_dir, progress, resume=bool(ns.resume), on_started=replacing.commit)
    except UserError:
        if not ns.resume:
            replacing.rollback()  # nothing half-written for a user's mistake; a replaced run comes back
        raise
    except RunFailed as e:
        if replacing.aside is not None:  # its platforms never started: the old run comes back
            replacing.rollback()
        print(f"fl-llm: run failed: {e}", file=sys.stderr)
        return 1
    except BaseException:
        if replacing.aside is not None:  # stopped before its platforms started: the old run comes back
            replacing.rollback()
        raise
    final, initial, metric = summary["final"], summary["initial"], summary["metric"]
    progress.info(
        f"done in {summary['wall_seconds']:.0f} s: eval loss {initial['eval_loss']:.3f} -> "
        f"{final['eval_loss']:.3f}, {metric} {initial.get(metric, float('nan')):.3f} -> {final.get(metric, float('nan')):.3f}\n"
        f"global adapter (PEFT format): {run_dir / 'adapter'}\nmetrics: {run_dir / 'metrics.jsonl'}"
    )
    return 0


def cmd_compare(ns) -> int:
    from fl_llm.compare import compare
    from fl_llm.compare_strategies import compare_strategies, strategy_configs
    from fl_llm.progress import Progress
    from fl_llm.server.loop import RunFailed

    path, overrides = _split_config_args(ns.args)
    cfg = config_mod.load(path, overrides)
    if ns.seeds < 1:
        raise UserError(f"--seeds must be >= 1, got {ns.seeds}")
    if ns.personal_rounds < 1:
        raise UserError(f"--personal-rounds must be >= 1, got {ns.personal_rounds}")
    _check_model(cfg)
    per_strategy = None  # {name: config} with --strategies
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
            compare(cfg, out, progress, seeds=ns.seeds, resume=ns.resume, personal_rounds=ns.personal_rounds)
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
        print(f"{t.name:<16} {t.description}\n{'':<16} answers: {', '.join(repr(a) for a in t.verbalizer)}")
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
    import json

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
    out = Path(ns.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print("\n".join(summary_lines(result)))
    print(f"bench: {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    doc = (__doc__ or "").strip()
    parser = argparse.ArgumentParser(
        prog="fl-llm",
        description=doc.splitlines()[0],
        epilog=textwrap.indent("\n".join(doc.splitlines()[1:]).strip(), ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser(
        "run",
        help="run a federated job",
        description=RUN_HELP,
        epilog=_config_keys_help() + "\n\nstrategies (strategy.name):\n" + strategies_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("args", nargs="*", metavar="[CONFIG] [KEY=VALUE ...]")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing output_dir made by fl_llm (the old one is removed once the new run has started)",
    )
    p.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue RUN_DIR from its newest intact checkpoint, with its own config.yaml "
        "(overrides may change where and how it runs: timeouts, ray.*, tracking.*, ...)",
    )
    p.add_argument(
        "--extend",
        action="store_true",
        help="with --resume and server.rounds=N: continue the run to N rounds (config.yaml is updated; with the "
        "cosine schedule the rounds still to run follow the schedule for N rounds, the ones run keep theirs)",
    )
    p.set_defaults(func=cmd_run)
    p = sub.add_parser(
        "compare",
        help="local-only vs federated vs centralized, same budget",
        description="Run the config three ways with the same budget — each platform alone (local-only), "
        "federated, and centralized on pooled data (an upper bound, for measurement only) — print a table "
        "per platform and write comparison.json and comparison.png in the output dir. With --seeds N the "
        "whole comparison is repeated for seeds seed..seed+N-1 and reported as mean ± standard deviation. "
        "With --strategies A,B,... it compares aggregation strategies instead: the same federated job once "
        "per strategy, eval loss per round, the aggregation error, and the rounds each strategy is below "
        "the first one; writes strategies.json and strategies.png.",
    )
    p.add_argument("args", nargs="*", metavar="[CONFIG] [KEY=VALUE ...]")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output_dir")
    p.add_argument("--seeds", type=int, default=1, metavar="N", help="repeat over N seeds (default 1)")
    p.add_argument(
        "--personal-rounds",
        type=int,
        default=1,
        metavar="P",
        help="the personalised arm: P local rounds from the federated model, as a fresh local run starts them "
        "(warm-up, then the peak learning rate; default 1)",
    )
    p.add_argument(
        "--strategies",
        metavar="A,B,...",
        help="compare these strategy.name values, the first as the baseline "
        "(e.g. fedit,fedex,flora,ffa); see fl-llm strategies",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the comparison in output_dir — seeds (and, with --strategies, runs) finished there with "
        "the same config are read, stopped federated runs resume from their last checkpoint, missing ones run "
        "(also adds seeds, or strategies, to an earlier comparison)",
    )
    p.set_defaults(func=cmd_compare)
    p = sub.add_parser(
        "audit",
        help="membership-inference audit of a run's global model",
        description="Attack the trained global model of RUN_DIR on each platform: loss-based and "
        "reference-based (base vs fine-tuned) membership inference on training records (members) vs "
        "held-out records (non-members). Reports AUC and TPR at 1% and 0.1% FPR, the ε the attacks "
        "prove (threshold chosen on one half of the records, Clopper-Pearson bound on the other; 95% "
        "for the whole run, Bonferroni over attacks and platforms), and whether that stays within the run's "
        "(ε, δ); writes RUN_DIR/audit.json. Exit code 1 if an attack beats the guarantee.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument(
        "--max-examples",
        type=int,
        default=1000,
        metavar="N",
        help="members and non-members per platform (default 1000)",
    )
    p.set_defaults(func=cmd_audit)
    p = sub.add_parser(
        "bench",
        help="throughput against plain transformers + peft, and the federation's overhead",
        description=(__import__("fl_llm.bench", fromlist=["x"]).__doc__ or "").strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("args", nargs="*", metavar="[CONFIG] [KEY=VALUE ...]")
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
    p.add_argument("--out", default="bench.json", help="where the JSON goes (default bench.json)")
    p.set_defaults(func=cmd_bench)
    p = sub.add_parser("config", help="print the resolved config (YAML) without running")
    p.add_argument("args", nargs="*", metavar="[CONFIG] [KEY=VALUE ...]")
    p.set_defaults(func=cmd_config)
    sub.add_parser("tasks", help="list the tasks (data.task)").set_defaults(func=cmd_tasks)
    sub.add_parser("strategies", help="list the aggregation strategies (strategy.name)").set_defaults(
        func=cmd_strategies
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    parser = build_parser()
    ns, extra = parser.parse_known_args(argv)
    # KEY=VALUE overrides may come after options (`run --overwrite server.rounds=3`).
    stray = [a for a in extra if a.startswith("-") or not hasattr(ns, "args")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        ns.args = [*ns.args, *extra]
    if not getattr(ns, "func", None):
        parser.print_help()
        return EXIT_USER_ERROR
    previous = signal.signal(signal.SIGTERM, _terminated)  # `kill`, a scheduler's stop: like Ctrl-C
    try:
        return ns.func(ns)
    except UserError as e:
        print(f"fl-llm: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(
            "fl-llm: interrupted; a run continues from its last checkpoint with `fl-llm run --resume RUN_DIR`",
            file=sys.stderr,
        )
        return 130
    except BrokenPipeError:  # `fl-llm strategies | head`: the reader left, nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)


def _terminated(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


if __name__ == "__main__":
    sys.exit(main())
