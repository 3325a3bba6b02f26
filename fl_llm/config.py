"""Typed run configuration: YAML files plus `key=value` overrides, validated at load.

Every option a user can set lives here, with its type, its allowed range and a line of help
(`fl-llm run --help` prints them all). Loading never half-succeeds: an unknown key or a bad value
raises `UserError` naming the dotted key and what is allowed, before anything runs. The schema is
here and in `config_sections.py` (the operational sections); loading (validated by pydantic),
overrides and the encoder recipe are in `config_load.py`, whose functions this module re-exports (`fl_llm.config.load`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fl_llm.config_sections import (
    CheckpointConfig,
    CompressionConfig,
    EvalConfig,
    FaultsConfig,
    FederationConfig,
    PersonaliseConfig,
    PrivacyConfig,
    RayConfig,
    ServeConfig,
    TrackingConfig,
    opt,
    section,
)


@dataclass
class TinyModelConfig:
    hidden_size: int = opt(128, "width of the built-in tiny Llama", ge=8)
    num_layers: int = opt(2, "transformer blocks", ge=1)
    num_heads: int = opt(4, "attention heads (must divide hidden_size)", ge=1)
    num_kv_heads: int | None = opt(None, "key/value heads for grouped-query attention (null = num_heads)", ge=1)
    intermediate_size: int = opt(256, "MLP width", ge=8)
    vocab_size: int | None = opt(
        None, "embedding rows (null = the built-in tokenizer's 8192; more only adds unused rows)", ge=8192
    )
    max_positions: int = opt(512, "longest sequence the model accepts", ge=16)


@dataclass
class LoraSettings:
    r: int = opt(8, "LoRA rank", ge=1)
    alpha: float = opt(16.0, "LoRA scaling numerator: scale = alpha / r", gt=0)
    dropout: float = opt(0.0, "dropout on the LoRA input", ge=0, le=1)
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
    max_length: int = opt(256, "longest tokenized example; longer prompts are cut from the left", ge=8)
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
    eval_examples: int = opt(300, "held-out evaluation examples per platform", ge=10)
    history_liked: int = opt(3, "liked items shown per prompt", ge=1, le=20)
    history_disliked: int = opt(2, "disliked items shown per prompt", ge=0, le=20)
    world_seed: int | None = opt(
        None,
        "seed of the synthetic world (catalog, platforms' customers); null = the run seed. Another value "
        "keeps the model's init and draws other data: e.g. public data for a warm start (model.init_adapter)",
        ge=0,
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
        le=0.9,
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
        ge=1,
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
    min_size: int = opt(20, "fewest training rows any platform may get", ge=1)


@dataclass
class DataConfig:
    task: str = opt("recommendation", "task name (see `fl-llm tasks`)")
    template: str | None = opt(None, "prompt template with {field} slots (null: the task's own)")
    verbalizer: list[str] = opt([], "answer text per label, e.g. [' No', ' Yes'] (empty: the task's own)")
    source: Literal["synthetic", "files"] = opt("synthetic", "where each platform's data comes from")
    num_platforms: int = opt(3, "number of platforms (companies) in the federation", ge=1)
    synthetic: SyntheticConfig = section(SyntheticConfig, "the seeded synthetic e-commerce world")
    files: FilesConfig = section(FilesConfig, "your own data files (data.source=files)")
    partition: PartitionConfig = section(PartitionConfig, "how pooled rows are split into platforms")


@dataclass
class ClientConfig:
    local_steps: int = opt(20, "optimizer steps each platform takes per round", ge=1)
    batch_size: int = opt(16, "examples per local step", ge=1)
    lr: float = opt(2e-3, "AdamW learning rate on the platform", gt=0)
    head_lr: float | None = opt(
        None,
        "learning rate of the trainable weights that are not LoRA factors — a classifier's head "
        "(model.kind=seq_cls), trained from scratch (null: client.lr); follows the same schedule",
        gt=0,
    )
    warmup_steps: int = opt(
        0, "linear learning-rate warm-up over the run's first N local steps, counted across rounds (0: none)", ge=0
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
    weight_decay: float = opt(0.0, "AdamW weight decay", ge=0)
    max_grad_norm: float = opt(1.0, "gradient clipping per step (0 = off)", ge=0)
    eval_batch_size: int = opt(64, "examples per evaluation forward pass", ge=1)
    device: Literal["auto", "cpu", "cuda"] = opt("auto", "'auto' uses a GPU when the actor has one")
    pack_length: int = opt(
        0,
        "pack each step's examples instead of padding them, no attention across examples (0 = pad to the "
        "batch's longest): one flat sequence with the default sdpa attention, rows of this many tokens with "
        "other attention implementations; at least model.max_length",
        ge=0,
    )
    parallel: Literal["ddp", "fsdp"] = opt(
        "ddp",
        "how a platform's workers (ray.workers_per_platform > 1) share its training: ddp (a whole base per "
        "worker, the adapter's gradients summed over them: throughput) or fsdp (FSDP2's fully_shard: the base "
        "and the adapter sharded over the workers, for a base that does not fit one GPU)",
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
    rounds: int = opt(20, "federated rounds", ge=1)
    platforms_per_round: int = opt(0, "platforms sampled per round (0 = all)", ge=0)
    min_platforms: int = opt(1, "fewest valid updates that make a round (see too_few)", ge=1)
    too_few: Literal["retry", "stop"] = opt(
        "retry", "fewer than min_platforms valid updates: retry the round (round_retries times, then stop) or stop"
    )
    round_retries: int = opt(2, "extra attempts at a round that got too few updates", ge=0)
    round_timeout_s: float = opt(600.0, "updates not in by then are left out of the round", gt=0)
    max_failures: int = opt(
        3, "a platform that fails (crash, error, late, rejected update) this many rounds in a row is excluded", ge=1
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
    momentum: float = opt(0.9, "fedavgm: server momentum β", ge=0, le=1)
    beta1: float = opt(0.9, "adaptive server optimizers (fedadagrad, fedadam, ...): first-moment decay β₁", ge=0, le=1)
    beta2: float = opt(
        0.99, "adaptive server optimizers with a decaying second moment (fedadam, ...): its decay β₂", ge=0, le=1
    )
    tau: float = opt(1e-3, "adaptive server optimizers: adaptivity τ, the floor of the step's denominator", gt=0)
    mu: float = opt(0.01, "fedprox: proximal weight μ (0 = FedAvg)", ge=0)
    robust: Literal["none", "norm_bound", "median", "trimmed_mean", "krum"] = opt(
        "none", "how updates are combined before the server step: weighted mean, or a robust rule"
    )
    clip_norm: float = opt(1.0, "norm_bound: largest L2 norm an update keeps", gt=0)
    trim_fraction: float = opt(0.1, "trimmed_mean: fraction dropped at each end per coordinate", ge=0, le=0.49)
    krum_byzantine: int = opt(1, "krum: number f of bad updates to tolerate (needs cohort > 2f + 2)", ge=0)
    krum_select: int = opt(0, "krum: m updates averaged (1 = Krum, 0 = cohort - f: Multi-Krum)", ge=0)


@dataclass
class RunConfig:
    name: str = opt("default", "run name; the run dir is <output_dir or runs/<name>-<timestamp>>")
    seed: int = opt(0, "seed of every random draw (data, model init, sampling)", ge=0)
    output_dir: str | None = opt(None, "run directory (null = runs/<name>-<timestamp>)")
    backend: Literal["ray", "local"] = opt("ray", "'ray' (one actor per platform) or 'local' (in-process)")
    model: ModelConfig = section(ModelConfig, "base model and LoRA")
    data: DataConfig = section(DataConfig, "task and data")
    client: ClientConfig = section(ClientConfig, "local training on each platform")
    server: ServerConfig = section(ServerConfig, "the round loop")
    strategy: StrategyConfig = section(StrategyConfig, "aggregation")
    eval: EvalConfig = section(EvalConfig, "evaluation by generation (instruction task)")
    personalise: PersonaliseConfig = section(
        PersonaliseConfig, "each platform's own adapter after a run: fl-llm personalise, compare's personalised arm"
    )
    privacy: PrivacyConfig = section(PrivacyConfig, "differential privacy and its budget, secure aggregation")
    compression: CompressionConfig = section(CompressionConfig, "compressed updates on the uplink")
    ray: RayConfig = section(RayConfig, "the Ray cluster")
    checkpoint: CheckpointConfig = section(CheckpointConfig, "full-state checkpoints for --resume")
    faults: FaultsConfig = section(FaultsConfig, "fault injection for testing (never in production)")
    tracking: TrackingConfig = section(TrackingConfig, "logging")
    federation: FederationConfig = section(
        FederationConfig,
        "a federation of organisations: remote platform services, mutual TLS (coordinator and service)",
    )
    serve: ServeConfig = section(ServeConfig, "`fl-llm serve`: this organisation's platform service and its policy")

    @property
    def backend_in_use(self) -> str:
        """Where the platforms run: 'remote' (other organisations' services) or `backend`."""
        return "remote" if self.federation.platforms else self.backend


# The loading API, re-exported so that `fl_llm.config.load` is where users find it.
from fl_llm.config_load import (  # noqa: E402
    ENCODER_RECIPE,
    WHERE_NOT_WHAT,
    describe,
    differences,
    from_dict,
    key_in,
    load,
    parse_override,
    read_yaml,
    recipe_line,
    to_dict,
    with_recipe,
)

__all__ = [
    "ENCODER_RECIPE",
    "WHERE_NOT_WHAT",
    "FaultsConfig",
    "RunConfig",
    "describe",
    "differences",
    "from_dict",
    "key_in",
    "load",
    "parse_override",
    "read_yaml",
    "recipe_line",
    "to_dict",
    "with_recipe",
]
