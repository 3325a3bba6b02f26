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
