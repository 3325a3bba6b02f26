"""Every strategy end to end (in-process backend, tiny federation), and what each promises of the
saved model: FedProx μ=0 is FedAvg, FedEx/FLoRA export the base they merged into, FedSA saves
each platform's own adapter, ranks may differ per platform."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest

from fl_llm.config import load
from fl_llm.server.loop import run
from fl_llm.strategies import STRATEGIES
from fl_llm.tracking import read_metrics
from tests.conftest import SMALL

TINY = [*SMALL, "backend=local", "server.rounds=1", "client.local_steps=3", "data.synthetic.eval_examples=40"]
EXTRA = {
    "scaffold": ["client.optimizer=sgd", "client.lr=0.05"],
    "krum": ["data.num_platforms=5", "data.synthetic.train_examples=[60]"],
    "fedper": ["model.kind=seq_cls", "data.task=review"],  # the head it keeps: a classifier's
}


def _run(path, *overrides):
    summary = run(load(None, [*TINY, *overrides]), path)
    return summary, read_metrics(path)


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_every_strategy_runs(name, tmp_path):
    summary, rows = _run(tmp_path / name, f"strategy.name={name}", *EXTRA.get(name, []))
    assert summary["status"] == "completed" and summary["strategy"] == name
    (row,) = rows
    assert np.isfinite(row["eval_loss"]) and row["eval_loss"] < summary["initial"]["eval_loss"]
    if STRATEGIES[name].one_global_model:
        assert row["aggregation_error"] is not None and row["aggregation_error"] >= 0
    sent = {p["bytes_up"] for p in row["platforms"].values()}
    full = row["adapter_bytes"]
    if name == "scaffold":
        assert sent == {2 * full}  # the update and Δc
    elif name in ("ffa", "fedsa", "fedper"):
        assert max(sent) < full  # only B, only A, or no head
    else:
        assert sent == {full}


def _adapter(path):
    from safetensors.numpy import load_file

    return load_file(str(path / "adapter_model.safetensors"))


def test_fedprox_with_mu_zero_is_fedavg(tmp_path):
    _run(tmp_path / "avg", "strategy.name=fedavg")
    _run(tmp_path / "prox", "strategy.name=fedprox", "strategy.mu=0")
    a, b = _adapter(tmp_path / "avg" / "adapter"), _adapter(tmp_path / "prox" / "adapter")
    assert all(np.array_equal(a[k], b[k]) for k in a)
    _run(tmp_path / "prox1", "strategy.name=fedprox", "strategy.mu=1.0")
    c = _adapter(tmp_path / "prox1" / "adapter")
    assert any(not np.array_equal(a[k], c[k]) for k in a)


def _reevaluate(run_dir, platform: int, cfg):
    """Load the saved base model + adapter with plain transformers + peft and score one platform's
    held-out split: it must reproduce what the run logged."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fl_llm.client.evaluation import evaluate_model as evaluate
    from fl_llm.data.batching import answer_token_ids, encode
    from fl_llm.data.sources import load_platform_data, task_of

    base = AutoModelForCausalLM.from_pretrained(run_dir / "base_model")
    model = PeftModel.from_pretrained(base, run_dir / "adapter")
    tok = AutoTokenizer.from_pretrained(run_dir / "base_model")
    task = task_of(cfg)
    enc = encode(load_platform_data(cfg, platform).eval, task, tok, cfg.model.max_length)
    out = evaluate(
        model, enc, answer_ids=answer_token_ids(task, tok), batch_size=64, device="cpu", pad_id=tok.pad_token_id
    )
    return out["loss_sum"] / out["tokens"]


@pytest.mark.parametrize("name", ["fedex", "flora"])
def test_merging_strategies_export_what_was_evaluated(name, tmp_path):
    """FedEx/FLoRA change the frozen weights; the saved base_model/ carries that change, and a
    platform restarted mid-run (it must replay every merge) still evaluates the same model."""
    cfg = load(None, [*TINY, f"strategy.name={name}", "server.rounds=3", "faults.kill=[{platform: 1, round: 2}]"])
    run(cfg, tmp_path / name)
    rows = read_metrics(tmp_path / name)
    assert rows[1]["restarted"] == ["gadget-hub"]
    for platform, pname in enumerate(["fashion-mall", "gadget-hub"]):
        logged = rows[-1]["platforms"][pname]["eval_loss"]
        assert _reevaluate(tmp_path / name, platform, cfg) == pytest.approx(logged, rel=1e-4)
    if name == "flora":  # everything lives in the base: the fresh adapter's B is zero
        assert not any(v.any() for k, v in _adapter(tmp_path / name / "adapter").items() if "lora_B" in k)


def test_fedsa_keeps_b_on_each_platform(tmp_path):
    _, rows = _run(tmp_path / "sa", "strategy.name=fedsa", "server.rounds=2")
    personal = {p: _adapter(tmp_path / "sa" / "personal" / p) for p in ["fashion-mall", "gadget-hub", "home-market"]}
    a_keys = [k for k in personal["fashion-mall"] if "lora_A" in k]
    b_keys = [k for k in personal["fashion-mall"] if "lora_B" in k]
    for k in a_keys:  # the shared part is the same everywhere
        assert np.array_equal(personal["fashion-mall"][k], personal["gadget-hub"][k])
    assert any(not np.array_equal(personal["fashion-mall"][k], personal["gadget-hub"][k]) for k in b_keys)
    assert not (tmp_path / "sa" / "adapter").exists()  # no single global model to export


def test_fedper_keeps_each_platforms_head_and_compare_scores_its_own_model(tmp_path):
    """FedPer shares the LoRA factors and keeps each platform's classification head; compare scores
    each platform with its own head, exactly as the run evaluated it, and the arms it trains itself
    are those of a FedAvg comparison (they keep nothing from a federation)."""
    from fl_llm.compare import PERSONAL, compare

    cls = [*TINY, "model.kind=seq_cls", "data.task=review"]
    per = compare(load(None, [*cls, "strategy.name=fedper"]), tmp_path / "per")
    avg = compare(load(None, [*cls, "strategy.name=fedavg"]), tmp_path / "avg")
    names = ["fashion-mall", "gadget-hub", "home-market"]
    own = {p: _adapter(tmp_path / "per" / "federated" / "personal" / p) for p in names}
    head = [k for k in own[names[0]] if "lora_" not in k]
    assert head and all(not np.array_equal(own[names[0]][k], own[names[1]][k]) for k in head)
    assert all(np.array_equal(own[names[0]][k], own[p][k]) for p in names for k in own[p] if "lora_" in k)
    logged = read_metrics(tmp_path / "per" / "federated")[-1]["platforms"]
    for p in names:
        assert per["detail"]["federated"][p]["macro_f1"] == pytest.approx(logged[p]["macro_f1"], abs=1e-9)
        for arm in ("local", "centralized"):
            assert per["detail"][arm][p]["macro_f1"] == avg["detail"][arm][p]["macro_f1"]
    assert PERSONAL not in per["detail"]  # its federated models are the personal ones already


def test_a_fedper_platform_sends_no_head_and_keeps_the_one_it_trained():
    """What leaves a FedPer platform is the LoRA factors' update and nothing of its head (the
    tiny classifier's `score`); the head it trained is what it starts the next round from."""
    from fl_llm.client.platform import Platform
    from fl_llm.config import to_dict

    plat = Platform(to_dict(load(None, [*TINY, "model.kind=seq_cls", "data.task=review", "strategy.name=fedper"])), 0)
    start = plat.initial_adapter()
    head = {k for k in start if "score" in k}
    sent = plat.train(start, 1)["update"]
    assert head and set(sent) == set(start) - head
    plat.commit(1)
    trained = {k: plat.persistent["B"][k] for k in head}
    assert all(not np.array_equal(trained[k], start[k]) for k in head)  # it did train the head
    assert all(np.array_equal(plat._load_global(start, None)[k], trained[k]) for k in head)


@pytest.mark.parametrize("name", ["flora", "fedavg", "ffa"])
def test_platforms_with_different_ranks(name, tmp_path):
    summary, rows = _run(tmp_path / name, f"strategy.name={name}", "model.lora.ranks=[2, 4, 8]")
    cfg = json.loads((tmp_path / name / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 8  # the global adapter has the largest rank
    sent = [rows[0]["platforms"][p]["bytes_up"] for p in ["fashion-mall", "gadget-hub", "home-market"]]
    assert sent[0] < sent[1] < sent[2]  # each platform sends its own rank
    assert rows[0]["eval_loss"] < summary["initial"]["eval_loss"]
    if name == "flora":
        assert rows[0]["aggregation_error"] < 1e-5


def test_compare_strategies_round_by_round(tmp_path):
    """`fl-llm compare --strategies`: the same job once per strategy and seed, in its own run dir;
    the summary's means, baseline counts and aggregation errors are those of the runs' metrics."""
    from fl_llm.compare_strategies import compare_strategies, format_strategies_table, strategy_configs

    cfgs = strategy_configs(load(None, [*TINY, "server.rounds=2", "seed=5"]), ["fedit", "fedex"])
    result = compare_strategies(cfgs, tmp_path / "cmp", seeds=2)
    assert result["seeds"] == [5, 6] and result["baseline"] == "fedit"
    assert json.loads((tmp_path / "cmp" / "strategies.json").read_text()) == result
    assert (tmp_path / "cmp" / "strategies.png").stat().st_size > 1000
    for name in ("fedit", "fedex"):
        rows = [read_metrics(tmp_path / "cmp" / name / f"seed-{s}") for s in (5, 6)]
        got = result["strategies"][name]
        for k in range(2):
            assert got["eval_loss"][k] == pytest.approx(np.mean([r[k]["eval_loss"] for r in rows]))
            assert got["auc"][k] == pytest.approx(np.mean([r[k]["auc"] for r in rows]))
    fedit, fedex = result["strategies"]["fedit"], result["strategies"]["fedex"]
    assert min(fedit["aggregation_error"]) > 1e-4 and max(fedex["aggregation_error"]) < 1e-5
    assert fedit["rounds_below_baseline_per_seed"] == [0, 0]  # never below itself
    table = format_strategies_table(result)
    assert "below fedit" in table and "(baseline)" in table and "mean over seeds 5..6" in table


def test_a_stopped_comparison_resumes_and_grows(tmp_path):
    """`compare --strategies --resume`: a finished run is read, not rerun; a run stopped after a
    checkpoint resumes to the same result as an uninterrupted one; an added strategy runs (as does
    an added seed: a run dir not there yet); a run made with another config stops the comparison
    instead of being mixed in."""
    from fl_llm.compare_strategies import compare_strategies, earlier_run, strategy_configs
    from fl_llm.errors import UserError

    def cfgs(names, *more):
        return strategy_configs(load(None, [*TINY, "server.rounds=2", "seed=5", *more]), names)

    out = tmp_path / "cmp"
    first = compare_strategies(cfgs(["fedit", "fedex"]), out)
    fedit, fedex = out / "fedit" / "seed-5", out / "fedex" / "seed-5"
    whole = read_metrics(fedex)
    # fedex "killed" after round 1: no summary, no round-2 line, no round-2 checkpoint
    (fedex / "summary.json").unlink()
    (fedex / "metrics.jsonl").write_text(json.dumps(whole[0]) + "\n", encoding="utf-8")
    for ckpt in sorted((fedex / "checkpoints").iterdir())[1:]:
        shutil.rmtree(ckpt)
    finished = (fedit / "summary.json").stat().st_mtime_ns
    seed5 = {n: dataclasses.replace(c, seed=5) for n, c in cfgs(["fedit", "fedex", "flora"]).items()}
    assert [earlier_run(seed5[n], out / n / "seed-5") for n in seed5] == ["reuse", "resume", "run"]
    stale = out / "flora" / "seed-5"  # stopped before its first checkpoint: started again
    (stale / "config.yaml").parent.mkdir(parents=True)
    shutil.copy(fedit / "config.yaml", stale / "config.yaml")
    assert earlier_run(seed5["fedit"], stale) == "run" and not stale.exists()

    grown = compare_strategies(cfgs(["fedit", "fedex", "flora"]), out, resume=True)
    assert (fedit / "summary.json").stat().st_mtime_ns == finished  # read, not run again
    assert [r["eval_loss"] for r in read_metrics(fedex)] == [r["eval_loss"] for r in whole]
    assert list(grown["strategies"]) == ["fedit", "fedex", "flora"]
    for name in ("fedit", "fedex"):
        assert (
            grown["strategies"][name]["final_eval_loss_per_seed"][0]
            == first["strategies"][name]["final_eval_loss_per_seed"][0]
        )
    assert (out / "flora" / "seed-5" / "summary.json").is_file()

    with pytest.raises(UserError, match="was run with client.lr=.*this comparison has client.lr=0.5"):
        compare_strategies(cfgs(["fedit", "fedex"], "client.lr=0.5"), out, resume=True)
    assert (fedit / "summary.json").stat().st_mtime_ns == finished  # nothing of it deleted


def test_strategy_summary_counts_rounds_below_the_baseline():
    from fl_llm.compare_strategies import format_strategies_table, summarise

    def rows(*losses):
        return [{"eval_loss": v, "auc": 0.5, "aggregation_error": 0.0} for v in losses]

    curves = {
        "fedit": [rows(1.0, 0.8, 0.6), rows(1.0, 0.9, 0.7)],
        "fedex": [rows(0.9, 0.9, 0.5), rows(0.95, 0.85, 0.9)],
    }
    s = summarise(curves, "auc", [0, 1])["strategies"]["fedex"]
    assert s["rounds_below_baseline_per_seed"] == [2, 2]  # seed 0: rounds 1, 3; seed 1: rounds 1, 2
    assert s["rounds_below_baseline"] == 1  # mean curves: 0.925 < 1.0, 0.875 > 0.85, 0.7 > 0.65
    assert s["eval_loss"] == pytest.approx([0.925, 0.875, 0.7])
    assert s["eval_loss_std"][0] == pytest.approx(np.std([0.9, 0.95], ddof=1))
    # paired by seed: round 1 differs by -0.1 and -0.05 (mean -0.075, s.e. 0.025: clearly below);
    # rounds 2 and 3 by +0.1/-0.05 and -0.1/+0.2 (means inside two standard errors)
    assert s["difference_to_baseline"] == pytest.approx([-0.075, 0.025, 0.05])
    assert s["difference_to_baseline_se"][0] == pytest.approx(0.025)
    assert s["rounds_clearly_below_baseline"] == [1] and s["rounds_clearly_above_baseline"] == []
    table = format_strategies_table(summarise(curves, "auc", [0, 1]))
    assert "fedex     below in round 1 (-0.075); above in no round" in table
    fedsa = [[{**r, "aggregation_error": None} for r in rows(0.9, 0.8, 0.7)]] * 2  # FedSA logs no error
    assert summarise({**curves, "fedsa": fedsa}, "auc", [0, 1])["strategies"]["fedsa"]["eval_loss"][2] == 0.7
    many = summarise({k: [rows(*([1.0] * 30))] for k in ("fedit", "ffa")}, "auc", [0])
    header = format_strategies_table(many).splitlines()[1].split()
    assert header[1] == "1" and header[10] == "30"  # 10 columns, the first and last round among them


@pytest.mark.parametrize(
    "name, extra",
    [("scaffold", ["client.optimizer=sgd", "client.lr=0.05"]), ("fedsa", []), ("fedavg", ["compression.name=topk"])],
)
def test_a_retried_round_leaves_the_platforms_state_as_it_was(name, extra, tmp_path):
    """Round 2's first attempt fails (platform 0 raises; 3 valid updates needed), so it is retried.
    The other platforms trained in that attempt, but what their training staged — SCAFFOLD's cᵢ,
    FedSA's own B, top-k's residual — is kept only for an accepted update. Training does not
    depend on the attempt, so the retried run must end exactly where a run without the fault ends."""
    base = [*TINY, "server.rounds=3", f"strategy.name={name}", *extra, "server.min_platforms=3"]
    run(load(None, base), tmp_path / "clean")
    run(load(None, [*base, "faults.error=[{platform: 0, round: 2}]"]), tmp_path / "retried")
    rows = read_metrics(tmp_path / "retried")
    assert len(rows[1]["attempts"]) == 1  # round 2 was tried twice
    assert [r["eval_loss"] for r in rows] == [r["eval_loss"] for r in read_metrics(tmp_path / "clean")]
    if name != "fedsa":  # the global adapter (FedSA's platforms save their own instead)
        a, b = _adapter(tmp_path / "clean" / "adapter"), _adapter(tmp_path / "retried" / "adapter")
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    else:  # each platform's own B, as saved by the platform
        for p in (tmp_path / "clean" / "personal").iterdir():
            mine, theirs = _adapter(p), _adapter(tmp_path / "retried" / "personal" / p.name)
            assert all(np.array_equal(mine[k], theirs[k]) for k in mine)
