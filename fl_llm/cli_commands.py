"""The `fl-llm` commands besides `run`: compare, audit, bench, generate, personalise, config, tasks, strategies. Each
takes the parsed arguments and returns the exit code; `fl_llm.cli` parses and dispatches."""

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


def cmd_generate(ns) -> int:
    """Answer prompts with a run's model: PROMPT arguments, or a JSONL file of conversations."""
    import json

    from fl_llm.data.chat import generation_prompt, to_messages
    from fl_llm.generation import generate_answers, load_run_model
    from fl_llm.text_metrics import exact_match

    if not ns.args and not ns.jsonl:
        raise UserError("generate: give PROMPT arguments or --jsonl FILE")
    if ns.jsonl and not Path(ns.jsonl).is_file():
        raise UserError(f"generate --jsonl {ns.jsonl!r}: no such file")
    conversations, references = [], []
    if ns.jsonl:
        with open(ns.jsonl, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    raise UserError(f"generate --jsonl {ns.jsonl!r}, line {i}: not valid JSON") from None
                msgs = to_messages(record, f"{ns.jsonl!r}, line {i}", open_ended=True)
                conversations.append(msgs)
                references.append(msgs[-1]["content"] if msgs[-1]["role"] == "assistant" else None)
    for text in ns.args:
        system = [{"role": "system", "content": ns.system}] if ns.system else []
        conversations.append([*system, {"role": "user", "content": text}])
        references.append(None)
    model, tokenizer, cfg = load_run_model(Path(ns.run_dir), ns.platform, ns.device, ns.adapter)
    settings = cfg.eval
    if ns.max_new_tokens is not None:
        import dataclasses

        settings = dataclasses.replace(settings, max_new_tokens=ns.max_new_tokens)
    room = max(8, cfg.model.max_length - cfg.eval.max_new_tokens)  # as the platforms cut their prompts
    prompts = [generation_prompt(tokenizer, m, room) for m in conversations]
    answers = generate_answers(
        model, tokenizer, prompts, settings=settings, batch_size=cfg.client.eval_batch_size, device=ns.device
    )
    out = open(ns.out, "w", encoding="utf-8") if ns.out else sys.stdout
    try:
        for k, (ref, answer) in enumerate(zip(references, answers), 1):
            if ns.jsonl:
                row = {"answer": answer, **({"reference": ref} if ref is not None else {})}
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
            elif len(answers) == 1:
                out.write(f"{answer}\n")
            else:  # one block per prompt, numbered: an answer may span lines
                out.write(f"[{k}] " + answer.replace("\n", "\n    ") + "\n")
    finally:
        if ns.out:
            out.close()
    scored = [(a, r) for a, r in zip(answers, references) if r is not None]
    if scored:
        em = sum(exact_match(a, r) for a, r in scored) / len(scored)
        print(f"exact match {em:.4f} over {len(scored)} answers with a reference", file=sys.stderr)
    return 0


def add_generate_command(sub) -> None:
    """The `generate` subcommand and its options."""
    p = sub.add_parser(
        "generate",
        help="answer prompts with a run's model (base + global or a platform's adapter)",
        description="Load RUN_DIR's base model and adapter with plain transformers + peft and answer each "
        "PROMPT (a user message, rendered with the model's chat template), or each conversation of --jsonl FILE "
        "(chat messages, Alpaca or prompt/completion records; a final assistant turn is the reference, and the "
        "exact match over those is printed). Decoding follows the run's eval.* settings (greedy by default), "
        "exactly as the platforms generate in evaluation.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("args", nargs="*", metavar="PROMPT")  # "args": prompts after options land here too
    p.add_argument("--platform", metavar="NAME", help="that platform's own adapter (RUN_DIR/personal/NAME)")
    p.add_argument(
        "--adapter",
        metavar="DIR",
        help="this PEFT adapter on RUN_DIR's base instead (e.g. a compare's adapters/local/NAME, --keep-adapters)",
    )
    p.add_argument("--jsonl", metavar="FILE", help="conversations to answer, one JSON record per line")
    p.add_argument("--out", metavar="FILE", help="write the answers here (JSONL with --jsonl) instead of stdout")
    p.add_argument("--system", metavar="TEXT", help="a system message before each PROMPT")
    p.add_argument(
        "--max-new-tokens", type=int, metavar="N", help="longest answer (default: the run's eval.max_new_tokens)"
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.set_defaults(func=cmd_generate)


def cmd_personalise(ns) -> int:
    """Each platform's own adapter from a finished run: RUN_DIR/personal/<name>/."""
    from fl_llm.personalise import personal_table, personalise_run
    from fl_llm.progress import Progress
    from fl_llm.server.setup import RunFailed

    progress = Progress(enabled=True)
    try:
        result = personalise_run(
            Path(ns.run_dir), ns.rounds, ns.schedule, ns.overwrite, progress, ns.args, anchor=ns.anchor
        )
    except RunFailed as e:
        print(f"fl-llm: personalise failed (nothing written): {e}", file=sys.stderr)
        return 1
    finally:
        progress.close()
    print(personal_table(result))
    print(f"personal adapters: {Path(ns.run_dir) / 'personal'}/<platform> (fl-llm generate RUN_DIR --platform NAME)")
    return 0


def add_personalise_command(sub) -> None:
    """The `personalise` subcommand and its options."""
    p = sub.add_parser(
        "personalise",
        help="each platform's own adapter: local rounds from a finished run's global model",
        description="Fine-tune RUN_DIR's global adapter on each platform's own data for --rounds local rounds "
        "(client.local_steps steps each) and write each platform's adapter to RUN_DIR/personal/<name>/, with "
        "personal.json: every platform's held-out metrics under the global model and under its own. The "
        "platforms start as the run started them (its config.yaml). fl-llm compare --personal-rounds P "
        "measures what P rounds buy against local-only training. Refused under differential privacy, secure "
        "aggregation, for a federation of organisations and for strategies without one global adapter. "
        "KEY=VALUE overrides may change where and how it runs and evaluates (backend, ray.*, eval.*, ...).",
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("args", nargs="*", metavar="KEY=VALUE")
    p.add_argument("--rounds", type=int, default=8, metavar="P", help="local rounds per platform (default 8)")
    p.add_argument(
        "--schedule",
        choices=("continue", "fresh"),
        help="continue: past the run's schedule end, at its final learning rate — a gentle fine-tune that keeps "
        "what federation taught; fresh: the schedule's first rounds, as a new local run (default: the run's "
        "personalise.schedule, fresh unless its config says otherwise)",
    )
    p.add_argument(
        "--anchor",
        type=float,
        metavar="MU",
        help="keep each platform's model near the global one: every step also minimises (MU/2)·||v - w||², w the "
        "run's global adapter (Ditto's personal objective); pairs with --schedule fresh (default: the run's "
        "personalise.anchor, 0: none)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace RUN_DIR/personal")
    p.set_defaults(func=cmd_personalise)
