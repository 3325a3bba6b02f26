"""`fl-llm`: federated LoRA fine-tuning across e-commerce platforms.

    fl-llm run                                  # the default job: 3 platforms, tiny model, local Ray
    fl-llm run configs/default.yaml server.rounds=3 client.lr=1e-3
    fl-llm run backend=local                    # same platforms in this process, for debugging
    fl-llm run --resume runs/default-20261125-101500   # continue a stopped run from its checkpoint
    fl-llm compare [CONFIG] [KEY=VALUE ...]     # local-only vs federated vs centralized
    fl-llm compare --strategies fedit,fedex,ffa # aggregation strategies, eval loss round by round
    fl-llm bench [CONFIG] [KEY=VALUE ...]       # throughput vs plain transformers + peft, federation overhead
    fl-llm generate RUN_DIR "How much is shipping?"  # answer prompts with a run's model (--jsonl FILE: a batch)
    fl-llm personalise RUN_DIR --rounds 8       # each platform's own adapter, fine-tuned from the global one
    fl-llm config [CONFIG] [KEY=VALUE ...]      # print the resolved config
    fl-llm tasks | fl-llm strategies            # what data.task / strategy.name accept
    fl-llm provision federation.yaml --out kits # separate organisations: a CA and each party's kit
    fl-llm serve platform.yaml federation.bundle=kits/shop-a   # one organisation's platform service

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
from fl_llm.progress import fmt_value

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
        f"backend {cfg.backend_in_use}\nrun dir: {run_dir}" + (" (resuming)" if ns.resume else "")
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
        f"{final['eval_loss']:.3f}, {metric} {fmt_value(initial.get(metric)).strip()} -> {fmt_value(final.get(metric)).strip()}\n"
        f"global adapter (PEFT format): {run_dir / 'adapter'}\nmetrics: {run_dir / 'metrics.jsonl'}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    from fl_llm.cli_commands import (
        add_bench_arguments,
        cmd_audit,
        cmd_bench,
        cmd_compare,
        cmd_config,
        cmd_strategies,
        cmd_tasks,
        strategies_help,
    )
    from fl_llm.cli_model import add_generate_command, add_personalise_command

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
        help="the personalised arm: P local rounds from the federated model on each platform's own data (default 1)",
    )
    p.add_argument(
        "--personal-schedule",
        choices=("fresh", "continue"),
        help="the personalised rounds' learning rate: fresh (the schedule's first rounds, as a new local run) or "
        "continue (past the schedule's end, at its final rate: a gentle fine-tune); default: the config's "
        "personalise.schedule (fresh unless it says otherwise)",
    )
    p.add_argument(
        "--personal-anchor",
        type=float,
        metavar="MU",
        help="the personalised rounds also minimise (MU/2)·||v - w||², w the federated model (Ditto's personal "
        "objective; fl-llm personalise --anchor); default: the config's personalise.anchor (0: none)",
    )
    p.add_argument(
        "--keep-adapters",
        action="store_true",
        help="also write the models compare trains itself as PEFT adapters: adapters/local/<platform>/, "
        "adapters/centralized/, adapters/personalised/<platform>/ (fl-llm generate OUT/federated --adapter DIR)",
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
    add_bench_arguments(p)
    p.set_defaults(func=cmd_bench)
    add_generate_command(sub)
    add_personalise_command(sub)
    p = sub.add_parser("config", help="print the resolved config (YAML) without running")
    p.add_argument("args", nargs="*", metavar="[CONFIG] [KEY=VALUE ...]")
    p.set_defaults(func=cmd_config)
    __import__("fl_llm.remote.cli", fromlist=["add_commands"]).add_commands(sub)  # provision, serve
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
