"""Packed batches — rows (a block-diagonal mask) and one flat sequence (attention per example,
`fl_llm.model.attention`) — give the same loss and the same gradients as padded ones, no
attention crosses an example boundary, and far fewer positions are computed."""

from __future__ import annotations

import numpy as np
import pytest

from fl_llm.client.train import _answer_loss, _forward
from fl_llm.data.batching import IGNORE, collate, flatten, pack
from fl_llm.model.attention import segments


@pytest.fixture(scope="module")
def model_and_data():
    import torch

    from fl_llm.config import load
    from fl_llm.data import sources
    from fl_llm.data.batching import encode
    from fl_llm.model.adapters import apply_lora
    from fl_llm.model.build import build_base

    cfg = load(None, ["data.synthetic.train_examples=[64,64,64]", "data.synthetic.eval_examples=20"])
    task = sources.task_of(cfg)
    base, tok = build_base(cfg.model, cfg.seed, num_labels=2)
    model = apply_lora(base, cfg.model, cfg.seed)
    with torch.no_grad():  # B starts at zero: give the adapter a non-trivial value to differentiate
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    data = sources.load_platform_data(cfg, 0)
    enc = encode(data.train, task, tok, cfg.model.max_length)
    return model, enc, tok.pad_token_id, cfg.model.max_length


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    logits, targets = _forward(model, batch, "cpu")
    loss = _answer_loss(logits, targets, "mean")
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return float(loss.detach()), grads


def test_packed_equals_padded(model_and_data):
    model, enc, pad_id, max_len = model_and_data
    idx = np.arange(16)
    padded = collate(enc, idx, pad_id)
    packed = pack(enc, idx, pad_id, 2 * max_len)
    assert len(packed["targets"]) == int((padded["targets"] != IGNORE).sum())
    assert packed["input_ids"].size <= padded["input_ids"].size
    model.train()
    loss_a, grads_a = _loss_and_grads(model, padded)
    loss_b, grads_b = _loss_and_grads(model, packed)
    assert loss_b == pytest.approx(loss_a, rel=1e-5)
    for name in grads_a:
        np.testing.assert_allclose(grads_b[name].numpy(), grads_a[name].numpy(), rtol=2e-3, atol=1e-6)


def test_no_attention_across_examples(model_and_data):
    """Changing every token of the first example in a row leaves the next example's answer
    logits exactly as they were."""
    import torch

    model, enc, pad_id, max_len = model_and_data
    batch = pack(enc, np.arange(6), pad_id, 4 * max_len)
    assert len(batch["input_ids"]) == 1  # one row holds all six
    pos = batch["position_ids"][0]
    starts = np.flatnonzero(pos == 0)
    changed = {k: v.copy() for k, v in batch.items()}
    changed["input_ids"][0, : starts[1]] = (changed["input_ids"][0, : starts[1]] + 7) % 1000 + 10
    model.eval()
    with torch.no_grad():
        a, _ = _forward(model, batch, "cpu")
        b, _ = _forward(model, changed, "cpu")
    later = batch["cols"] >= starts[1]
    assert later.any() and (~later).any()
    torch.testing.assert_close(a[torch.from_numpy(later)], b[torch.from_numpy(later)], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a[torch.from_numpy(~later)], b[torch.from_numpy(~later)])


def test_pack_fills_rows_first_fit():
    from fl_llm.data.batching import Encoded

    lens = [5, 3, 4, 2, 6, 1]
    enc = Encoded([np.arange(1, n + 1) for n in lens], np.ones(6, np.int64), np.zeros(6, np.int64))
    batch = pack(enc, np.arange(6), 0, 8)
    assert batch["input_ids"].shape == (3, 8)  # 21 tokens in rows of 8: [6,2] [5,3] [4,1]
    assert sorted((batch["input_ids"] != 0).sum(1).tolist()) == [5, 8, 8]
    # each answer (the last token) is predicted from the position before it
    for r, c, t in zip(batch["rows"], batch["cols"], batch["targets"]):
        assert batch["input_ids"][r, c + 1] == t


def test_flat_sequence_equals_padded(model_and_data):
    """The flat path the platforms take with the default attention: all 16 examples in one
    sequence, no padding, the same loss and gradients as padded batches."""
    model, enc, pad_id, _ = model_and_data
    idx = np.arange(16)
    padded, flat = collate(enc, idx, pad_id), flatten(enc, idx)
    assert flat["input_ids"].shape == (1, sum(len(enc.input_ids[i]) for i in idx))
    assert flat["cu_seq_lens"][-1] == flat["input_ids"].shape[1] and len(flat["cu_seq_lens"]) == 17
    model.train()
    loss_a, grads_a = _loss_and_grads(model, padded)
    with segments(model):
        loss_b, grads_b = _loss_and_grads(model, flat)
    assert loss_b == pytest.approx(loss_a, rel=1e-5)
    for name in grads_a:
        np.testing.assert_allclose(grads_b[name].numpy(), grads_a[name].numpy(), rtol=2e-3, atol=1e-6)


def test_verbalizer_loss_is_the_same_padded_packed_and_flat(model_and_data):
    """client.loss=verbalizer reads the answer words off whichever layout the step uses."""
    import torch

    from fl_llm.data.batching import answer_token_ids
    from fl_llm.data.tasks import TASKS
    from fl_llm.model.tokenizer import load_builtin_tokenizer

    model, enc, pad_id, max_len = model_and_data
    words = answer_token_ids(TASKS["recommendation"], load_builtin_tokenizer())
    idx = np.arange(16)
    model.eval()
    with torch.no_grad():
        losses = [
            _answer_loss(*_forward(model, b, "cpu"), "mean", words)
            for b in (collate(enc, idx, pad_id), pack(enc, idx, pad_id, 2 * max_len))
        ]
        with segments(model):
            losses.append(_answer_loss(*_forward(model, flatten(enc, idx), "cpu"), "mean", words))
    assert float(losses[0]) < 5.0  # two words: the loss is a log-loss, not over 8192 tokens
    assert float(losses[1]) == pytest.approx(float(losses[0]), rel=1e-5)
    assert float(losses[2]) == pytest.approx(float(losses[0]), rel=1e-5)


def test_flat_sequence_keeps_examples_apart(model_and_data):
    import torch

    model, enc, _, _ = model_and_data
    batch = flatten(enc, np.arange(6))
    first_end = int(batch["cu_seq_lens"][1])
    changed = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in batch.items()}
    changed["input_ids"][0, :first_end] = (changed["input_ids"][0, :first_end] + 7) % 1000 + 10
    model.eval()
    with torch.no_grad(), segments(model):
        a, _ = _forward(model, batch, "cpu")
        b, _ = _forward(model, changed, "cpu")
    later = torch.from_numpy(batch["cols"] >= first_end)
    torch.testing.assert_close(a[later], b[later], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a[~later], b[~later])


def test_segments_switches_back_and_refuses_unpacked_input(model_and_data):
    """Outside the block the configured attention is back; inside, a batch without segment
    bounds is refused instead of attending across examples."""
    import torch

    model, enc, pad_id, _ = model_and_data
    base = model.get_base_model()
    before = base.config._attn_implementation
    with segments(model):
        assert base.config._attn_implementation == "fl_llm_varlen"
        with pytest.raises(RuntimeError, match="segment bounds"), torch.no_grad():
            _forward(model, pack(enc, np.arange(4), pad_id, 1024), "cpu")
    assert base.config._attn_implementation == before


def test_local_train_flat_matches_rows():
    """local_train with client.pack_length: the flat path (default sdpa) and the rows path
    (eager attention, transformers' block-diagonal mask) train to the same adapter."""
    import torch

    from fl_llm.client.train import local_train
    from fl_llm.config import load
    from fl_llm.data import sources
    from fl_llm.data.batching import encode
    from fl_llm.model.adapters import apply_lora, get_adapter_state
    from fl_llm.model.build import build_base

    states, slots = [], []
    for impl in ("sdpa", "eager"):
        cfg = load(None, ["data.synthetic.train_examples=[64,64,64]", f"model.attn_implementation={impl}"])
        base, tok = build_base(cfg.model, cfg.seed, num_labels=2)
        model = apply_lora(base, cfg.model, cfg.seed)
        enc = encode(sources.load_platform_data(cfg, 0).train, sources.task_of(cfg), tok, cfg.model.max_length)
        out = local_train(
            model,
            enc,
            steps=3,
            batch_size=8,
            lr=1e-2,
            weight_decay=0.0,
            max_grad_norm=1.0,
            rng=np.random.default_rng(0),
            device=torch.device("cpu"),
            pad_id=tok.pad_token_id,
            pack_length=512,
        )
        assert base.config._attn_implementation == impl
        states.append(get_adapter_state(model))
        slots.append(out["slots"] / out["tokens"])
    assert slots[0] == 1.0 and slots[1] >= 1.0  # flat: not one padded position
    for k in states[0]:
        np.testing.assert_allclose(states[0][k], states[1][k], rtol=1e-3, atol=1e-5)


def test_kernel_bound_is_a_power_of_two_upper_bound():
    """The varlen kernel gets an upper bound on the longest example, from few distinct values (a
    compiled block specialises on it): every length maps to the smallest power of two ≥ it."""
    from fl_llm.model.attention import kernel_bound

    bounds = {n: kernel_bound(n) for n in range(1, 2049)}
    assert all(b >= n and b < 2 * n and b & (b - 1) == 0 for n, b in bounds.items())
    assert len(set(bounds.values())) == 12  # 1, 2, 4, …, 2048
