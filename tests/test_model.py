"""Model pieces: tokenizer, adapter state round trip, PEFT files, batching alignment."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fl_llm.config import load
from fl_llm.data.batching import IGNORE, answer_token_ids, collate, encode
from fl_llm.data.tasks import TASKS
from fl_llm.model.adapters import apply_lora, get_adapter_state, save_adapter, set_adapter_state, state_nbytes
from fl_llm.model.build import build_base
from fl_llm.model.tokenizer import load_builtin_tokenizer

TWO_RECORDS = [
    {"liked": "Kava coffee 4.5★", "disliked": "none", "candidate": "Bean coffee 4.0★", "label": 1},
    {
        "liked": "Stride sneakers 3.9★, Nest furniture 4.4★, Aura skincare 4.1★",
        "disliked": "Orbit phones 2.9★",
        "candidate": "Novo laptops 3.3★",
        "label": 0,
    },
]


@pytest.fixture(scope="module")
def cfg():
    return load(None)


def _model(cfg, seed=0):
    base, tok = build_base(cfg.model, seed)
    return apply_lora(base, cfg.model, seed), tok


def _trained_looking_model(cfg, seed: int):
    """The tiny model with a non-zero B (a fresh adapter's B is zero: the base model's output)."""
    model, tok = _model(cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(seed))
    return model, tok


def _batch(tok):
    ids = tok(
        ["Customer liked: Kava coffee 4.5★. Answer: Yes", "这个手机很好用 Answer: No"],
        add_special_tokens=False,
        padding=True,
        return_tensors="pt",
    )
    return ids


def test_tokenizer_is_offline_and_reads_chinese_and_english():
    tok = load_builtin_tokenizer()
    for text in [
        "Will the customer like the candidate? Yes",
        "这个手机很好用，物流也快！",
        "mixed 混合 text 4.5★ $19.99",
    ]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == text
    # Chinese is not spelled out byte by byte: common characters are merged tokens
    assert len(tok("这个手机很好用", add_special_tokens=False)["input_ids"]) <= 7
    assert tok.pad_token_id is not None and tok.eos_token_id is not None


def test_answers_are_single_distinct_tokens():
    tok = load_builtin_tokenizer()
    ids = answer_token_ids(TASKS["recommendation"], tok)
    assert len(set(ids)) == 2
    for word in TASKS["recommendation"].verbalizer:
        assert len(tok(word, add_special_tokens=False)["input_ids"]) == 1


def test_tiny_model_is_identical_for_the_same_seed(cfg):
    a, tok = _model(cfg, seed=3)
    b, _ = _model(cfg, seed=3)
    c, _ = _model(cfg, seed=4)
    x = _batch(tok)
    with torch.no_grad():
        la, lb, lc = (m(**x).logits for m in (a, b, c))
    assert torch.equal(la, lb)
    assert not torch.equal(la, lc)


def test_adapter_state_round_trip_reproduces_outputs_exactly(cfg):
    src, tok = _model(cfg)
    # move the adapter away from its (B = 0) initialisation so the check means something
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in src.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    state = get_adapter_state(src)
    assert all(isinstance(v, np.ndarray) and v.dtype == np.float32 for v in state.values())
    assert all("lora_" in k for k in state)  # nothing of the base model is in the state
    dst, _ = _model(cfg)
    x = _batch(tok)
    with torch.no_grad():
        before = dst(**x).logits
        set_adapter_state(dst, {k: v.copy() for k, v in state.items()})
        out_src, out_dst = src(**x).logits, dst(**x).logits
    assert not torch.equal(before, out_dst)
    assert torch.equal(out_src, out_dst)
    # read-only arrays (as Ray delivers them) are accepted
    ro = {k: v.copy() for k, v in state.items()}
    for v in ro.values():
        v.flags.writeable = False
    set_adapter_state(dst, ro)


def test_adapter_state_must_match_the_model(cfg):
    m, _ = _model(cfg)
    state = get_adapter_state(m)
    state.pop(next(iter(state)))
    with pytest.raises(ValueError, match="missing"):
        set_adapter_state(m, state)


def test_saved_adapter_loads_with_plain_peft(cfg, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fl_llm.model.build import save_base

    src, tok = _model(cfg)
    with torch.no_grad():
        for n, p in src.named_parameters():
            if "lora_B" in n:
                p.fill_(0.01)
    state = get_adapter_state(src)
    save_base(cfg.model, 0, tmp_path / "base_model")
    save_adapter(state, cfg.model, tmp_path / "adapter", str(tmp_path / "base_model"))
    save_adapter(state, cfg.model, tmp_path / "adapter", str(tmp_path / "base_model"))  # overwrite is clean
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    loaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tmp_path / "base_model"), tmp_path / "adapter"
    )
    x = _batch(tok)
    with torch.no_grad():
        assert torch.allclose(loaded(**x).logits, src(**x).logits, atol=1e-6)
    assert state_nbytes(state) == sum(v.numel() * 4 for n, v in src.named_parameters() if "lora_" in n)


def test_collate_masks_the_prompt_and_aligns_targets_with_answers():
    tok = load_builtin_tokenizer()
    task = TASKS["recommendation"]
    recs = TWO_RECORDS
    enc = encode(recs, task, tok, max_length=256)
    b = collate(enc, np.array([0, 1]), tok.pad_token_id)
    no, yes = answer_token_ids(task, tok)  # verbalizer order: label 0, label 1
    keep = b["keep"]
    # only the answer token is a target, at the window position before the last
    assert (b["targets"] != IGNORE).sum() == 2
    assert b["targets"][0, b["score_idx"][0]] == yes and b["targets"][1, b["score_idx"][1]] == no
    # left padding: each row's real tokens end at the last column; positions restart at 0
    assert (b["attention_mask"][:, -1] == 1).all()
    for row in range(2):
        n_real = b["attention_mask"][row].sum()
        assert list(b["position_ids"][row, -n_real:]) == list(range(n_real))
        assert b["input_ids"][row, -1] == (yes if row == 0 else no)
    assert keep == 2


def test_left_truncation_keeps_the_question_and_answer():
    tok = load_builtin_tokenizer()
    task = TASKS["recommendation"]
    rec = {
        "liked": ", ".join(["Kava coffee 4.5★"] * 50),
        "disliked": "none",
        "candidate": "Bean coffee 4.0★",
        "label": 1,
    }
    enc = encode([rec], task, tok, max_length=32)
    ids = enc.input_ids[0]
    assert len(ids) == 32
    assert tok.decode(ids).endswith("Will the customer like the candidate? Answer: Yes")


def test_padded_and_unpadded_scores_agree(cfg):
    """Left padding with explicit positions must not change a row's prediction."""
    from fl_llm.client.evaluation import evaluate_model as evaluate

    model, tok = _trained_looking_model(cfg, 0)
    task = TASKS["recommendation"]
    recs = TWO_RECORDS
    enc = encode(recs, task, tok, max_length=256)
    ans = answer_token_ids(task, tok)
    together = evaluate(model, enc, answer_ids=ans, batch_size=2, device="cpu", pad_id=tok.pad_token_id)
    alone = evaluate(model, enc, answer_ids=ans, batch_size=1, device="cpu", pad_id=tok.pad_token_id)
    np.testing.assert_allclose(together["probs"], alone["probs"], atol=1e-5)
    assert together["tokens"] == 2
    assert together["loss_sum"] == pytest.approx(alone["loss_sum"], rel=1e-5)


def test_verbalizer_loss_is_the_log_loss_of_the_answer_probabilities(cfg):
    """client.loss=verbalizer: the cross-entropy over the answer words alone, at the answer —
    the same number as the log loss of the scored answer probabilities."""
    from fl_llm.client.evaluation import evaluate_model as evaluate
    from fl_llm.client.evaluation import example_losses

    model, tok = _trained_looking_model(cfg, 1)
    task = TASKS["recommendation"]
    enc = encode(TWO_RECORDS, task, tok, max_length=256, first_token=True)
    ans = answer_token_ids(task, tok)
    kw = {"batch_size": 2, "device": "cpu", "pad_id": tok.pad_token_id}
    words = evaluate(model, enc, answer_ids=ans, words=ans, **kw)
    vocab = evaluate(model, enc, answer_ids=ans, **kw)
    truth = words["probs"][np.arange(2), enc.labels]
    assert words["loss_sum"] == pytest.approx(float(-np.log(truth).sum()), rel=1e-5)
    assert vocab["loss_sum"] > words["loss_sum"]  # the whole vocabulary spreads the mass wider
    per_example = example_losses(model, enc, np.arange(2), words=ans, **kw)
    np.testing.assert_allclose(per_example, -np.log(truth), rtol=1e-5)


def test_verbalizer_encoding_keeps_the_first_answer_token_only():
    tok = load_builtin_tokenizer()
    from dataclasses import replace

    task = replace(TASKS["recommendation"], verbalizer=(" not for them at all", " yes they will"))
    full = encode(TWO_RECORDS, task, tok, max_length=256)
    first = encode(TWO_RECORDS, task, tok, max_length=256, first_token=True)
    assert (full.answer_len > 1).all() and (first.answer_len == 1).all()
    for a, b, n in zip(full.input_ids, first.input_ids, full.answer_len):
        assert list(b) == list(a[: len(a) - n + 1])  # the same prompt, then the first answer token


def test_cosine_lr_schedule_decays_from_lr_to_a_tenth():
    from fl_llm.client.train import scheduled_lr

    lrs = [scheduled_lr(2e-3, "cosine", r, 5) for r in range(1, 6)]
    assert lrs[0] == pytest.approx(2e-3) and lrs[-1] == pytest.approx(2e-4)
    assert lrs[2] == pytest.approx(2e-3 * 0.55)  # half way: 0.1 + 0.9 * 0.5
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    assert scheduled_lr(2e-3, "constant", 4, 5) == 2e-3 == scheduled_lr(2e-3, "cosine", 1, 1)


def test_large_builtin_models_draw_each_tensor_in_parallel_deterministically(monkeypatch):
    """Above PARALLEL_INIT parameters (here: every size) each tensor comes from its own seeded
    generator: the same seed gives the same weights, another seed others; norms are one, the
    padding row zero, embeddings tied, matrices N(0, 1/width)."""
    from fl_llm.model import build

    monkeypatch.setattr(build, "PARALLEL_INIT", 0)
    cfg = load(None, ["model.tiny.vocab_size=9000"])
    a, tok = build_base(cfg.model, 3)
    b, _ = build_base(cfg.model, 3)
    c, _ = build_base(cfg.model, 4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.layers.0.mlp.up_proj.weight"], sc["model.layers.0.mlp.up_proj.weight"])
    assert a.get_input_embeddings().weight.shape == (9000, 128)
    assert a.lm_head.weight is a.model.embed_tokens.weight
    assert torch.all(a.model.embed_tokens.weight[tok.pad_token_id] == 0)
    assert torch.all(a.model.norm.weight == 1) and torch.all(a.model.layers[1].input_layernorm.weight == 1)
    w = a.model.layers[1].mlp.down_proj.weight
    assert float(w.std()) == pytest.approx(128**-0.5, rel=0.05) and abs(float(w.mean())) < 0.01


def test_compile_each_block_compiles_the_decoder_layers(cfg, monkeypatch):
    """client.compile: exactly the transformer blocks are compiled, each with dynamic shapes
    (torch.compile itself is replaced by a recorder: compiling takes minutes on a CPU)."""
    from fl_llm.model.adapters import compile_each_block

    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compiled.append((self, kw)))
    base, _ = build_base(cfg.model, cfg.seed)
    model = apply_lora(base, cfg.model, cfg.seed)
    compile_each_block(model)
    assert [m for m, _ in compiled] == list(base.model.layers)
    assert all(kw == {"dynamic": True} for _, kw in compiled)


def test_head_lr_and_warmup():
    """client.head_lr moves the classifier head at its own rate (the LoRA factors keep client.lr:
    their first step under AdamW is ±lr whatever the gradient); client.warmup_steps ramps the
    rate linearly over the run's first steps, counted across rounds."""
    import numpy as np

    from fl_llm.client.platform import Platform
    from fl_llm.client.train import warmup_factor
    from fl_llm.config import load, to_dict

    base = ["data.synthetic.train_examples=[80]", "data.synthetic.eval_examples=20", "client.local_steps=1"]
    base += ["model.kind=seq_cls", "data.task=review", "client.lr=0.001", "client.max_grad_norm=0"]
    base += ["client.head_lr=null", "client.warmup_steps=0"]  # not the encoder recipe's: the plain step

    def first_step(*extra):
        plat = Platform(to_dict(load(None, [*base, *extra])), 0)
        return plat.train(plat.initial_adapter(), round_=1)["update"]

    plain, fast = first_step(), first_step("client.head_lr=0.05")
    head = [k for k in plain if ".lora_" not in k]
    lora = [k for k in plain if ".lora_B" in k]
    assert head and lora
    for k in head:  # AdamW's first step is lr·sign(g) on every coordinate with a gradient
        assert np.abs(fast[k]).max() == pytest.approx(50 * np.abs(plain[k]).max(), rel=1e-3)
    for k in lora:
        assert np.allclose(fast[k], plain[k], atol=1e-6)
    warm = first_step("client.warmup_steps=4")
    for k in lora:  # step 1 of a 4-step warm-up: a quarter of the rate
        assert np.abs(warm[k]).max() == pytest.approx(np.abs(plain[k]).max() / 4, rel=1e-3)
    assert [warmup_factor((0, 4), s) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert warmup_factor((20, 4), 0) == 1.0 and warmup_factor((0, 0), 0) == 1.0


def test_initial_adapter_refuses_once_another_adapter_is_loaded():
    """The round-0 adapter is the model's own init only until the platform loads another one: asked
    after training or evaluating, it would hand back that adapter as the "init" (a local-only arm
    started from it would silently be the federated model fine-tuned). It says so instead."""
    import numpy as np

    from fl_llm.client.platform import Platform
    from fl_llm.config import load, to_dict

    cfg = load(None, ["data.synthetic.train_examples=[40]", "data.synthetic.eval_examples=10", "client.local_steps=1"])
    plat = Platform(to_dict(cfg), 0)
    init = plat.initial_adapter()
    again = plat.initial_adapter()
    assert init.keys() == again.keys() and all(np.array_equal(init[k], again[k]) for k in init)
    moved = {k: v + 0.5 for k, v in init.items()}
    plat.evaluate(moved)
    with pytest.raises(RuntimeError, match="init is gone"):
        plat.initial_adapter()
    fresh = Platform(to_dict(cfg), 0)  # a new platform of the same seed still gives the init
    assert all(np.array_equal(fresh.initial_adapter()[k], init[k]) for k in init)


def test_platform_implements_the_remote_api_exactly():
    """Every method of the typed remote API exists on Platform with the same parameters and
    defaults; the contract, not the implementation, is what a backend accepts."""
    import inspect

    from fl_llm.client.api import REMOTE, PlatformAPI, remote_name
    from fl_llm.client.platform import Platform

    assert REMOTE == {
        "describe", "initial_adapter", "train", "evaluate", "commit", "save_state", "load_state", "save_personal",
        "secagg_advertise", "secagg_share", "secagg_reveal",
    }  # fmt: skip
    for name in REMOTE:
        want = inspect.signature(getattr(PlatformAPI, name))
        got = inspect.signature(getattr(Platform, name))
        ours = [(p.name, p.default) for p in got.parameters.values() if not p.name.startswith("_ray")]  # Ray's tracing
        assert ours == [(p.name, p.default) for p in want.parameters.values()], name
        assert remote_name(getattr(PlatformAPI, name)) == name
    with pytest.raises(ValueError):
        remote_name(Platform.train)  # the implementation is not the contract
