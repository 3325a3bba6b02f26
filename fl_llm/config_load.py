"""Loading the run configuration: YAML files and `KEY=VALUE` overrides into the typed dataclasses
of `fl_llm.config`, every error a `UserError` naming the dotted key and what it accepts; the encoder
recipe; the option list `fl-llm run --help` prints; config differences for `--resume`."""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml

from fl_llm.errors import UserError

if TYPE_CHECKING:
    from fl_llm.config import RunConfig


def _run_config() -> type:
    from fl_llm.config import RunConfig  # the schema re-exports this module's functions: import late

    return RunConfig


# ---------------------------------------------------------------------------------------------
# Loading: dict -> dataclasses, with every error naming its dotted key.


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin is dict:
        return "a mapping"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping of " + ", ".join(f.name for f in dataclasses.fields(tp))
    if tp is type(None):
        return "null"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    bad = UserError(f"config key '{key}' must be {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise bad
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise bad
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except UserError:
                pass
        raise bad
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        _, val_tp = typing.get_args(tp)
        return {str(k): _coerce(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        items = value if isinstance(value, list) else [value]
        if dataclasses.is_dataclass(item_tp):
            return [_build(item_tp, v, f"{key}[{i}].") for i, v in enumerate(items)]
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(items)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise bad
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        if not math.isfinite(value):  # .nan / .inf parse as YAML floats; no setting means them
            raise UserError(f"config key '{key}' must be a finite number, got {value}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise TypeError(f"unsupported config type {tp} at {key}")


def _check_rules(value: Any, meta: dict, key: str) -> None:
    values = value if isinstance(value, list) else [value]
    for v in values:
        if v is None or isinstance(v, str) or dataclasses.is_dataclass(v):
            continue
        if "min" in meta and v < meta["min"]:
            raise UserError(f"config key '{key}' must be >= {meta['min']}, got {v!r}")
        if "max" in meta and v > meta["max"]:
            raise UserError(f"config key '{key}' must be <= {meta['max']}, got {v!r}")
        if "gt" in meta and v <= meta["gt"]:
            raise UserError(f"config key '{key}' must be > {meta['gt']}, got {v!r}")


def _build(cls: type, data: Any, prefix: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"config key '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"under '{prefix.rstrip('.')}'" if prefix else "at the top level"
        raise UserError(f"unknown config key '{prefix}{unknown[0]}'; valid keys {where}: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        key = prefix + name
        if dataclasses.is_dataclass(hints[name]):
            kwargs[name] = _build(hints[name], data.get(name), key + ".")
        elif name in data:
            value = _coerce(data[name], hints[name], key)
            _check_rules(value, f.metadata, key)
            kwargs[name] = value
    return cls(**kwargs)


# The encoder recipe: with model.kind=seq_cls, these replace the defaults of the keys a config does
# not set (a key it sets, even to null, is kept). Measured on real review, risk and recommendation
# sets with a pretrained MiniLM on 2 CPU cores (docs/results.md): the classification head starts
# from random and takes a larger step than the adapters on the pretrained body, after a short
# warm-up; LoRA goes on the attention and dense layers as BERT-family encoders name them (for a
# pretrained encoder, not the built-in model; another encoder's names: set
# model.lora.target_modules — a name that matches no layer stops the run, listing the layers);
# and rounds are fewer and shorter than the built-in model's.
ENCODER_RECIPE: dict[str, Any] = {
    "model.lora.target_modules": ["query", "key", "value", "dense"],  # BERT-family layer names
    "client.lr": 2e-3,
    "client.head_lr": 1e-2,
    "client.warmup_steps": 10,
    "client.local_steps": 10,
    "server.rounds": 8,
}


def with_recipe(data: dict) -> dict:
    """`data` with the encoder recipe filled in where it applies (model.kind=seq_cls) and the key
    is not set; a copy, the caller's dict untouched."""
    model = data.get("model")
    if not isinstance(model, dict) or model.get("kind") != "seq_cls":
        return data
    out = copy.deepcopy(data)
    builtin = model.get("name_or_path", "tiny") in (None, "tiny")
    for dotted, value in ENCODER_RECIPE.items():
        if builtin and dotted.startswith("model."):
            continue  # the built-in model names its layers as a Llama does
        *path, key = dotted.split(".")
        node = out
        for part in path:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                break  # not a mapping: loading will say so
        else:
            if key not in node:
                node[key] = copy.deepcopy(value)
    return out


def recipe_line(cfg: RunConfig) -> str:
    """One line naming the encoder recipe's values in this run (each the recipe's unless set)."""
    values = []
    for dotted in ENCODER_RECIPE:
        value = cfg
        for part in dotted.split("."):
            value = getattr(value, part)
        values.append(f"{dotted}={value}".replace(" ", ""))
    return "encoder recipe (model.kind=seq_cls; a key you set wins): " + " ".join(values)


def from_dict(data: dict) -> RunConfig:
    from fl_llm.config_checks import check_cross_fields  # needs the registries; they need this module

    cfg = _build(_run_config(), with_recipe(data), "")
    check_cross_fields(cfg)
    return cfg


def to_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)


# Settings that say where and how a run ran, not what it computes: `run --resume` and `compare
# --resume` let them change. (Not server.rounds: the learning-rate schedule spans the rounds.)
WHERE_NOT_WHAT = ("server.round_timeout_s", "backend", "ray.", "tracking.", "checkpoint.")


def key_in(key: str, patterns: tuple[str, ...]) -> bool:
    """Whether dotted `key` is one of `patterns`, or under one that ends in '.' ("ray." covers ray.*)."""
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in patterns)


def differences(a: dict, b: dict, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, a's value, b's value) for every setting where two config dicts differ."""
    out = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            out.extend(differences(x, y, f"{prefix}{key}."))
        elif x != y:
            out.append((prefix + key, x, y))
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """`server.rounds=3` -> (['server', 'rounds'], 3); the value is read as YAML."""
    if "=" not in text:
        raise UserError(f"override {text!r} must look like KEY=VALUE, e.g. server.rounds=3")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise UserError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise UserError(f"override {text!r}: the value is not valid YAML ({e.problem})") from None
    return key.split("."), value


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error (PyYAML keeps
    the last one silently, so a second `client:` section would erase the first)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                mark = key_node.start_mark
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} appears twice in one section", mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        raise UserError(f"config file {str(path)!r} is a directory, not a YAML file")
    if not path.is_file():
        raise UserError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except UnicodeDecodeError as e:
        raise UserError(f"config file {str(path)!r} is not UTF-8 text (byte {e.start})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"config file {str(path)!r} is not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {str(path)!r} must hold a mapping of keys, got {type(data).__name__}")
    return data


def load(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """Load a YAML config and apply overrides.

    With no path the embedded default is used: the dataclass defaults above, which
    `configs/default.yaml` spells out (a test keeps the two identical).
    """
    data = read_yaml(path) if path is not None else {}
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            child = node.get(k)
            if child is None:
                child = node[k] = {}
            elif not isinstance(child, dict):
                raise UserError(f"override {text!r}: '{k}' is not a section")
            node = child
        node[keys[-1]] = value
    return from_dict(data)


def describe(cls: type | None = None, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, help) for every option, for `fl-llm run --help`."""
    cls = cls or _run_config()
    rows = []
    hints = typing.get_type_hints(cls)
    default = cls()
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        if dataclasses.is_dataclass(hints[f.name]):
            rows.extend(describe(hints[f.name], key + "."))
        else:
            help = f.metadata.get("help", "")
            if key in ENCODER_RECIPE:
                help += f" [model.kind=seq_cls: {ENCODER_RECIPE[key]!r} unless set]"
            rows.append((key, repr(getattr(default, f.name)), help))
    return rows
