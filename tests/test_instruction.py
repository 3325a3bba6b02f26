"""Federated supervised fine-tuning on conversations, end to end: a 2-round run on Ray (packed
batches, generation every round), what it writes, `fl-llm generate` reproducing the platforms'
reported figures from the saved adapter, `fl-llm personalise` (each platform's own adapter, which
`fl-llm generate --platform` reproduces), record-level DP with secure aggregation (no sample
generations leave), and bring-your-own conversation files."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from fl_llm.tracking import read_metrics
from tests.conftest import REPO, SHARED_DATA, start_local_ray

SFT = [
    "data.task=instruction",
    "data.synthetic.train_examples=[48,40,32]",
    "data.synthetic.eval_examples=12",
    "client.local_steps=6",
    "client.lr=0.01",
    "client.pack_length=256",
    "model.max_length=160",
    "server.rounds=2",
    "eval.generate_every=1",
    "eval.generate_examples=0",
    "eval.max_new_tokens=20",
    "eval.samples=2",
    "tracking.progress=false",
]


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    from fl_llm.config import load
    from fl_llm.server.loop import run

    ray = start_local_ray()  # the module's one instance
    try:
        cfg = load(None, SFT)
        run_dir = tmp_path_factory.mktemp("sft")
        summary = run(cfg, run_dir)
        yield cfg, run_dir, summary
    finally:
        ray.shutdown()


def test_every_round_reports_generation_metrics_per_platform_and_skill(sft_run):
    _, run_dir, summary = sft_run
    rows = read_metrics(run_dir)
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        assert row["metric"] == "exact_match"
        for key in ("exact_match", "token_f1", "rouge_l", "chrf", "perplexity", "eval_loss"):
            assert 0 <= row[key] < float("inf"), key
        for name, p in row["platforms"].items():
            assert p["num_generated"] == 12 and "samples" not in p
            tags = {k.removeprefix("exact_match/") for k in p if k.startswith("exact_match/")}
            facts = {
                f"{f}/{lang}"
                for f in ("return_electronics", "return_other", "shipping", "warranty")
                for lang in ("en", "zh")
            }
            assert tags and tags <= {"attribute", "title", "qa", "policy", "shared", "own", "en", "zh", *facts}, name
            assert all(f"token_f1/{t}" in p for t in tags if "/" not in t) and not any(
                f"token_f1/{f}" in p for f in facts
            )
    assert rows[-1]["eval_loss"] < summary["initial"]["eval_loss"]  # it learns from the answers
    assert "exact_match" not in summary["initial"]  # the untrained adapter is not asked to generate


def test_sample_generations_are_written_per_platform_and_round(sft_run):
    _, run_dir, _ = sft_run
    lines = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
    assert sorted((x["round"], x["platform"]) for x in lines) == sorted(
        (r, n) for r in (1, 2) for n in ("fashion-mall", "gadget-hub", "home-market")
    )
    for x in lines:
        assert len(x["samples"]) == 2
        assert {"prompt", "reference", "answer"} == set(x["samples"][0])
        assert x["samples"][0]["prompt"].endswith("<|bos|>assistant\n")


def test_the_saved_adapter_reproduces_a_platforms_reported_figures(sft_run, tmp_path):
    """`fl-llm generate` (plain transformers + peft, the saved base and adapter) answers the
    platform's held-out conversations exactly as the platform did when it reported its metrics."""
    from fl_llm.data.sources import load_platform_data
    from fl_llm.text_metrics import text_metrics

    cfg, run_dir, _ = sft_run
    held = load_platform_data(cfg, 1).eval
    path = tmp_path / "held.jsonl"
    path.write_text("".join(json.dumps({"messages": r["messages"]}, ensure_ascii=False) + "\n" for r in held))
    out = tmp_path / "answers.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "fl_llm", "generate", str(run_dir), "--jsonl", str(path), "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "FutureWarning" not in proc.stderr, proc.stderr[-2000:]  # peft's deprecated question, not the user's
    answers = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    reported = read_metrics(run_dir)[-1]["platforms"]["gadget-hub"]
    mine = text_metrics([a["answer"] for a in answers], [a["reference"] for a in answers])
    for key in ("exact_match", "token_f1", "rouge_l", "chrf"):
        assert mine[key] == pytest.approx(reported[key], abs=1e-9), key
    assert f"exact match {reported['exact_match']:.4f} over 12" in proc.stderr
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
    last = next(s for s in samples if s["round"] == 2 and s["platform"] == "gadget-hub")["samples"]
    assert [a["answer"] for a in answers[:2]] == [s["answer"] for s in last]


def test_generate_held_out_answers_a_platforms_own_conversations_as_it_reported(sft_run, tmp_path, capsys):
    """`fl-llm generate RUN_DIR --held-out NAME` remakes that platform's held-out conversations from
    the run's config and prints the exact match the platform reported — no JSONL to write first."""
    from fl_llm.cli import main
    from fl_llm.data.sources import load_platform_data

    cfg, run_dir, _ = sft_run
    out = tmp_path / "answers.jsonl"
    assert main(["generate", str(run_dir), "--held-out", "home-market", "--out", str(out)]) == 0
    reported = read_metrics(run_dir)[-1]["platforms"]["home-market"]
    assert f"exact match {reported['exact_match']:.4f} over 12 " in capsys.readouterr().err
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    held = load_platform_data(cfg, 2).eval  # home-market is the third platform
    assert [r["reference"] for r in rows] == [r["messages"][-1]["content"] for r in held]
    for extra, says in (
        (["--held-out", "nowhere-mall"], "it has: fashion-mall, gadget-hub, home-market"),
        (["--held-out", "home-market", "hi"], "one of them"),
        (["--held-out", "home-market", "--jsonl", str(out)], "one of them"),
    ):
        assert main(["generate", str(run_dir), *extra]) == 2, extra
        assert says in capsys.readouterr().err, extra
    assert main(["generate", str(tmp_path), "--held-out", "home-market"]) == 2
    assert "not a run directory" in capsys.readouterr().err
    yes_no = tmp_path / "yes-no"  # the same run dir, its config saying a yes/no task: no conversations to remake
    shutil.copytree(run_dir, yes_no, ignore=shutil.ignore_patterns("checkpoints", "platforms_state"))
    config = (yes_no / "config.yaml").read_text(encoding="utf-8")
    (yes_no / "config.yaml").write_text(config.replace("task: instruction", "task: ctr", 1), encoding="utf-8")
    assert main(["generate", str(yes_no), "--held-out", "home-market"]) == 2
    assert "data.task is ctr" in capsys.readouterr().err


def test_generate_answers_a_plain_prompt_and_refuses_what_it_cannot(sft_run, tmp_path, capsys):
    from fl_llm.cli import main

    _, run_dir, _ = sft_run
    system = ["--system", "You are the shopping assistant of gadget-hub."]
    assert main(["generate", str(run_dir), *system, "Shipping?", "How long is the warranty?"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert [line[:4] for line in printed if line.startswith("[")] == ["[1] ", "[2] "]
    for extra, says in (
        (["--platform", "gadget-hub", "hi"], "no adapter of that platform"),
        ([], "give PROMPT arguments, --jsonl FILE or --held-out NAME"),
        (["--jsonl", str(tmp_path / "missing.jsonl")], "no such file"),
    ):
        assert main(["generate", str(run_dir), *extra]) == 2
        assert says in capsys.readouterr().err, extra
    assert main(["generate", str(tmp_path), "hi"]) == 2
    assert "not a run directory" in capsys.readouterr().err
    broken = tmp_path / "rank-changed"  # the run's tensors, a config saying another rank
    shutil.copytree(run_dir / "adapter", broken)
    config = json.loads((broken / "adapter_config.json").read_text())
    (broken / "adapter_config.json").write_text(json.dumps({**config, "r": config["r"] // 2}))
    for extra, says in (
        (["--adapter", str(broken)], "does not fit this run's base model"),
        (["--adapter", str(tmp_path / "missing")], "not a PEFT adapter directory"),
        (["--adapter", str(run_dir / "adapter"), "--platform", "gadget-hub"], "give one"),
    ):
        assert main(["generate", str(run_dir), *extra, "hi"]) == 2, extra
        assert says in capsys.readouterr().err, extra
    # a run that merged its adapters into the base (FedEx, FLoRA) has no global adapter to load on the
    # plain base; an adapter named with --adapter (a compare's local-only one) is made for that base
    merged = tmp_path / "merged"
    shutil.copytree(run_dir, merged)
    (merged / "base_delta.safetensors").write_bytes(b"")
    assert main(["generate", str(merged), "hi"]) == 2
    assert "merged adapters into its base" in capsys.readouterr().err
    assert main(["generate", str(merged), "--adapter", str(run_dir / "adapter"), "hi"]) == 0


def _generate_held_out(run_dir, platform: int, tmp_path, *extra) -> subprocess.CompletedProcess:
    """`fl-llm generate --jsonl` over one platform's held-out conversations (subprocess: plain
    transformers + peft, nothing of the platforms' state)."""
    from fl_llm.config import load
    from fl_llm.data.sources import load_platform_data

    held = load_platform_data(load(str(run_dir / "config.yaml"), []), platform).eval
    path = tmp_path / f"held-{platform}.jsonl"
    path.write_text("".join(json.dumps({"messages": r["messages"]}, ensure_ascii=False) + "\n" for r in held))
    argv = ["generate", str(run_dir), "--jsonl", str(path), "--out", str(tmp_path / "answers.jsonl"), *extra]
    return subprocess.run(
        [sys.executable, "-m", "fl_llm", *argv], capture_output=True, text=True, cwd=REPO, timeout=300
    )


def test_personalise_writes_each_platforms_adapter_which_generate_reproduces(sft_run, tmp_path, capsys):
    """`fl-llm personalise`: P local rounds from the run's global adapter on every platform; the
    global figures it reports are the run's own last round (so it started from the run's model),
    each platform's own model fits its held-out answers better, and `fl-llm generate --platform`
    answers exactly as the platform scored its own model."""

    from fl_llm.cli import main

    _, src, _ = sft_run
    run_dir = tmp_path / "run"
    shutil.copytree(src, run_dir)  # the module's run stays as it was for the other tests
    argv = ["personalise", str(run_dir), "--rounds", "2", "--schedule", "fresh", "eval.generate_examples=0"]
    argv.append("backend=local")  # in-process platforms (the yes/no run's personalise runs on Ray)
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "2 local rounds (12 steps, fresh schedule)" in printed and "gadget-hub" in printed
    result = json.loads((run_dir / "personal" / "personal.json").read_text())
    assert (result["rounds"], result["steps"], result["metric"]) == (2, 12, "exact_match")
    reported = read_metrics(run_dir)[-1]["platforms"]
    names = ["fashion-mall", "gadget-hub", "home-market"]
    assert sorted(result["platforms"]) == names
    assert sorted(p.name for p in (run_dir / "personal").iterdir() if p.is_dir()) == names
    for name in names:
        glob, own = result["platforms"][name]["global"], result["platforms"][name]["personal"]
        assert glob["exact_match"] == pytest.approx(reported[name]["exact_match"], abs=1e-12), name
        assert glob["eval_loss"] == pytest.approx(reported[name]["eval_loss"], rel=1e-5), name
        assert own["eval_loss"] < glob["eval_loss"], name  # 12 more steps on its own data, from 2 rounds
    proc = _generate_held_out(run_dir, 1, tmp_path, "--platform", "gadget-hub")
    assert proc.returncode == 0, proc.stderr[-2000:]
    em = result["platforms"]["gadget-hub"]["personal"]["exact_match"]
    assert f"exact match {em:.4f} over 12" in proc.stderr
    answers = [json.loads(x)["answer"] for x in (tmp_path / "answers.jsonl").read_text(encoding="utf-8").splitlines()]
    glob_proc = _generate_held_out(run_dir, 1, tmp_path)  # the global adapter answers otherwise
    glob_answers = [
        json.loads(x)["answer"] for x in (tmp_path / "answers.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    assert glob_proc.returncode == 0 and answers != glob_answers
    # the same adapter named by its directory (as fl-llm compare --keep-adapters writes them)
    assert (
        main(
            [
                "generate",
                str(run_dir),
                "--adapter",
                str(run_dir / "personal" / "gadget-hub"),
                "--jsonl",
                str(tmp_path / "held-1.jsonl"),
                "--out",
                str(tmp_path / "by-dir.jsonl"),
            ]
        )
        == 0
    )
    assert f"exact match {em:.4f} over 12" in capsys.readouterr().err
    by_dir = [json.loads(x)["answer"] for x in (tmp_path / "by-dir.jsonl").read_text(encoding="utf-8").splitlines()]
    assert by_dir == answers

    # again: refused (exit 2) without --overwrite, and what is there is left as it was
    before = (run_dir / "personal" / "personal.json").read_bytes()
    assert main(["personalise", str(run_dir)]) == 2
    assert "exists; --overwrite replaces it" in capsys.readouterr().err
    assert (run_dir / "personal" / "personal.json").read_bytes() == before


def test_personalise_stops_with_one_line_when_a_platforms_data_no_longer_loads(sft_run, tmp_path, capsys):
    """The platforms load their data again: a file that changed since the run (here: records without
    messages) is the user's error — exit 2 with the platform's line, nothing written."""

    import yaml

    from fl_llm.cli import main

    _, src, _ = sft_run
    run_dir = tmp_path / "run"
    shutil.copytree(src, run_dir)
    paths = []
    for name in ("fashion-mall", "gadget-hub", "home-market"):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"question": f"q{i}", "reply": f"a{i}"}) + "\n" for i in range(30)))
        paths.append(str(path))
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["data"].update(source="files", files={**config["data"]["files"], "paths": paths})
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    assert main(["personalise", str(run_dir), "tracking.progress=false", "backend=local"]) == 2
    err = capsys.readouterr().err
    assert "needs 'messages'" in err and err.count("\n") == 1, err
    assert not (run_dir / "personal").exists()


def _fake_run(tmp_path, name: str, overrides: list[str], status: str = "completed"):
    """A run directory as a finished run leaves it, as far as personalise checks before starting."""
    import yaml

    from fl_llm.config import load, to_dict

    rd = tmp_path / name
    (rd / "adapter").mkdir(parents=True)
    (rd / "adapter" / "adapter_model.safetensors").write_bytes(b"")
    (rd / "config.yaml").write_text(yaml.safe_dump(to_dict(load(None, [*SFT, *overrides]))))
    (rd / "summary.json").write_text(json.dumps({"status": status}))
    return rd


@pytest.mark.parametrize(
    "overrides, status, says",
    [
        ([], "interrupted", "the run has not finished (status interrupted)"),
        (["privacy.dp.level=record", "privacy.target_epsilon=8", "client.pack_length=0"], "completed", "privacy"),
        (["privacy.dp.level=client", "privacy.target_epsilon=8"], "completed", "ledger does not count"),
        (["privacy.secagg.enabled=true"], "completed", "each platform's plain update"),
        (["strategy.name=fedsa"], "completed", "keeps a model per platform already"),
        (["strategy.name=fedex"], "completed", "merges updates into the base"),
    ],
)
def test_personalise_refuses_runs_whose_promises_it_would_break(tmp_path, capsys, overrides, status, says):
    """Exit 2 with one line, before any platform starts and with nothing written."""
    from fl_llm.cli import main

    rd = _fake_run(tmp_path, "run", overrides, status)
    listing = sorted(p.name for p in rd.rglob("*"))
    assert main(["personalise", str(rd)]) == 2
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1, err
    assert sorted(p.name for p in rd.rglob("*")) == listing


def test_personalise_refuses_what_is_not_a_run_and_rounds_below_one(tmp_path, capsys):
    from fl_llm.cli import main

    assert main(["personalise", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err
    rd = _fake_run(tmp_path, "run", [])
    assert main(["personalise", str(rd), "--rounds", "0"]) == 2
    assert "--rounds must be >= 1" in capsys.readouterr().err
    for mu in ("-1", "nan", "inf"):  # a negative μ would push away from the global model
        assert main(["personalise", str(rd), "--schedule", "fresh", "--anchor", mu]) == 2
        assert "--anchor must be a finite number >= 0" in capsys.readouterr().err
        assert main(["compare", "--personal-anchor", mu]) == 2
        assert "--personal-anchor must be a finite number >= 0" in capsys.readouterr().err
    assert not (rd / "personal").exists()
    for override in ("seed=3", "data.num_platforms=2", "federation.platforms=[]", "eval"):
        assert main(["personalise", str(rd), override]) == 2
        assert "only server.round_timeout_s, backend, ray., tracking., eval., personalise. may change" in (
            capsys.readouterr().err
        )
    for override in ("personalise.schedule=gentle", "personalise.anchor=-1"):  # the section's values are checked
        assert main(["personalise", str(rd), override]) == 2
        assert "config key 'personalise." in capsys.readouterr().err
        assert main(["compare", override]) == 2
        assert "config key 'personalise." in capsys.readouterr().err
    assert not (rd / "personal").exists()


@pytest.mark.parametrize("allowed", [False, True])
def test_record_level_dp_with_secure_aggregation_keeps_the_sample_generations_home(tmp_path, allowed):
    """Generations quote held-out prompts verbatim: under record-level DP they leave the platform
    only if it allows it (eval.samples_under_dp)."""
    from fl_llm.config import load
    from fl_llm.server.loop import run

    extra = [
        "backend=local",
        "server.rounds=1",
        "privacy.dp.level=record",
        "privacy.target_epsilon=8",
        "privacy.secagg.enabled=true",
        "client.pack_length=0",
        f"eval.samples_under_dp={str(allowed).lower()}",
    ]
    run(load(None, [*SFT, *extra]), tmp_path / "dp")
    row = read_metrics(tmp_path / "dp")[0]
    assert 0 <= row["exact_match"] <= 1 and row["epsilon"] > 0
    assert (tmp_path / "dp" / "samples.jsonl").exists() == allowed


def test_decoding_settings_greedy_is_deterministic_and_sampling_is_seeded(sft_run):
    import dataclasses

    from fl_llm.data.chat import generation_prompt
    from fl_llm.data.sources import load_platform_data
    from fl_llm.generation import generate_answers, load_run_model

    cfg, run_dir, _ = sft_run
    model, tokenizer, _ = load_run_model(run_dir)
    prompts = [generation_prompt(tokenizer, r["messages"], 140) for r in load_platform_data(cfg, 0).eval]
    greedy = cfg.eval
    hot = dataclasses.replace(greedy, do_sample=True, temperature=2.0, top_p=1.0)

    def answer(settings, seed=0):
        return generate_answers(model, tokenizer, prompts, settings=settings, batch_size=8, device="cpu", seed=seed)

    assert answer(greedy) == answer(greedy, seed=5)  # greedy ignores the seed
    assert answer(hot, seed=1) == answer(hot, seed=1)  # sampling is reproducible from its seed
    assert answer(hot, seed=1) != answer(greedy)
    full, short = answer(greedy), answer(dataclasses.replace(greedy, max_new_tokens=2))
    assert all(len(s) <= len(f) for s, f in zip(short, full)) and short != full


def test_conversation_files_alpaca_and_chat_with_column_mapping(tmp_path):
    """TALLRec's Alpaca JSON as it ships, and a chat JSONL whose messages column has another name."""
    from fl_llm.config import load
    from fl_llm.data.sources import load_platform_data

    cfg = load(str(REPO / "configs" / "tallrec_instruction.yaml"), ["data.files.max_rows=50"])
    cfg = load(
        None,
        [
            "data.task=instruction",
            "data.source=files",
            "data.num_platforms=2",
            "data.files.max_rows=50",
            f"data.files.paths=[{SHARED_DATA}/tallrec/movie_valid.json,{SHARED_DATA}/tallrec/book_valid.json]",
            "eval.choices=[No.,Yes.]",
        ],
    )
    data = load_platform_data(cfg, 1)
    first = data.train[0]["messages"]
    assert [m["role"] for m in first] == ["user", "assistant"] and first[1]["content"] in ("Yes.", "No.")
    assert "User Preference" in first[0]["content"] and len(data.train) == 50
    chat = tmp_path / "shop.jsonl"
    rows = [
        {
            "conversation": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}],
            "kind": "faq",
        }
        for i in range(10)
    ]
    chat.write_text("".join(json.dumps(r) + "\n" for r in rows))
    files = ["data.task=instruction", "data.source=files", "data.num_platforms=1", f"data.files.paths=[{chat}]"]
    got = load_platform_data(load(None, [*files, "data.files.columns={messages: conversation, skill: kind}"]), 0)
    assert got.train[0]["skill"] == "faq" and got.train[0]["messages"][1]["content"].startswith("a")
    from fl_llm.errors import UserError

    with pytest.raises(UserError, match="needs 'messages'"):
        load_platform_data(load(None, files), 0)


@pytest.mark.parametrize(
    "overrides, says",
    [
        (["data.task=instruction", "client.loss=verbalizer"], "'client.loss' must be lm"),
        (["data.task=instruction", "model.kind=seq_cls"], "'model.kind' must be causal_lm"),
        (["data.task=instruction", "data.verbalizer=[' a',' b']"], "'data.verbalizer' must be unset"),
        (["eval.choices=[No.,Yes.]"], "applies to data.task=instruction"),
        (["data.task=instruction", "eval.choices=[Yes.,Yes.]"], "distinct answers"),
    ],
)
def test_settings_that_do_not_fit_the_task_are_refused(overrides, says):
    from fl_llm.config import load
    from fl_llm.errors import UserError

    with pytest.raises(UserError, match=says):
        load(None, overrides)


def test_the_notebook_shows_generations_beside_the_metrics(sft_run, monkeypatch):
    import os

    import nbformat
    from nbclient import NotebookClient

    _, run_dir, _ = sft_run
    nb = nbformat.read(REPO / "notebooks" / "evaluate.ipynb", as_version=4)
    monkeypatch.setenv("FL_LLM_RUNS", str(run_dir))
    monkeypatch.setenv("PYTHONPATH", f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "round 2, gadget-hub: exact_match" in text and "reference:" in text and "answer:" in text
    assert "exact_match evaluated now" in text  # the saved adapter, evaluated again with generation


def test_a_resumed_run_keeps_only_the_sample_generations_of_its_checkpointed_rounds(tmp_path):
    """Rounds after the checkpoint are run again on resume: their samples are not kept twice."""
    from fl_llm.tracking import RunDir

    rd = RunDir(tmp_path)
    lines = [json.dumps({"round": r, "platform": "shop", "samples": []}) for r in (1, 2, 3)]
    (tmp_path / "samples.jsonl").write_text("\n".join(lines) + '\n{"round": 4, "plat')  # cut short
    rd.rewrite_metrics([{"round": 1}, {"round": 2}])
    kept = [json.loads(x)["round"] for x in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert kept == [1, 2]
