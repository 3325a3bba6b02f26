"""Compressed uplink: error bounds of every codec, unbiasedness of the stochastic ones, the
bytes they put on the wire, and top-k with error feedback converging where plain top-k cannot."""

from __future__ import annotations

import numpy as np
import pytest

from fl_llm.compression import GROUP, compress, decompress, payload_nbytes


def _update(rng, scale=0.01):
    return {
        "layer.lora_A.weight": (rng.normal(0, scale, (8, 128))).astype(np.float32),
        "layer.lora_B.weight": (rng.normal(0, scale, (128, 8)) * rng.lognormal(0, 1, (128, 1))).astype(np.float32),
    }


def _vec(state):
    return np.concatenate([state[k].ravel() for k in sorted(state)]).astype(np.float64)


@pytest.mark.parametrize("codec, ratio", [("none", 1.0), ("fp16", 2.0), ("bf16", 2.0), ("int8", 3.9), ("int4", 7.5)])
def test_bytes_on_the_wire(codec, ratio):
    update = _update(np.random.default_rng(0))
    payload, _ = compress(update, codec, np.random.default_rng(1))
    fp32 = sum(v.nbytes for v in update.values())
    assert fp32 / payload_nbytes(payload) >= ratio
    out = decompress(payload)
    assert {k: v.shape for k, v in out.items()} == {k: v.shape for k, v in update.items()}
    assert all(v.dtype == np.float32 for v in out.values())


@pytest.mark.parametrize("codec, levels", [("int8", 127), ("int4", 7)])
def test_integer_codecs_are_bounded_and_unbiased(codec, levels):
    rng = np.random.default_rng(2)
    update = _update(rng)
    x = _vec(update)
    groups = np.pad(x, (0, -len(x) % GROUP)).reshape(-1, GROUP)
    step = np.repeat(np.abs(groups).max(1) / levels, GROUP)[: len(x)]  # one quantization step per group
    decoded = np.stack([_vec(decompress(compress(update, codec, rng)[0])) for _ in range(300)])
    assert (np.abs(decoded - x) <= step * (1 + 1e-6) + 1e-12).all()  # never more than one step off
    # the mean over draws converges to x: unbiased (the bound is 5 standard errors of a step/2 spread)
    assert (np.abs(decoded.mean(0) - x) <= 5 * step / 2 / np.sqrt(300) + 1e-9).all()


def test_float_casts_relative_error():
    update = _update(np.random.default_rng(3))
    x = _vec(update)
    for codec, eps in (("fp16", 2**-11), ("bf16", 2**-8)):
        y = _vec(decompress(compress(update, codec, np.random.default_rng(0))[0]))
        assert np.all(np.abs(y - x) <= eps * np.abs(x) + 1e-7), codec


def test_topk_sends_the_largest_and_keeps_the_rest():
    rng = np.random.default_rng(4)
    update = _update(rng)
    payload, residual = compress(update, "topk", rng, fraction=0.05)
    sent = _vec(decompress(payload))
    x = _vec(update)
    k = int(round(0.05 * len(x)))
    assert np.count_nonzero(sent) == k
    assert np.abs(x[sent != 0]).min() >= np.abs(x[sent == 0]).max()
    np.testing.assert_allclose(sent + _vec(residual), x, atol=1e-7)  # nothing is lost, only delayed
    assert payload_nbytes(payload) == 8 * k


def test_topk_with_error_feedback_converges_on_a_toy_problem():
    """Gradient descent on f(x) = ½ Σ cᵢ (xᵢ − x*ᵢ)² where each step goes through top-5% with
    error feedback: x reaches x*, and what was applied plus the residual is always exactly the
    sum of the true steps (nothing lost, only delayed)."""
    rng = np.random.default_rng(5)
    d = 400
    target = rng.normal(0, 1, d)
    curv = rng.uniform(0.5, 1.0, d)
    x, residual, total_steps = np.zeros(d), None, np.zeros(d)
    for _ in range(400):
        step = (-0.05 * curv * (x - target)).astype(np.float32)
        total_steps += step
        payload, residual = compress({"x": step}, "topk", rng, residual, fraction=0.05)
        x = x + decompress(payload)["x"].astype(np.float64)
        np.testing.assert_allclose(x + residual["x"], total_steps, atol=1e-4)
    assert np.linalg.norm(x - target) / np.linalg.norm(target) < 1e-3


# --- in a run (local backend: no Ray needed) ----------------------------------------------------


def test_int8_run_sends_a_quarter_of_the_bytes_and_keeps_topk_residuals(tmp_path):
    from fl_llm import checkpoint
    from fl_llm.config import load
    from fl_llm.server.loop import run
    from fl_llm.tracking import read_metrics
    from tests.conftest import SMALL, platform_states

    rows = {}
    for codec in ("none", "int8", "topk"):
        cfg = load(None, [*SMALL, "backend=local", f"compression.name={codec}", "compression.topk_fraction=0.1"])
        run(cfg, tmp_path / codec)
        rows[codec] = read_metrics(tmp_path / codec)
    plain, int8 = rows["none"][-1], rows["int8"][-1]
    assert plain["bytes_up"] / int8["bytes_up"] > 3.9
    assert plain["bytes_down"] == int8["bytes_down"]  # the downlink is the float32 global adapter
    assert abs(plain["eval_loss"] - int8["eval_loss"]) < 0.01
    assert plain["bytes_up"] / rows["topk"][-1]["bytes_up"] > 4.9  # 10% of values, 8 bytes each
    _, state = checkpoint.load(checkpoint.latest(tmp_path / "topk" / "checkpoints"))
    assert "platform_state" not in state  # each platform keeps its residual in its own state dir
    residuals = [s["residual"] for s in platform_states(tmp_path / "topk").values()]
    assert len(residuals) == 3 and all(any(np.abs(v).sum() > 0 for v in r.values()) for r in residuals)
