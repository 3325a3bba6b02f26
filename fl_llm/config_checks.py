"""The checks of a run configuration that span several keys (fl_llm.config validates each key
alone: type, range, allowed values). Called by `fl_llm.config.from_dict`, so no config that
fails them ever reaches the driver or a platform.
"""

from __future__ import annotations

from pathlib import Path

from fl_llm.config import RunConfig
from fl_llm.errors import UserError


def check_cross_fields(cfg: RunConfig) -> None:
    """What one key alone cannot say: settings that must agree with each other, and with the
    task, strategy and privacy registries. Raises UserError naming the keys."""
    tiny = cfg.model.tiny
    if tiny.hidden_size % tiny.num_heads:
        raise UserError(
            f"config key 'model.tiny.num_heads' must divide model.tiny.hidden_size "
            f"({tiny.hidden_size}), got {tiny.num_heads}"
        )
    if tiny.num_kv_heads and tiny.num_heads % tiny.num_kv_heads:
        raise UserError(
            f"config key 'model.tiny.num_kv_heads' must divide model.tiny.num_heads ({tiny.num_heads}), "
            f"got {tiny.num_kv_heads}"
        )
    n = cfg.data.num_platforms
    sizes = cfg.data.synthetic.train_examples
    if cfg.data.source == "synthetic" and len(sizes) not in (1, n):
        raise UserError(
            f"config key 'data.synthetic.train_examples' must hold 1 or data.num_platforms ({n}) "
            f"numbers, got {len(sizes)}"
        )
    if any(s < 1 for s in sizes):
        raise UserError(f"config key 'data.synthetic.train_examples' must be >= 1 each, got {sizes}")
    files = cfg.data.files
    if cfg.data.source == "files":
        if not files.paths:
            raise UserError("config key 'data.files.paths' must list at least one file when data.source=files")
        if files.eval_paths and len(files.eval_paths) != len(files.paths):
            raise UserError(
                f"config key 'data.files.eval_paths' must match data.files.paths one to one "
                f"({len(files.paths)} files), got {len(files.eval_paths)}"
            )
        if cfg.data.partition.method == "natural" and not files.split_by and len(files.paths) != n:
            raise UserError(
                f"config key 'data.files.paths' lists {len(files.paths)} files but data.num_platforms is {n}; "
                "give one file per platform, or set data.files.split_by or data.partition.method"
            )
        if cfg.data.partition.method == "natural" and not files.split_by:
            stems = [Path(p).name.split(".")[0] for p in files.paths]
            twice = sorted({s for s in stems if stems.count(s) > 1})
            if twice:
                clash = [p for p in files.paths if Path(p).name.split(".")[0] == twice[0]]
                raise UserError(
                    f"config key 'data.files.paths': {', '.join(map(repr, clash))} would both be platform "
                    f"{twice[0]!r} (a platform is named after its file, up to the first dot); every platform "
                    "needs its own name: rename a file"
                )
        if files.split_values and len(files.split_values) != n:
            raise UserError(
                f"config key 'data.files.split_values' must hold data.num_platforms ({n}) values, "
                f"got {len(files.split_values)}"
            )
    if cfg.server.platforms_per_round > n:
        raise UserError(
            f"config key 'server.platforms_per_round' must be <= data.num_platforms ({n}), "
            f"got {cfg.server.platforms_per_round}"
        )
    cohort = cfg.server.platforms_per_round or n
    if cfg.server.min_platforms > cohort:
        raise UserError(
            f"config key 'server.min_platforms' must be <= the platforms per round ({cohort}), "
            f"got {cfg.server.min_platforms}"
        )
    faults = cfg.faults
    for kind in ("kill", "error", "delay", "corrupt"):
        for j, fault in enumerate(getattr(faults, kind)):
            if fault.platform >= n:
                raise UserError(
                    f"config key 'faults.{kind}[{j}].platform' must be a platform index below "
                    f"data.num_platforms ({n}), got {fault.platform}"
                )
    if cfg.model.quantization != "none" and cfg.model.name_or_path == "tiny":
        raise UserError(
            "config key 'model.quantization' needs pretrained weights to quantize (model.name_or_path: a local "
            "directory or hub id); the built-in model is made in code"
        )
    if not cfg.model.lora.target_modules:
        raise UserError("config key 'model.lora.target_modules' must name at least one module")
    extra = [m for m in cfg.model.lora.trainable_modules if m not in cfg.model.lora.target_modules]
    if extra and cfg.model.lora.target_modules != ["all-linear"]:
        raise UserError(
            f"config key 'model.lora.trainable_modules' must name modules of model.lora.target_modules "
            f"({', '.join(cfg.model.lora.target_modules)}); got {', '.join(extra)}"
        )
    # Registries are imported lazily: they import torch-free modules only.
    from fl_llm.data.tasks import TASKS
    from fl_llm.strategies import STRATEGIES

    if cfg.data.task not in TASKS:
        raise UserError(f"config key 'data.task' must be one of {', '.join(TASKS)}, got {cfg.data.task!r}")
    if cfg.data.verbalizer and len(set(cfg.data.verbalizer)) != len(cfg.data.verbalizer):
        raise UserError(f"config key 'data.verbalizer' must hold distinct answers, got {cfg.data.verbalizer}")
    if cfg.data.template is not None:
        import string

        try:
            list(string.Formatter().parse(cfg.data.template))
        except ValueError as e:
            raise UserError(f"config key 'data.template' is not a valid template: {e}") from None
    if cfg.strategy.name not in STRATEGIES:
        raise UserError(f"config key 'strategy.name' must be one of {', '.join(STRATEGIES)}, got {cfg.strategy.name!r}")
    strategy = STRATEGIES[cfg.strategy.name]
    _check_strategy(cfg, strategy, cohort)
    _check_privacy(cfg, strategy, cohort)
    _check_secagg(cfg, strategy, cohort)
    _check_packing(cfg)
    _check_hosts(cfg, strategy)
    _check_workers(cfg)
    _check_federation(cfg)
    if cfg.client.loss == "verbalizer" and cfg.model.kind != "causal_lm":
        raise UserError(
            "config key 'client.loss' must be lm with model.kind=seq_cls: a classifier's loss is already over "
            "its classes (verbalizer reads the answer words off a causal LM's head)"
        )
    _check_instruction(cfg)


def _check_instruction(cfg: RunConfig) -> None:
    """The generative task trains a causal LM on whole answers; the classification settings do
    not apply to it, and its own settings apply to nothing else."""
    from fl_llm.data.tasks import TASKS

    if not TASKS[cfg.data.task].generative:
        if cfg.eval.choices:
            raise UserError(
                "config key 'eval.choices' applies to data.task=instruction (a yes/no task scores its verbalizer)"
            )
        return
    what = {
        "model.kind": cfg.model.kind != "causal_lm" and "causal_lm (an answer is generated)",
        "client.loss": cfg.client.loss != "lm" and "lm (every answer token is trained)",
        "data.template": cfg.data.template is not None and "unset (a conversation is rendered with the chat template)",
        "data.verbalizer": bool(cfg.data.verbalizer) and "unset (answers are free text; see eval.choices)",
    }
    for key, need in what.items():
        if need:
            raise UserError(f"config key {key!r} must be {need} with data.task=instruction")
    if cfg.eval.choices and len(set(cfg.eval.choices)) != len(cfg.eval.choices):
        raise UserError(f"config key 'eval.choices' must hold distinct answers, got {cfg.eval.choices}")


def _check_hosts(cfg: RunConfig, strategy) -> None:
    n = cfg.data.num_platforms
    for j, pin in enumerate(cfg.ray.placement):
        if pin.platform >= n:
            raise UserError(
                f"config key 'ray.placement[{j}].platform' must be a platform index below data.num_platforms "
                f"({n}), got {pin.platform}"
            )
        if any(v <= 0 for v in pin.resources.values()):
            raise UserError(f"config key 'ray.placement[{j}].resources' amounts must be > 0, got {pin.resources}")
    if cfg.ray.platforms_per_gpu <= 1:
        return
    if cfg.ray.placement:
        raise UserError(
            "config key 'ray.placement' needs ray.platforms_per_gpu=1: a host actor holds several platforms, "
            "so it cannot sit on each one's own node"
        )
    why = strategy.shared_host_conflict()
    if why is None and cfg.privacy.dp.level == "record":
        why = "privacy.dp.level=record wraps each platform's model for per-example gradients"
    if why:
        raise UserError(f"config key 'ray.platforms_per_gpu' must be 1 here: {why}")


def _check_workers(cfg: RunConfig) -> None:
    """A platform of several workers (ray.workers_per_platform): what it trains with and where."""
    w = cfg.ray.workers_per_platform
    if w <= 1:
        return
    key = "config key 'ray.workers_per_platform'"
    if cfg.backend_in_use != "ray":
        raise UserError(f"{key} > 1 needs backend=ray: Ray places a platform's workers (got {cfg.backend_in_use})")
    if cfg.ray.platforms_per_gpu > 1:
        raise UserError(f"{key} > 1 needs ray.platforms_per_gpu=1: a host actor shares one base among platforms")
    if cfg.client.batch_size < w:
        raise UserError(
            f"{key} ({w}) must not exceed client.batch_size ({cfg.client.batch_size}): each step's batch is split over the workers"
        )
    if cfg.client.parallel == "fsdp":
        if cfg.privacy.dp.level == "record":
            raise UserError(
                "config key 'client.parallel' must be ddp with privacy.dp.level=record: per-example gradients "
                "(Opacus) need each worker to hold whole adapter weights"
            )
        if cfg.model.quantization != "none":
            raise UserError("config key 'client.parallel' must be ddp with model.quantization=4bit (QLoRA with DDP)")
        if cfg.client.compile:
            raise UserError("config key 'client.compile' must be false with client.parallel=fsdp")


def _check_packing(cfg: RunConfig) -> None:
    c = cfg.client
    if not c.pack_length:
        return
    if cfg.model.kind != "causal_lm":
        raise UserError("config key 'client.pack_length' needs model.kind=causal_lm (a classifier is not packed)")
    if cfg.privacy.dp.level == "record":
        raise UserError(
            "config key 'client.pack_length' must be 0 with privacy.dp.level=record: DP-SGD clips each example's "
            "gradient, and a packed row mixes several examples"
        )
    if c.pack_length < cfg.model.max_length:
        raise UserError(
            f"config key 'client.pack_length' must be at least model.max_length ({cfg.model.max_length}), "
            f"got {c.pack_length}: every example has to fit one row"
        )


def _refuse_individual(cfg: RunConfig, strategy, setting: str, because: str) -> None:
    """`setting` hides individual updates: refuse strategies that need them."""
    if strategy.needs_individual_updates(cfg.strategy.robust):
        robust = f" strategy.robust={cfg.strategy.robust}" if cfg.strategy.robust != "none" else ""
        raise UserError(
            f"{setting} cannot run with strategy.name={strategy.name}{robust}: {because}, and this strategy "
            "needs each platform's update (or control variate) in the clear; use a FedAvg-family, fedprox, "
            "fedit, ffa or fedsa strategy"
        )


def _check_secagg(cfg: RunConfig, strategy, cohort: int) -> None:
    sa = cfg.privacy.secagg
    if not sa.enabled:
        return
    _refuse_individual(
        cfg, strategy, "privacy.secagg.enabled=true", "secure aggregation reveals only the sum of the updates"
    )
    if cfg.compression.name in ("fp16", "bf16", "topk"):
        raise UserError(
            f"compression.name={cfg.compression.name} cannot run under secure aggregation: masked updates are "
            "summed in an integer ring, where floating-point casts and per-platform top-k supports do not add up; "
            "use compression.name=int8 or int4 (they narrow the ring) or none"
        )
    if cohort < 2:
        raise UserError("privacy.secagg.enabled=true needs at least 2 platforms per round: a sum of one is the update")
    if sa.threshold is not None and sa.threshold > cohort:
        raise UserError(
            f"config key 'privacy.secagg.threshold' must be at most the platforms per round ({cohort}), got {sa.threshold}"
        )
    if len(set(cfg.model.lora.ranks)) > 1:
        raise UserError(
            "privacy.secagg.enabled=true needs one LoRA rank for all platforms (model.lora.ranks): the masked "
            "vectors of every platform must have the same length"
        )
    if cfg.privacy.dp.level == "client":
        from fl_llm.compression import LEVELS

        levels = LEVELS.get(cfg.compression.name) or (2**31 - 1) // max(cohort, 1)
        step, clip = sa.clip_range / levels, cfg.privacy.dp.clip_norm
        if step > clip / 4:
            raise UserError(
                f"config key 'privacy.secagg.clip_range': one fixed-point level ({sa.clip_range:g}/{levels} = {step:.3g}) "
                f"is above a quarter of privacy.dp.clip_norm ({clip:g}); an update clipped to that norm must then "
                "be sent mostly as zeros to stay within it. Lower privacy.secagg.clip_range (an update of norm C "
                "rarely has values above C/10), or use compression.name=int8 or none"
            )


def _check_privacy(cfg: RunConfig, strategy, cohort: int) -> None:
    dp = cfg.privacy.dp
    if dp.level == "none":
        return
    if dp.noise_multiplier is None and cfg.privacy.target_epsilon is None:
        raise UserError(
            f"privacy.dp.level={dp.level} needs a noise level: set privacy.target_epsilon (the noise is "
            "calibrated to it) or privacy.dp.noise_multiplier"
        )
    if dp.adaptive_clip and dp.level != "client":
        raise UserError("config key 'privacy.dp.adaptive_clip' applies to privacy.dp.level=client only")
    if dp.level == "client":
        _refuse_individual(
            cfg, strategy, "privacy.dp.level=client", "DP-FedAvg noises the plain mean of clipped updates"
        )
        if dp.adaptive_clip and dp.noise_multiplier is not None and dp.noise_multiplier >= cohort / 10:
            raise UserError(
                f"privacy.dp.adaptive_clip needs privacy.dp.noise_multiplier below m/10 = {cohort / 10:g} "
                f"(m = {cohort} platforms per round; Andrew et al. 2021 spend σ_b = m/20 on the clip count), "
                f"got {dp.noise_multiplier}"
            )


def _check_strategy(cfg: RunConfig, strategy, cohort: int) -> None:
    st, n = cfg.strategy, cfg.data.num_platforms
    strategy.check(cfg, cohort)
    if strategy.rule(st.robust) == "krum" and cohort <= 2 * st.krum_byzantine + 2:
        raise UserError(
            f"strategy krum with strategy.krum_byzantine={st.krum_byzantine} needs more than "
            f"{2 * st.krum_byzantine + 2} platforms per round, the cohort has {cohort}"
        )
    ranks = cfg.model.lora.ranks
    if ranks and (len(ranks) != n or min(ranks) < 1):
        raise UserError(
            f"config key 'model.lora.ranks' must hold data.num_platforms ({n}) ranks >= 1, or be empty; got {ranks}"
        )


def _check_federation(cfg: RunConfig) -> None:
    """Remote platform services: one per platform, each with a name and an address, a kit to
    reach them with, and no fault injection (a service's faults are its own config's)."""
    remote = cfg.federation.platforms
    if not remote:
        return
    if len(remote) != cfg.data.num_platforms:
        raise UserError(
            f"config key 'federation.platforms' lists {len(remote)} platform services but data.num_platforms is "
            f"{cfg.data.num_platforms}; set data.num_platforms={len(remote)}"
        )
    for i, p in enumerate(remote):
        host, _, port = p.address.rpartition(":")
        if not p.name or not host or not port.isdigit():
            raise UserError(f"config key 'federation.platforms[{i}]' needs a name and an address host:port, got {p}")
    if len({p.name for p in remote}) != len(remote):
        raise UserError("config key 'federation.platforms' names a platform twice")
    if not cfg.federation.bundle:
        raise UserError("config key 'federation.bundle' must name the coordinator's kit (`fl-llm provision`)")
    if any([cfg.faults.kill, cfg.faults.error, cfg.faults.delay, cfg.faults.corrupt]):
        raise UserError("config key 'faults' injects into platforms of this run; a platform service takes its own")
