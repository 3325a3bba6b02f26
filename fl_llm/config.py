"""Typed run configuration: YAML files plus `key=value` overrides, validated at load.

Every option a user can set lives here, with its type, its allowed range and a line of help
(`fl-llm run --help` prints them all). Loading never half-succeeds: an unknown key or a bad value
raises `UserError` naming the dotted key and what is allowed, before anything runs.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from fl_llm.errors import UserError


def opt(default: Any, help: str, **rules: Any) -> Any:
    """A config field: default, one line of help, and optional rules (min, max, gt, choices)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **rules})
    return field(default=default, metadata={"help": help, **rules})


def section(cls: type, help: str) -> Any:
    return field(default_factory=cls, metadata={"help": help})


@dataclass
class TinyModelConfig:
    hidden_size: int = opt(128, "width of the built-in tiny Llama", min=8)
    num_layers: int = opt(2, "transformer blocks", min=1)
    num_heads: int = opt(4, "attention heads (must divide hidden_size)", min=1)
    num_kv_heads: int | None = opt(None, "key/value heads for grouped-query attention (null = num_heads)", min=1)
    intermediate_size: int = opt(256, "MLP width", min=8)
    vocab_size: int | None = opt(
        None, "embedding rows (null = the built-in tokenizer's 8192; more only adds unused rows)", min=8192
    )
    max_positions: int = opt(512, "longest sequence the model accepts", min=16)


@dataclass
class LoraSettings:
    r: int = opt(8, "LoRA rank", min=1)
    alpha: float = opt(16.0, "LoRA scaling numerator: scale = alpha / r", gt=0)
    dropout: float = opt(0.0, "dropout on the LoRA input", min=0, max=1)
    target_modules: list[str] = opt(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "module names (or ['all-linear']) that get adapters",
    )
    ranks: list[int] = opt([], "LoRA rank per platform (empty = r everywhere); the global adapter has the largest rank")
    trainable_modules: list[str] = opt(
        [],
        "which of target_modules the platforms train (empty = all); the others keep the factors they start "
        "from (model.init_adapter). Under DP: fewer noised weights, for modules whose gradients carry little",
    )


@dataclass
class ModelConfig:
    name_or_path: str = opt("tiny", "'tiny' (built in code, no download), a local directory, or a hub id")
    kind: Literal["causal_lm", "seq_cls"] = opt(
        "causal_lm", "causal_lm: answer words scored by the LM; seq_cls: an encoder with a classification head"
    )
    dtype: Literal["float32", "bfloat16", "float16"] = opt("float32", "weights' dtype for the frozen base model")
    quantization: Literal["none", "4bit"] = opt(
        "none",
        "4bit: QLoRA — the frozen base loaded in 4-bit NF4 (bitsandbytes, double quantization, bf16 compute); "
        "needs a CUDA GPU, the bitsandbytes package and a model directory or hub id",
    )
    max_length: int = opt(256, "longest tokenized example; longer prompts are cut from the left", min=8)
    attn_implementation: Literal["sdpa", "eager", "flex_attention", "flash_attention_2"] = opt(
        "sdpa",
        "attention kernel: sdpa (PyTorch's), eager, flex_attention (GPU: skips the blocks a packed row's "
        "block-diagonal mask hides) or flash_attention_2 (needs the flash-attn package; varlen for packed rows)",
    )
    init_adapter: str | None = opt(
        None,
        "a PEFT adapter directory (e.g. an earlier run's adapter/) that round 0 starts from instead of a fresh "
        "LoRA init — a warm start from training on public data; it must fit this base model and rank",
    )
    tiny: TinyModelConfig = section(TinyModelConfig, "shape of the built-in tiny model")
    lora: LoraSettings = section(LoraSettings, "LoRA adapter settings")


@dataclass
class SyntheticConfig:
    train_examples: list[int] = opt(
        [600, 400, 250], "training examples per platform (one number per platform, or one for all)"
    )
    eval_examples: int = opt(300, "held-out evaluation examples per platform", min=10)
    history_liked: int = opt(3, "liked items shown per prompt", min=1, max=20)
    history_disliked: int = opt(2, "disliked items shown per prompt", min=0, max=20)
    world_seed: int | None = opt(
        None,
        "seed of the synthetic world (catalog, platforms' customers); null = the run seed. Another value "
        "keeps the model's init and draws other data: e.g. public data for a warm start (model.init_adapter)",
        min=0,
    )


@dataclass
class FilesConfig:
    paths: list[str] = opt(
        [], "data files (JSONL, JSON, CSV, .csv.gz, Parquet, Excel .xlsx): one per platform, or one to split"
    )
    eval_paths: list[str] = opt([], "held-out files, matching `paths` (empty: hold out eval_fraction of each)")
    eval_fraction: float = opt(
        0.2,
        "share of each platform's rows held out for evaluation, drawn at random (seeded by seed and platform) "
        "when eval_paths is empty",
        gt=0,
        max=0.9,
    )
    split_by: str | None = opt(None, "column whose values are the platforms (one file for everyone)")
    split_values: list[str] = opt([], "which values of split_by become platforms, in order (empty: all, sorted)")
    columns: dict[str, str] = opt({}, "template field -> file column, where the names differ")
    label_column: str = opt("label", "column holding the label")
    label_values: list[str] = opt([], "file values of each label in verbalizer order (empty: 0, 1, ...)")
    max_rows: int | None = opt(
        None,
        "keep a random sample (seeded) of at most this many training rows per platform, and of held-out rows "
        "in proportion to eval_fraction",
        min=1,
    )
    sheet: str | None = opt(None, "Excel workbooks (.xlsx): the sheet to read (null: the first)")
    drop_missing: bool = opt(False, "skip rows with an empty needed value instead of stopping")


@dataclass
class PartitionConfig:
    method: Literal["natural", "iid", "dirichlet", "size_skew"] = opt(
        "natural", "natural: the data's own platforms; iid / dirichlet / size_skew re-split the pooled rows"
    )
    alpha: float = opt(0.3, "Dirichlet concentration for dirichlet and size_skew (small = skewed)", gt=0)
    by: str = opt("label", "dirichlet: skew the label, or this column's values")
    min_size: int = opt(20, "fewest training rows any platform may get", min=1)


@dataclass
class DataConfig:
    task: str = opt("recommendation", "task name (see `fl-llm tasks`)")
    template: str | None = opt(None, "prompt template with {field} slots (null: the task's own)")
    verbalizer: list[str] = opt([], "answer text per label, e.g. [' No', ' Yes'] (empty: the task's own)")
    source: Literal["synthetic", "files"] = opt("synthetic", "where each platform's data comes from")
    num_platforms: int = opt(3, "number of platforms (companies) in the federation", min=1)
    synthetic: SyntheticConfig = section(SyntheticConfig, "the seeded synthetic e-commerce world")
    files: FilesConfig = section(FilesConfig, "your own data files (data.source=files)")
    partition: PartitionConfig = section(PartitionConfig, "how pooled rows are split into platforms")


@dataclass
class ClientConfig:
    local_steps: int = opt(20, "optimizer steps each platform takes per round", min=1)
    batch_size: int = opt(16, "examples per local step", min=1)
    lr: float = opt(2e-3, "AdamW learning rate on the platform", gt=0)
    head_lr: float | None = opt(
        None,
        "learning rate of the trainable weights that are not LoRA factors — a classifier's head "
        "(model.kind=seq_cls), trained from scratch (null: client.lr); follows the same schedule",
        gt=0,
    )
    warmup_steps: int = opt(
        0, "linear learning-rate warm-up over the run's first N local steps, counted across rounds (0: none)", min=0
    )
    lr_schedule: Literal["constant", "cosine"] = opt(
        "cosine", "learning rate over the rounds: constant, or cosine decay from lr to lr/10 at the last round"
    )
    loss: Literal["lm", "verbalizer"] = opt(
        "lm",
        "causal LM only. lm: cross-entropy over the whole vocabulary at the answer tokens (the model learns to "
        "say the answer); verbalizer: over the task's answer words at the first answer token (a classifier read "
        "off the LM head, as in PET, Schick & Schuetze, EACL 2021), so every gradient goes to telling the answers "
        "apart, which holds up better under DP noise. eval_loss is the loss trained on",
    )
    optimizer: Literal["adamw", "sgd", "dp_adambc"] = opt(
        "adamw",
        "local optimizer (SCAFFOLD needs sgd). dp_adambc: AdamW with DP-SGD's known noise variance taken out "
        "of its second moment (DP-AdamBC, Tang et al., AAAI 2024), its moments kept from round to round on "
        "each platform (checkpointed: twice the trained weights' size per platform); for record-level DP "
        "(without it, plain AdamW)",
    )
    adambc_floor: float = opt(
        0.3, "dp_adambc: the smallest denominator, as a fraction κ of the noise std (1 = AdamW's there)", gt=0
    )
    weight_decay: float = opt(0.0, "AdamW weight decay", min=0)
    max_grad_norm: float = opt(1.0, "gradient clipping per step (0 = off)", min=0)
    eval_batch_size: int = opt(64, "examples per evaluation forward pass", min=1)
    device: Literal["auto", "cpu", "cuda"] = opt("auto", "'auto' uses a GPU when the actor has one")
    pack_length: int = opt(
        0,
        "pack each step's examples instead of padding them, no attention across examples (0 = pad to the "
        "batch's longest): one flat sequence with the default sdpa attention, rows of this many tokens with "
        "other attention implementations; at least model.max_length",
        min=0,
    )
    gradient_checkpointing: bool = opt(
        False, "recompute activations in the backward pass: less memory, ~30% more compute"
    )
    compile: bool = opt(
        False,
        "torch.compile each transformer block (fuses the norm, rotary and MLP element-wise work; the first "
        "steps pay the compilation, tens of seconds)",
    )
    state_dir: str = opt(
        "",
        "where each platform keeps its state between rounds (control variates, personal B, optimizer moments, "
        "error-feedback residual) and, under DP, the statistics it withholds from the driver; '{name}' becomes "
        "the platform's name, e.g. /data/{name}/fl_state (empty: RUN_DIR/platforms/{name}). The driver never "
        "reads it; on a cluster, a path on each platform's own node",
    )


@dataclass
class ServerConfig:
    rounds: int = opt(20, "federated rounds", min=1)
    platforms_per_round: int = opt(0, "platforms sampled per round (0 = all)", min=0)
    min_platforms: int = opt(1, "fewest valid updates that make a round (see too_few)", min=1)
    too_few: Literal["retry", "stop"] = opt(
        "retry", "fewer than min_platforms valid updates: retry the round (round_retries times, then stop) or stop"
    )
    round_retries: int = opt(2, "extra attempts at a round that got too few updates", min=0)
    round_timeout_s: float = opt(600.0, "updates not in by then are left out of the round", gt=0)
    max_failures: int = opt(
        3, "a platform that fails (crash, error, late, rejected update) this many rounds in a row is excluded", min=1
    )
    outlier_factor: float | None = opt(
        10.0,
        "refuse an update whose norm is more than this many times the median norm of the round's other updates "
        "and of the last rounds' accepted ones (null = off; not under client-level DP, whose clipping bounds "
        "every update, nor under secure aggregation, where each platform checks its own)",
        gt=1,
    )
    max_update_norm: float | None = opt(
        None, "reject an update whose L2 norm is larger (null = no bound; NaN/Inf and shapes are always checked)", gt=0
    )


@dataclass
class StrategyConfig:
    name: str = opt("fedavg", "aggregation strategy (see `fl-llm strategies`)")
    server_lr: float | None = opt(
        None, "server learning rate η (null = the strategy's default: 1 FedAvg-like, 0.1 adagrad, 0.01 adam/yogi)", gt=0
    )
    momentum: float = opt(0.9, "fedavgm: server momentum β", min=0, max=1)
    beta1: float = opt(
        0.9, "adaptive server optimizers (fedadagrad, fedadam, ...): first-moment decay β₁", min=0, max=1
    )
    beta2: float = opt(
        0.99, "adaptive server optimizers with a decaying second moment (fedadam, ...): its decay β₂", min=0, max=1
    )
    tau: float = opt(1e-3, "adaptive server optimizers: adaptivity τ, the floor of the step's denominator", gt=0)
    mu: float = opt(0.01, "fedprox: proximal weight μ (0 = FedAvg)", min=0)
    robust: Literal["none", "norm_bound", "median", "trimmed_mean", "krum"] = opt(
        "none", "how updates are combined before the server step: weighted mean, or a robust rule"
    )
    clip_norm: float = opt(1.0, "norm_bound: largest L2 norm an update keeps", gt=0)
    trim_fraction: float = opt(0.1, "trimmed_mean: fraction dropped at each end per coordinate", min=0, max=0.49)
    krum_byzantine: int = opt(1, "krum: number f of bad updates to tolerate (needs cohort > 2f + 2)", min=0)
    krum_select: int = opt(0, "krum: m updates averaged (1 = Krum, 0 = cohort - f: Multi-Krum)", min=0)


@dataclass
class PlatformPlacement:
    platform: int = opt(0, "platform index", min=0)
    resources: dict[str, float] = opt(
        {}, "custom Ray resources its actor needs, e.g. {fashion-node: 1} for a node started with that resource"
    )
    labels: dict[str, str] = opt({}, "node labels its actor must run on (Ray label selector), e.g. {site: fashion}")


@dataclass
class RayConfig:
    address: str | None = opt(None, "null starts a local Ray instance; 'auto' or 'ray://host:port' joins a cluster")
    num_cpus: int | None = opt(None, "CPUs of the local instance (null = all of this machine)", min=1)
    cpus_per_platform: float | None = opt(
        None, "CPUs reserved per platform actor (null = share the cluster's CPUs evenly, at most 1)", gt=0
    )
    gpus_per_platform: float | None = opt(
        None, "GPUs per platform actor (null = share the cluster's GPUs evenly, 0 if it has none)", min=0
    )
    placement: list[PlatformPlacement] = opt(
        [],
        "[{platform, resources, labels}]: pin a platform's actor to the node that holds its data; a platform "
        "whose node is absent stops the run at start",
    )
    platforms_per_gpu: int = opt(
        1,
        "platforms per host actor, which holds the base model once (one GPU each where there are GPUs) and "
        "trains its platforms' own adapters in turn; 1 = one actor per platform",
        min=1,
    )


@dataclass
class CompressionConfig:
    name: Literal["none", "fp16", "bf16", "int8", "int4", "topk"] = opt(
        "none",
        "how platforms send their update: none (float32), fp16/bf16 casts, int8/int4 stochastic quantization "
        "with a scale per 256 values, topk with error feedback; under secure aggregation int8/int4 narrow the "
        "masked ring instead (16 / 8 bits per value)",
    )
    topk_fraction: float = opt(0.01, "topk: share of the values sent each round (the rest carries over)", gt=0, max=1)


@dataclass
class CheckpointConfig:
    every: int = opt(1, "write a full-state checkpoint every this many rounds (0 = never)", min=0)
    keep: int = opt(2, "how many of the newest checkpoints to keep", min=1)


@dataclass
class PlatformRound:
    platform: int = opt(0, "platform index", min=0)
    round: int = opt(1, "round in which the fault strikes (mid-training)", min=1)


@dataclass
class DelayFault:
    platform: int = opt(0, "platform index", min=0)
    seconds: float = opt(1.0, "how long it sleeps before training", min=0)
    rounds: list[int] = opt([], "rounds in which it sleeps (empty = every round)")


@dataclass
class CorruptFault:
    platform: int = opt(0, "platform index", min=0)
    rounds: list[int] = opt([], "rounds in which its update is corrupted (empty = every round)")
    kind: Literal["nan", "inf", "shape", "keys", "scale", "noise"] = opt(
        "nan",
        "nan / inf values, a wrong shape, a wrong key set, the update times factor, or noise of factor x its norm",
    )
    factor: float = opt(100.0, "scale and noise: how much larger than the honest update", gt=0)


@dataclass
class FaultsConfig:
    """Fault injection, for rehearsing failures: never set in production."""

    kill: list[PlatformRound] = opt([], "[{platform, round}]: the platform's actor process exits mid-training")
    error: list[PlatformRound] = opt([], "[{platform, round}]: the platform's training raises an exception")
    delay: list[DelayFault] = opt([], "[{platform, seconds, rounds}]: the platform sleeps before training")
    corrupt: list[CorruptFault] = opt(
        [], "[{platform, rounds, kind, factor}]: the platform sends a corrupted (or malicious) update"
    )


@dataclass
class DpConfig:
    level: Literal["none", "record", "client"] = opt(
        "none",
        "none; record: DP-SGD inside each platform (protects each customer record); "
        "client: DP-FedAvg on the driver (protects each platform's whole data set)",
    )
    noise_multiplier: float | None = opt(
        None, "noise std / clip norm, z (null = calibrated from privacy.target_epsilon before training)", min=0
    )
    clip_norm: float = opt(1.0, "record: per-example gradient norm bound C; client: update norm bound C", gt=0)
    adaptive_clip: bool = opt(False, "client: adapt C toward a quantile of the update norms (Andrew et al. 2021)")
    target_quantile: float = opt(0.5, "adaptive_clip: the quantile γ of update norms C tracks", gt=0, max=1)
    clip_lr: float = opt(0.2, "adaptive_clip: geometric step η_C", gt=0)
    accountant: Literal["pld", "rdp"] = opt("pld", "primary accountant (the other one is reported as a cross-check)")
    secure_rng: bool = opt(
        True,
        "draw DP noise and Poisson sampling from the OS entropy pool (false: from the run seed, reproducible "
        "but anyone who knows the seed can subtract the noise; for experiments only)",
    )


@dataclass
class SecAggConfig:
    enabled: bool = opt(
        False, "secure aggregation (Bonawitz et al. 2017): the driver learns only the sum of the updates"
    )
    threshold: int | None = opt(
        None,
        "t of the t-of-n secret sharing: the sum is recovered while at least t platforms of the round "
        "survive, and fewer than t colluding parties learn nothing (null: a majority of the round, at least 2)",
        min=2,
    )
    max_clipped: float = opt(
        0.01,
        "a platform refuses to send an update with a larger share of values beyond ±clip_range (or any NaN/Inf): "
        "it fails the round instead of corrupting the sum",
        gt=0,
        max=1,
    )
    clip_range: float = opt(
        0.1,
        "each (weighted) update value is clipped to ±this before fixed-point quantization; the share clipped "
        "is logged as secagg_clipped (raise it if that is not ~0)",
        gt=0,
    )


@dataclass
class PrivacyConfig:
    dp: DpConfig = section(DpConfig, "differential privacy")
    secagg: SecAggConfig = section(SecAggConfig, "secure aggregation")
    target_epsilon: float | None = opt(
        None,
        "privacy budget ε: calibrates the noise (dp.noise_multiplier null) or stops the run before it is passed",
        gt=0,
    )
    delta: float = opt(1e-5, "δ of the (ε, δ) guarantee (well below 1 / number of records)", gt=0, max=0.1)


@dataclass
class TrackingConfig:
    progress: bool = opt(True, "live progress display on a terminal")
    mlflow: bool = opt(False, "log params, metrics per round and artifacts to MLflow (metrics.jsonl is always written)")
    mlflow_uri: str | None = opt(None, "MLflow tracking URI (null = a local file store, ./mlruns)")
    mlflow_experiment: str = opt("fl_llm", "MLflow experiment name")
    tensorboard: bool = opt(False, "write TensorBoard event files to RUN_DIR/tensorboard")


@dataclass
class RunConfig:
    name: str = opt("default", "run name; the run dir is <output_dir or runs/<name>-<timestamp>>")
    seed: int = opt(0, "seed of every random draw (data, model init, sampling)", min=0)
    output_dir: str | None = opt(None, "run directory (null = runs/<name>-<timestamp>)")
    backend: Literal["ray", "local"] = opt("ray", "'ray' (one actor per platform) or 'local' (in-process)")
    model: ModelConfig = section(ModelConfig, "base model and LoRA")
    data: DataConfig = section(DataConfig, "task and data")
    client: ClientConfig = section(ClientConfig, "local training on each platform")
    server: ServerConfig = section(ServerConfig, "the round loop")
    strategy: StrategyConfig = section(StrategyConfig, "aggregation")
    privacy: PrivacyConfig = section(PrivacyConfig, "differential privacy and its budget, secure aggregation")
    compression: CompressionConfig = section(CompressionConfig, "compressed updates on the uplink")
    ray: RayConfig = section(RayConfig, "the Ray cluster")
    checkpoint: CheckpointConfig = section(CheckpointConfig, "full-state checkpoints for --resume")
    faults: FaultsConfig = section(FaultsConfig, "fault injection for testing (never in production)")
    tracking: TrackingConfig = section(TrackingConfig, "logging")


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

    cfg = _build(RunConfig, with_recipe(data), "")
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


def describe(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, help) for every option, for `fl-llm run --help`."""
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
