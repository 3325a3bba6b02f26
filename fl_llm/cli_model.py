"""The `fl-llm` commands that use a finished run's model: `generate` answers prompts with it, `personalise`
fine-tunes each platform's own adapter from it. Each takes the parsed arguments and returns the exit code;
`fl_llm.cli` parses and dispatches."""

from __future__ import annotations

import sys
from pathlib import Path

from fl_llm.errors import UserError


def cmd_generate(ns) -> int:
    """Answer prompts with a run's model: PROMPT arguments, or a JSONL file of conversations."""
    import json

    from fl_llm.data.chat import generation_prompt, to_messages
    from fl_llm.generation import generate_answers, held_out_conversations, load_run_model
    from fl_llm.text_metrics import exact_match

    if sum(map(bool, (ns.args, ns.jsonl, ns.held_out))) != 1:
        raise UserError("generate: give PROMPT arguments, --jsonl FILE or --held-out NAME (one of them)")
    if ns.jsonl and not Path(ns.jsonl).is_file():
        raise UserError(f"generate --jsonl {ns.jsonl!r}: no such file")
    conversations = []
    if ns.held_out:  # checked and read before the model loads: a wrong name costs nothing
        conversations = held_out_conversations(Path(ns.run_dir), ns.held_out)
    if ns.jsonl:
        with open(ns.jsonl, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    raise UserError(f"generate --jsonl {ns.jsonl!r}, line {i}: not valid JSON") from None
                conversations.append(to_messages(record, f"{ns.jsonl!r}, line {i}", open_ended=True))
    for text in ns.args:
        system = [{"role": "system", "content": ns.system}] if ns.system else []
        conversations.append([*system, {"role": "user", "content": text}])
    # a conversation's final assistant turn is its reference; a PROMPT's has none
    references = [m[-1]["content"] if m[-1]["role"] == "assistant" else None for m in conversations]
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
            if ns.jsonl or ns.held_out:
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
        "exact match over those is printed), or a platform's held-out conversations (--held-out). Decoding "
        "follows the run's eval.* settings (greedy by default), exactly as the platforms generate in evaluation.",
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
    p.add_argument(
        "--held-out",
        metavar="NAME",
        help="answer platform NAME's held-out conversations as the run made them (the synthetic shops' from its "
        "seed; its own files where readable here), the eval.generate_examples it answered, and print the exact "
        "match: the figure that platform reported for this adapter",
    )
    p.add_argument(
        "--out", metavar="FILE", help="write the answers here (JSONL with --jsonl, --held-out) instead of stdout"
    )
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
