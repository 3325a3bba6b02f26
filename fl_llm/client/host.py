"""`PlatformHost`: several platforms in one process on one resident base model.

A large base model in every platform's process caps a GPU at one or two platforms. A host holds
the frozen base once and, for each platform assigned to it, that platform's own `Platform`:
its data, its LoRA adapter (a named peft adapter on the shared base) and the optimizer it makes
each round — nothing of one platform's data or optimizer state reaches another. The host runs
one call at a time, so its platforms train in turn; hosts on different GPUs run in parallel.

The Ray backend makes one host actor per `ray.platforms_per_gpu` platforms (one GPU each where
the cluster has GPUs). Strategies that change the frozen weights per platform (FedEx, FLoRA),
record-level DP (Opacus hooks on the shared model) and SCAFFOLD are refused with it at load.
No Ray here.
"""

from __future__ import annotations

from fl_llm.client.platform import Platform, this_process
from fl_llm.client.train import resolve_device


class PlatformHost:
    def __init__(self, config: dict, platform_ids: list[int], num_threads: int | None = None, hard_exit: bool = False):
        import torch

        from fl_llm.config import from_dict
        from fl_llm.data.sources import task_of
        from fl_llm.model.adapters import apply_lora
        from fl_llm.model.build import build_base

        if num_threads:
            torch.set_num_threads(num_threads)
        cfg = from_dict(config)
        device = resolve_device(cfg.client.device)
        base, tokenizer = build_base(cfg.model, cfg.seed, num_labels=len(task_of(cfg).verbalizer))
        if not getattr(base, "is_quantized", False):
            base.to(device)
        # its "default" adapter stays unused
        model = apply_lora(
            base,
            cfg.model,
            cfg.seed,
            checkpointing=cfg.client.gradient_checkpointing,
            compile_blocks=cfg.client.compile,
        )
        self.platforms = {i: Platform(config, i, None, hard_exit, shared=(model, tokenizer)) for i in platform_ids}

    def process(self) -> tuple[str, int]:
        return this_process()

    def call(self, platform_id: int, method: str, *args):
        """`method(*args)` on one of this host's platforms (a `PlatformAPI` method only)."""
        from fl_llm.client.api import REMOTE

        if method not in REMOTE:
            raise ValueError(f"{method!r} is not part of the platform's remote API (fl_llm.client.api.PlatformAPI)")
        return getattr(self.platforms[platform_id], method)(*args)
