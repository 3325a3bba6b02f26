"""LoRA adapters: config, state as numpy, and the standard PEFT files on disk.

Only the adapter ever crosses a process boundary, as `dict[str, np.ndarray]` taken with peft's
own `get_peft_model_state_dict` (keys as in a saved PEFT adapter). numpy rather than torch because
Ray hands numpy arrays over zero-copy; they arrive read-only, so `set_adapter_state` copies.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from fl_llm.config import ModelConfig
from fl_llm.tensors import AdapterState


@contextmanager
def peft_quietly():
    """peft asks transformers a deprecated question about gradient checkpointing (a FutureWarning
    on every wrap and every load): not ours to fix, and nothing the user can act on, so not shown."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def lora_config(model_cfg: ModelConfig, rank: int | None = None):
    """peft's LoraConfig; `rank` overrides model.lora.r (a platform with its own rank)."""
    from peft import LoraConfig

    lora = model_cfg.lora
    targets = "all-linear" if lora.target_modules == ["all-linear"] else list(lora.target_modules)
    return LoraConfig(
        r=rank or lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        # SEQ_CLS makes peft train and save the classification head with the adapters
        task_type="SEQ_CLS" if model_cfg.kind == "seq_cls" else "CAUSAL_LM",
    )


def _check_rank(model, rank: int) -> None:
    """A LoRA rank above a layer's smaller dimension adds parameters without adding rank: refuse it."""
    from fl_llm.errors import UserError

    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and hasattr(module, "in_features") and hasattr(module, "out_features"):
            smallest = min(module.in_features, module.out_features)
            if rank > smallest:
                raise UserError(
                    f"config key 'model.lora.r' is {rank}, above the smaller dimension ({smallest}) of layer "
                    f"{name.split('base_model.model.', 1)[-1]}; a LoRA of rank r ≤ {smallest} is already full rank there"
                )


def apply_lora(
    model,
    model_cfg: ModelConfig,
    seed: int,
    rank: int | None = None,
    checkpointing: bool = False,
    compile_blocks: bool = False,
):
    """Wrap `model` with LoRA; the initial A matrices come from `seed`, so all platforms agree.
    `checkpointing`: recompute activations in the backward pass (client.gradient_checkpointing).
    `compile_blocks`: torch.compile every transformer block in place, adapters included
    (client.compile) — one compiled graph serves all blocks, shapes marked dynamic so that
    packed rows of varying width do not recompile."""
    import torch
    from peft import get_peft_model
    from peft.utils.error import NoMatchingPeftModuleError

    from fl_llm.errors import UserError

    with torch.random.fork_rng(devices=[]), peft_quietly():
        torch.manual_seed(seed)
        try:
            wrapped = get_peft_model(model, lora_config(model_cfg, rank))
        except (NoMatchingPeftModuleError, ValueError) as e:
            if "target" not in str(e).lower():
                raise
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
            raise UserError(
                f"config key 'model.lora.target_modules': {model_cfg.lora.target_modules} matches no layer of the "
                f"model; its linear layers are named {', '.join(linear)}"
            ) from None
    _check_rank(wrapped, rank or model_cfg.lora.r)
    if checkpointing:
        wrapped.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        wrapped.enable_input_require_grads()
    if compile_blocks:
        compile_each_block(wrapped)
    return wrapped


def compile_each_block(model) -> None:
    """torch.compile every transformer block of `model` in place (the largest ModuleList: a
    decoder's layers, an encoder's layer), with dynamic shapes."""
    import torch

    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 0]
    if not lists:
        raise ValueError("client.compile: this model has no list of transformer blocks")
    for block in max(lists, key=lambda m: sum(p.numel() for p in m.parameters())):
        block.compile(dynamic=True)


def base_of(model):
    """The transformers model inside a peft wrapper (or `model` itself when it is not wrapped)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def state_key(param_name: str, adapter: str = "default") -> str:
    """The adapter-state key of a trainable parameter (peft drops the adapter name and the
    modules_to_save wrapper in saved adapters)."""
    return param_name.replace(".modules_to_save", "").replace(f".{adapter}", "")


def _active(peft_model) -> str:
    """The adapter a model trains now: "default", or — several platforms on one base model —
    the platform's own (`PlatformHost`)."""
    active = getattr(peft_model, "active_adapter", "default")
    return active if isinstance(active, str) else active[0]


def get_adapter_state(peft_model) -> AdapterState:
    """The active adapter's tensors, keyed as in a saved PEFT adapter."""
    from peft import get_peft_model_state_dict

    from fl_llm.client.parallel import full

    tensors = get_peft_model_state_dict(peft_model, adapter_name=_active(peft_model))
    # sharded over a platform's workers (client.parallel=fsdp): gathered whole, on every worker
    return {k: full(v.detach()).to("cpu").float().numpy().copy() for k, v in tensors.items()}


def set_adapter_state(peft_model, state: AdapterState) -> None:
    import torch
    from peft import set_peft_model_state_dict

    expected = set(get_adapter_state_keys(peft_model))
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(f"adapter state does not match the model: missing {missing[:3]}, extra {extra[:3]}")
    tensors = {k: torch.from_numpy(np.array(v, copy=True)) for k, v in state.items()}
    adapter = _active(peft_model)
    from fl_llm.client.parallel import is_sharded, like

    if is_sharded(peft_model):  # over a platform's workers (client.parallel=fsdp)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                key = state_key(name, adapter)
                if key in tensors and f".{adapter}." in name:
                    p.copy_(like(p, tensors[key]))
        return
    set_peft_model_state_dict(peft_model, tensors, adapter_name=adapter)


def get_adapter_state_keys(peft_model) -> list[str]:
    from peft import get_peft_model_state_dict

    return list(get_peft_model_state_dict(peft_model, adapter_name=_active(peft_model)).keys())


def state_nbytes(state: AdapterState) -> int:
    return int(sum(v.nbytes for v in state.values()))


def save_adapter(
    state: AdapterState, model_cfg: ModelConfig, out_dir: Path, base_name: str, rank: int | None = None
) -> None:
    """Write `state` as a standard PEFT adapter directory, atomically (temp dir + rename).

    `PeftModel.from_pretrained(base, out_dir)` loads it with nothing of fl_llm installed.
    """
    from safetensors.numpy import save_file

    from fl_llm.tracking import atomic_dir

    cfg = lora_config(model_cfg, rank)
    cfg.base_model_name_or_path = base_name
    with atomic_dir(out_dir) as tmp:
        cfg.save_pretrained(tmp)
        save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(tmp / "adapter_model.safetensors"))


def load_init_adapter(model_cfg: ModelConfig, like: AdapterState | None = None) -> AdapterState | None:
    """model.init_adapter's tensors (None when unset), checked against `like` — the fresh init of
    this model — so that an adapter from another base, rank or target set fails with one message
    before any training."""
    from safetensors.numpy import load_file

    from fl_llm.errors import UserError

    if model_cfg.init_adapter is None:
        return None
    where = Path(model_cfg.init_adapter).expanduser()
    file = where / "adapter_model.safetensors"
    if not file.is_file():
        raise UserError(
            f"model.init_adapter: {str(where)!r} holds no adapter_model.safetensors "
            "(point it at a PEFT adapter directory, e.g. an earlier run's adapter/)"
        )
    state = {k: np.asarray(v, np.float32) for k, v in load_file(str(file)).items()}
    if like is not None:
        missing, extra = sorted(set(like) - set(state)), sorted(set(state) - set(like))
        wrong = sorted(k for k in set(like) & set(state) if like[k].shape != state[k].shape)
        if missing or extra or wrong:
            if missing:
                detail = f"missing {missing[:2]}"
            elif extra:
                detail = f"unexpected {extra[:2]}"
            else:
                detail = f"{wrong[0]} is {state[wrong[0]].shape}, this model's is {like[wrong[0]].shape}"
            raise UserError(
                f"model.init_adapter {str(where)!r} does not fit this model ({detail}): it must come from "
                "the same base model (for model.name_or_path=tiny: the same seed and model.tiny shape), "
                "LoRA rank and target modules"
            )
    return state


def starting_adapter(model_cfg: ModelConfig, fresh: AdapterState) -> AdapterState:
    """What round 0 starts from: model.init_adapter (checked against `fresh`), else `fresh`."""
    warm = load_init_adapter(model_cfg, like=fresh)
    return fresh if warm is None else warm
