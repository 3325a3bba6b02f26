"""Attention over a packed batch: the step's examples laid end to end in one sequence, each
attending only to itself, causally — no padding computed and no attention across examples.

On a GPU in bf16/fp16 this is FlashAttention's variable-length kernel (Dao, "FlashAttention-2",
ICLR 2024) as PyTorch ships it (`torch.nn.attention.varlen`, torch >= 2.10): its cost grows with
Σ lengthᵢ², not with the square of the packed row. Elsewhere (CPU, float32, an older torch) one
causal `scaled_dot_product_attention` per example computes the same thing.

It is registered with transformers as the attention implementation `fl_llm_varlen`, which
builds no mask; `segments(model)` switches a model to it while a packed step runs (backward and
gradient checkpointing's recomputation included) and back afterwards. The segment bounds reach
the kernel as the keyword arguments transformers passes down to attention (`cu_seq_lens_q`,
`max_length_q`, the names its own varlen path uses).
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from functools import cache

from fl_llm.model.adapters import base_of

NAME = "fl_llm_varlen"


@cache
def _torch_varlen():
    """(varlen_attn, its causal keyword arguments, whether it takes fewer key/value heads), or
    None where this torch has no variable-length kernel. Asked once per process (every layer of
    every packed step calls it)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    return varlen_attn, causal, "enable_gqa" in params


def kernel_bound(longest: int) -> int:
    """The longest-segment argument handed to the kernel: `longest` rounded up to a power of two.
    FlashAttention needs only an upper bound (it sizes the launch grid; blocks past a segment's end
    exit at once), and a handful of distinct values keeps a compiled block (client.compile) from
    recompiling for every step's longest example, should torch.compile specialise on the int."""
    return 1 << max(0, longest - 1).bit_length()


def segment_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' attention-function interface: query (1, H, T, D), key/value (1, Hkv, T, D);
    returns ((1, T, H, D), None)."""
    import torch

    bounds = kwargs.get("cu_seq_lens_q")
    if bounds is None:
        raise RuntimeError(f"attention {NAME!r} needs a packed batch's segment bounds (cu_seq_lens_q)")
    if query.shape[0] != 1:
        raise RuntimeError(f"attention {NAME!r} takes one packed sequence, got a batch of {query.shape[0]}")
    groups = query.shape[1] // key.shape[1]
    kernel = _torch_varlen() if query.is_cuda and query.dtype in (torch.bfloat16, torch.float16) else None
    if kernel is not None:
        varlen_attn, causal, takes_gqa = kernel
        q, k, v = (t[0].transpose(0, 1).contiguous() for t in (query, key, value))  # (T, heads, D)
        extra = {}
        if groups > 1 and takes_gqa:
            extra["enable_gqa"] = True
        elif groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        longest = int(kwargs["max_length_q"])
        out = varlen_attn(q, k, v, bounds, bounds, longest, longest, scale=scaling, **causal, **extra)
        return out.unsqueeze(0), None
    if groups > 1:  # query head h reads key/value head h // groups
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    cuts = bounds.tolist()
    parts = [
        torch.nn.functional.scaled_dot_product_attention(
            query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], is_causal=True, scale=scaling
        )
        for a, b in zip(cuts[:-1], cuts[1:])
    ]
    return torch.cat(parts, dim=2).transpose(1, 2), None


def register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, segment_attention)


@contextmanager
def segments(model):
    """`model` (a transformers model, or a peft wrapper of one) attends with `segment_attention`
    inside the block; its configured implementation is back afterwards."""
    register()
    base = base_of(model)
    configs = {id(c): c for c in (m.config for m in base.modules() if hasattr(m, "config"))}.values()
    before = [(c, c._attn_implementation) for c in configs]
    for c, _ in before:
        c._attn_implementation = NAME
    try:
        yield
    finally:
        for c, impl in before:
            c._attn_implementation = impl
