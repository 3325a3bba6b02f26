"""Loading the run configuration: YAML files and `KEY=VALUE` overrides into the typed dataclasses
of `fl_llm.config`, every error a `UserError` naming the dotted key and what it accepts; the encoder
recipe; the option list `fl-llm run --help` prints; config differences for `--resume`."""

from __future__ import annotations

import copy
import dataclasses
import functools
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


def _hint(tp: Any, part: str | int) -> Any:
    """The type one step down from `tp`: a dataclass's field, a list's item, a mapping's value."""
    tp = _optional(tp)
    if dataclasses.is_dataclass(tp):
        return typing.get_type_hints(tp).get(part)
    args = typing.get_args(tp)
    return args[-1] if args else None


def _optional(tp: Any) -> Any:
    """X for `X | None`."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(tp) if a is not type(None)]
        return rest[0] if len(rest) == 1 else tp
    return tp


def _prepare(value: Any, tp: Any, key: str) -> Any:
    """What pydantic's lax mode would read too freely, refused (a bool from "yes" or 1, a number
    from true, an integer from "4"); a scalar where a list goes, wrapped; mapping keys as text."""
    tp = _optional(tp) if value is not None else tp
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp) and value is None:  # an empty section (`client:`): its defaults
        return {}
    if dataclasses.is_dataclass(tp) and isinstance(value, dict):
        hints = typing.get_type_hints(tp)
        return {k: _prepare(v, hints[k], f"{key}.{k}".lstrip(".")) if k in hints else v for k, v in value.items()}
    if origin is list:
        items = value if isinstance(value, list) else [value]
        return [_prepare(v, typing.get_args(tp)[0], f"{key}[{i}]") for i, v in enumerate(items)]
    if origin is dict and isinstance(value, dict):
        return {str(k): _prepare(v, typing.get_args(tp)[1], f"{key}.{k}") for k, v in value.items()}
    loose = (tp is bool and not isinstance(value, bool)) or (tp in (int, float) and isinstance(value, bool))
    if loose or (tp is int and isinstance(value, str)):
        raise UserError(f"config key '{key}' must be {_type_name(tp)}, got {value!r}")
    return value


def _user_error(error: dict) -> UserError:
    """One pydantic error as fl_llm says it: the dotted key, what it accepts, what it got."""
    loc, tp, key = error["loc"], _run_config(), ""
    for part in loc[:-1] if error["type"] == "unexpected_keyword_argument" else loc:
        key += f"[{part}]" if isinstance(part, int) else f".{part}"
        tp = _hint(tp, part)
    key, got = key.lstrip("."), error.get("input")
    if error["type"] == "unexpected_keyword_argument":
        where = f"under '{key}'" if key else "at the top level"
        valid = ", ".join(f.name for f in dataclasses.fields(_optional(tp)))
        return UserError(f"unknown config key '{key + '.' if key else ''}{loc[-1]}'; valid keys {where}: {valid}")
    if error["type"] == "finite_number":  # .nan / .inf parse as YAML floats; no setting means them
        return UserError(f"config key '{key}' must be a finite number, got {got}")
    bounds = {"greater_than": ">", "greater_than_equal": ">=", "less_than_equal": "<=", "less_than": "<"}
    if error["type"] in bounds:  # the rules declared with `opt` (gt, ge, le)
        (limit,) = error["ctx"].values()
        return UserError(f"config key '{key}' must be {bounds[error['type']]} {limit:g}, got {got!r}")
    return UserError(f"config key '{key}' must be {_type_name(tp)}, got {got!r}")


@functools.cache
def _validator():
    """pydantic's validator of `RunConfig`: unknown keys refused, NaN and infinities too."""
    from pydantic import ConfigDict, TypeAdapter

    def mark(cls: type) -> None:
        cls.__pydantic_config__ = ConfigDict(extra="forbid", allow_inf_nan=False)
        for tp in typing.get_type_hints(cls).values():
            inner = _hint(tp, 0) if typing.get_origin(_optional(tp)) is list else _optional(tp)
            if dataclasses.is_dataclass(inner):
                mark(inner)

    mark(_run_config())
    return TypeAdapter(_run_config())


def _build(data: Any) -> Any:
    """`RunConfig` from a mapping, validated by pydantic: the types, and the rules declared with `opt`."""
    from pydantic import ValidationError

    try:
        return _validator().validate_python(_prepare(data, _run_config(), ""))
    except ValidationError as e:
        raise _user_error(e.errors()[0]) from None


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

    cfg = _build(with_recipe(data))
    check_cross_fields(cfg)
    return cfg


def to_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)


# Settings that say where and how a run ran, or what is done after it (personalise.), not what it
# computes: `run --resume` and `compare --resume` let them change. (Not server.rounds: the
# learning-rate schedule spans the rounds.)
WHERE_NOT_WHAT = (
    "server.round_timeout_s",
    "backend",
    "ray.",
    "tracking.",
    "checkpoint.",
    "federation.",
    "personalise.",
)


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
