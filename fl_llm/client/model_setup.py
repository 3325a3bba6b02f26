"""A platform's model: the base with its LoRA adapter, on its device — its own copy, or one
adapter of its own on a host's resident base (`ray.platforms_per_gpu`)."""

from __future__ import annotations

from fl_llm.config import RunConfig


def build_model(cfg: RunConfig, platform_id: int, rank: int, device, shared: tuple | None):
    """(model, tokenizer, adapter name). `shared`: a host's (LoRA-wrapped model, tokenizer), on
    which this platform adds its own adapter. Raises `UserError` for what the user can fix (4-bit
    loading without a GPU, target modules that match nothing, a rank above a layer's size)."""
    import torch

    from fl_llm.data.sources import task_of
    from fl_llm.model.adapters import apply_lora, lora_config
    from fl_llm.model.build import build_base

    if shared is not None:  # one resident base model, one adapter per platform on it
        model, tokenizer = shared
        adapter = f"platform{platform_id}"
        with torch.random.fork_rng(devices=[]):  # the same initial factors as apply_lora
            torch.manual_seed(cfg.seed)
            model.add_adapter(adapter, lora_config(cfg.model, rank))
        return model, tokenizer, adapter
    base, tokenizer = build_base(cfg.model, cfg.seed, num_labels=len(task_of(cfg).verbalizer))
    if not getattr(base, "is_quantized", False):  # a 4-bit base is placed on its GPU as it loads
        base.to(device)  # before wrapping: adapters are created on the base's device
    model = apply_lora(
        base,
        cfg.model,
        cfg.seed,
        rank=rank,
        checkpointing=cfg.client.gradient_checkpointing,
        compile_blocks=cfg.client.compile,
    )
    return model, tokenizer, "default"


def apply_base_merges(model, base: dict, version: int, cfg: RunConfig, platform_id: int) -> int:
    """Fold the driver's base merges (FedEx residuals, FLoRA stacks) this process has not applied
    yet (it has applied `version`) into the frozen weights: W₀ += s·B·A per layer, in order, each
    exactly once. Returns the new version."""
    import numpy as np
    import torch

    from fl_llm.client.parallel import like

    start, merges = int(base["start"]), base["merges"]
    if start > version:
        raise RuntimeError(f"platform {platform_id}: base merges from {start}, but it has applied {version}")
    lora = cfg.model.lora
    scale = lora.alpha / (max(lora.ranks) if lora.ranks else lora.r)
    with torch.no_grad():
        for merge in merges[version - start :]:
            for layer, (b, a) in merge.items():
                weight = model.get_submodule(layer).base_layer.weight
                delta = torch.from_numpy(np.asarray(b, np.float32) @ np.asarray(a, np.float32)) * scale
                weight.add_(like(weight, delta))  # a shard of it, when sharded over workers
            version += 1
    return version
