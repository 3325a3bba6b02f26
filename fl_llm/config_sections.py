"""The run configuration's operational sections: where platforms run (Ray), evaluation by
generation, personalisation after a run, uplink compression, checkpoints, fault injection,
privacy (DP and secure aggregation) and tracking — and `opt`, `section`, the helpers every config
field is declared with. `fl_llm.config` holds the rest of the schema and `RunConfig`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


def opt(default: Any, help: str, **rules: Any) -> Any:
    """A config field: default, one line of help, and optional bounds (ge, le, gt) pydantic enforces."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **rules})
    return field(default=default, metadata={"help": help, **rules})


def section(cls: type, help: str) -> Any:
    return field(default_factory=cls, metadata={"help": help})


@dataclass
class PlatformPlacement:
    platform: int = opt(0, "platform index", ge=0)
    resources: dict[str, float] = opt(
        {}, "custom Ray resources its actor needs, e.g. {fashion-node: 1} for a node started with that resource"
    )
    labels: dict[str, str] = opt({}, "node labels its actor must run on (Ray label selector), e.g. {site: fashion}")


@dataclass
class RayConfig:
    address: str | None = opt(None, "null starts a local Ray instance; 'auto' or 'ray://host:port' joins a cluster")
    num_cpus: int | None = opt(None, "CPUs of the local instance (null = all of this machine)", ge=1)
    cpus_per_platform: float | None = opt(
        None, "CPUs reserved per platform actor (null = share the cluster's CPUs evenly, at most 1)", gt=0
    )
    gpus_per_platform: float | None = opt(
        None, "GPUs per platform actor (null = share the cluster's GPUs evenly, 0 if it has none)", ge=0
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
        ge=1,
    )
    workers_per_platform: int = opt(
        1,
        "Ray workers per platform, in one placement group on the platform's own nodes, training it together "
        "with torch.distributed (client.parallel; NCCL on GPUs, gloo on CPUs): each step's batch is split "
        "over them and the driver still sees one platform",
        ge=1,
    )
    cpus_per_worker: float | None = opt(
        None,
        "CPUs per worker of a platform (null: ray.cpus_per_platform / workers, else an even share, at most 1)",
        gt=0,
    )
    gpus_per_worker: float | None = opt(
        None,
        "GPUs per worker of a platform (null: ray.gpus_per_platform / workers, else an even share, at most 1)",
        ge=0,
    )


@dataclass
class CompressionConfig:
    name: Literal["none", "fp16", "bf16", "int8", "int4", "topk"] = opt(
        "none",
        "how platforms send their update: none (float32), fp16/bf16 casts, int8/int4 stochastic quantization "
        "with a scale per 256 values, topk with error feedback; under secure aggregation int8/int4 narrow the "
        "masked ring instead (16 / 8 bits per value)",
    )
    topk_fraction: float = opt(0.01, "topk: share of the values sent each round (the rest carries over)", gt=0, le=1)


@dataclass
class EvalConfig:
    generate_every: int = opt(
        5,
        "instruction task: generate answers for the held-out prompts every N rounds and at the last (0: last only)",
        ge=0,
    )
    generate_examples: int = opt(
        100, "held-out prompts each platform answers by generation (its first N; 0: all)", ge=0
    )
    max_new_tokens: int = opt(48, "longest generated answer, in tokens", ge=1)
    do_sample: bool = opt(False, "sample instead of greedy decoding (seeded by the run seed and platform)")
    temperature: float = opt(1.0, "do_sample: softmax temperature", gt=0)
    top_p: float = opt(1.0, "do_sample: nucleus sampling's probability mass", gt=0, le=1)
    samples: int = opt(
        3,
        "sample generations (prompt, reference, answer) per platform written to RUN_DIR/samples.jsonl each time "
        "it generates (0: none); under record-level DP only where samples_under_dp (they quote private prompts)",
        ge=0,
    )
    samples_under_dp: bool = opt(
        False,
        "the platform allows sample generations under record-level DP (a platform service decides with its "
        "own config): its held-out prompts and the answers leave it un-noised",
    )
    choices: list[str] = opt(
        [],
        "instruction task: answers also scored by probability, e.g. ['No.', 'Yes.'] — the first token of each at "
        "the answer's start; reports choice_accuracy and, for two, the AUC of the second (as a yes/no task)",
    )


@dataclass
class PersonaliseConfig:
    schedule: Literal["fresh", "continue"] = opt(
        "fresh",
        "personal rounds' learning rate (fl-llm personalise, compare's personalised arm): fresh, the schedule's "
        "first rounds as a new local run starts them; continue, past the schedule's end at its final rate",
    )
    anchor: float = opt(
        0.0, "personal rounds also minimise (anchor/2)·||v - w||², w the global adapter (Ditto; 0: none)", ge=0
    )


@dataclass
class CheckpointConfig:
    every: int = opt(1, "write a full-state checkpoint every this many rounds (0 = never)", ge=0)
    keep: int = opt(2, "how many of the newest checkpoints to keep", ge=1)


@dataclass
class PlatformRound:
    platform: int = opt(0, "platform index", ge=0)
    round: int = opt(1, "round in which the fault strikes (mid-training)", ge=1)
    worker: int = opt(0, "which of the platform's workers it strikes (ray.workers_per_platform; 0: the first)", ge=0)


@dataclass
class DelayFault:
    platform: int = opt(0, "platform index", ge=0)
    seconds: float = opt(1.0, "how long it sleeps before training", ge=0)
    rounds: list[int] = opt([], "rounds in which it sleeps (empty = every round)")


@dataclass
class CorruptFault:
    platform: int = opt(0, "platform index", ge=0)
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
        None, "noise std / clip norm, z (null = calibrated from privacy.target_epsilon before training)", ge=0
    )
    clip_norm: float = opt(1.0, "record: per-example gradient norm bound C; client: update norm bound C", gt=0)
    adaptive_clip: bool = opt(False, "client: adapt C toward a quantile of the update norms (Andrew et al. 2021)")
    target_quantile: float = opt(0.5, "adaptive_clip: the quantile γ of update norms C tracks", gt=0, le=1)
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
        ge=2,
    )
    max_clipped: float = opt(
        0.01,
        "a platform refuses to send an update with a larger share of values beyond ±clip_range (or any NaN/Inf): "
        "it fails the round instead of corrupting the sum",
        gt=0,
        le=1,
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
    delta: float = opt(1e-5, "δ of the (ε, δ) guarantee (well below 1 / number of records)", gt=0, le=0.1)


@dataclass
class TrackingConfig:
    progress: bool = opt(True, "live progress display on a terminal")
    mlflow: bool = opt(False, "log params, metrics per round and artifacts to MLflow (metrics.jsonl is always written)")
    mlflow_uri: str | None = opt(None, "MLflow tracking URI (null = a local file store, ./mlruns)")
    mlflow_experiment: str = opt("fl_llm", "MLflow experiment name")
    tensorboard: bool = opt(False, "write TensorBoard event files to RUN_DIR/tensorboard")


@dataclass
class RemotePlatform:
    name: str = opt("", "the platform's name in the federation file (the name its certificate carries)")
    address: str = opt("", "host:port where its `fl-llm serve` listens")


@dataclass
class FederationConfig:
    platforms: list[RemotePlatform] = opt(
        [],
        "[{name, address}]: drive these platform services (`fl-llm serve`, one per organisation) over mutual TLS, "
        "in the federation file's order; empty = platforms of this run's own (backend)",
    )
    bundle: str | None = opt(None, "this party's start-up kit from `fl-llm provision` (ca.pem, cert.pem, key.pem, ...)")
    connect_timeout_s: float = opt(60.0, "how long the coordinator waits for a platform service to answer", gt=0)
    max_message_mb: float = opt(256.0, "largest message (a streamed adapter included) either side accepts", gt=0)


@dataclass
class PolicyConfig:
    require: list[Literal["record_dp", "client_dp", "secagg"]] = opt(
        [], "what every job must use: record_dp, client_dp, secagg (all listed are required)"
    )
    max_epsilon: float | None = opt(
        None,
        "the most record-level ε (at max_delta) this platform's data may spend, over every job in its ledger; "
        "a job whose plan would pass it is refused (null = no cap)",
        gt=0,
    )
    max_delta: float = opt(1e-5, "with max_epsilon: the largest δ a job may use", gt=0, le=0.1)
    strategies: list[str] = opt([], "strategy.name values it accepts (empty: any)")
    metrics: list[str] = opt([], "metrics it reports besides eval_loss and num_eval (empty: all)")
    max_rounds: int | None = opt(None, "the most rounds a job may ask of it", ge=1)


@dataclass
class ServeConfig:
    listen: str = opt("127.0.0.1:7443", "host:port `fl-llm serve` listens on (mutual TLS only)")
    data_index: int | None = opt(
        None,
        "which platform of data.* this service loads, e.g. 0 when data.* describes this company's data alone "
        "(null: its position in the federation file)",
        ge=0,
    )
    backend: Literal["local", "ray"] = opt(
        "local", "run the platform in the service's process, or as an actor on this organisation's Ray (ray.*)"
    )
    threads: int | None = opt(
        None, "torch CPU threads of the platform (null: torch's default, every core of this machine)", ge=1
    )
    policy: PolicyConfig = section(PolicyConfig, "what this platform releases and to which jobs")
