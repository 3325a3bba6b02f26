"""GPU-only paths (marker `gpu`; skipped without CUDA): QLoRA 4-bit loading and several platforms
on one GPU's resident base model, bf16, packing."""

from __future__ import annotations

import pytest

from tests.conftest import SMALL


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _has_cuda(), reason="needs a CUDA GPU")]


def test_qlora_platforms_share_one_gpu(tmp_path):
    from fl_llm.config import load
    from fl_llm.model.build import save_base
    from fl_llm.server.loop import run
    from fl_llm.tracking import read_metrics

    base_dir = tmp_path / "base"
    save_base(load(None, []).model, 0, base_dir)  # the built-in model as a model directory
    cfg = load(
        None,
        [
            *SMALL,
            f"model.name_or_path={base_dir}",
            "model.quantization=4bit",
            "model.dtype=bfloat16",
            "client.pack_length=512",
            "ray.platforms_per_gpu=3",
        ],
    )
    run(cfg, tmp_path / "r")
    rows = read_metrics(tmp_path / "r")
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"] + 0.5
    assert all(p["participated"] for p in rows[-1]["platforms"].values())


@pytest.mark.parametrize("kv_heads", [8, 2])
def test_varlen_kernel_matches_one_attention_per_example(kv_heads):
    """fl_llm.model.attention on a GPU in bf16 (FlashAttention's varlen kernel) against its own
    reference path (one causal sdpa per example, float32), forward and backward, with and
    without grouped-query attention."""
    import torch

    from fl_llm.model.attention import _torch_varlen, segment_attention

    if _torch_varlen() is None:
        pytest.skip("this torch has no torch.nn.attention.varlen")

    class Module:
        num_key_value_groups = 8 // kv_heads

    lengths = [37, 200, 5, 611, 128]
    total = sum(lengths)
    bounds = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 8, total, 64, device="cuda", generator=g)
    k, v = (torch.randn(1, kv_heads, total, 64, device="cuda", generator=g) for _ in range(2))
    kw = dict(cu_seq_lens_q=bounds, max_length_q=max(lengths), scaling=64**-0.5)
    outs, grads = [], []
    for dtype in (torch.bfloat16, torch.float32):  # the kernel, then the reference
        leaves = [t.clone().to(dtype).requires_grad_(True) for t in (q, k, v)]
        out, _ = segment_attention(Module(), *leaves, None, **kw)
        out.float().square().sum().backward()
        outs.append(out.float())
        grads.append([t.grad.float() for t in leaves])
    assert outs[0].shape == (1, total, 8, 64)
    torch.testing.assert_close(outs[0], outs[1], rtol=2e-2, atol=2e-2)
    for a, b in zip(grads[0], grads[1]):
        # bf16 against float32: judged on the whole tensor (with grouped-query attention a key's
        # gradient sums over the heads sharing it, and single elements round by up to ~0.1)
        assert float((a - b).norm() / b.norm()) < 1e-2
