"""Conversations: record shapes, chat-template rendering, the loss mask (assistant tokens only, every
turn), packed = padded losses on conversations, and the generation metrics against the libraries."""

from __future__ import annotations

import numpy as np
import pytest

from fl_llm.data.batching import IGNORE, collate, flatten, pack
from fl_llm.data.chat import encode_chat, generation_prompt, segments, to_messages
from fl_llm.errors import UserError

CONVERSATION = [
    {"role": "system", "content": "You are the shopping assistant of gadget-hub."},
    {"role": "user", "content": "What is the brand?"},
    {"role": "assistant", "content": "Orbit"},
    {"role": "user", "content": "And the color?"},
    {"role": "assistant", "content": "red"},
]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tok():
    from fl_llm.model.tokenizer import load_builtin_tokenizer

    return load_builtin_tokenizer()


def test_three_record_shapes_become_messages():
    alpaca = to_messages({"instruction": "Say yes.", "input": "Q", "output": "Yes."})
    assert alpaca == [{"role": "user", "content": "Say yes.\n\nQ"}, {"role": "assistant", "content": "Yes."}]
    no_input = to_messages({"instruction": "Say yes.", "input": "", "output": "Yes."})
    assert no_input[0]["content"] == "Say yes."
    pc = to_messages({"prompt": "2+2?", "completion": "4"})
    assert pc == [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    assert to_messages({"messages": CONVERSATION}) == CONVERSATION
    as_text = to_messages({"messages": '[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]'})
    assert as_text[-1] == {"role": "assistant", "content": "yo"}


@pytest.mark.parametrize(
    "record, says",
    [
        ({"question": "x"}, "needs 'messages'"),
        ({"messages": []}, "non-empty list"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "message 0"),
        ({"messages": [{"role": "user", "content": "x"}]}, "last message must be the assistant"),
        ({"messages": "not json"}, "not JSON"),
    ],
)
def test_bad_records_say_what_is_wrong(record, says):
    with pytest.raises(UserError, match=says):
        to_messages(record, "data file 'a.jsonl', row 3")


def test_builtin_template_renders_the_documented_format(tok):
    text = tok.apply_chat_template(CONVERSATION[:3], tokenize=False)
    assert text == (
        "<|bos|>system\nYou are the shopping assistant of gadget-hub.<|eos|>\n"
        "<|bos|>user\nWhat is the brand?<|eos|>\n<|bos|>assistant\nOrbit<|eos|>\n"
    )


@pytest.mark.parametrize("template", [None, CHATML])
def test_only_assistant_tokens_are_trained_in_every_turn(tok, template):
    import copy

    t = copy.deepcopy(tok)
    if template:
        t.chat_template = template
    enc = encode_chat([{"messages": CONVERSATION}], t, max_length=256)
    ids, mask = enc.input_ids[0], enc.target_mask[0]
    end = "<|im_end|>\n" if template else "<|eos|>\n"
    # the trained tokens, decoded, are exactly the two answers with their end-of-turn markers
    assert t.decode(ids[mask]) == f"Orbit{end}red{end}"
    assert "What is the brand" in t.decode(ids[~mask]) and "Orbit" not in t.decode(ids[~mask])
    # the whole row is the template's own rendering of the conversation
    assert t.decode(ids) == t.apply_chat_template(CONVERSATION, tokenize=False)
    # the generation prompt is everything before the last answer, with the assistant header
    prompt = generation_prompt(t, CONVERSATION, 256)
    assert t.decode(prompt) == t.apply_chat_template(CONVERSATION[:-1], tokenize=False, add_generation_prompt=True)
    assert enc.references == ["red"]


def test_collate_targets_are_the_masked_tokens(tok):
    records = [{"messages": CONVERSATION}, {"messages": CONVERSATION[:3]}, {"prompt": "hi", "completion": "hello"}]
    enc = encode_chat(records, tok, max_length=256)
    batch = collate(enc, np.arange(3), tok.pad_token_id)
    for j in range(3):
        got = batch["targets"][j][batch["targets"][j] != IGNORE]
        np.testing.assert_array_equal(got, enc.input_ids[j][enc.target_mask[j]])
    packed = pack(enc, np.arange(3), tok.pad_token_id, 512)
    assert sorted(packed["targets"].tolist()) == sorted(
        np.concatenate([r[m] for r, m in zip(enc.input_ids, enc.target_mask)]).tolist()
    )


def test_long_conversations_are_cut_from_the_left_keeping_the_last_answer(tok):
    long = [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "the answer"}]
    enc = encode_chat([{"messages": long}], tok, max_length=32)
    assert len(enc.input_ids[0]) == 32
    assert tok.decode(enc.input_ids[0][enc.target_mask[0]]) == "the answer<|eos|>\n"


def test_a_template_that_rewrites_earlier_turns_is_refused(tok):
    import copy

    t = copy.deepcopy(tok)
    # renders the last message only: a conversation is not an extension of its beginning
    t.chat_template = "{{ messages[-1]['content'] }}{% if add_generation_prompt %}>{% endif %}"
    with pytest.raises(UserError, match="extension of its beginning"):
        segments(t, CONVERSATION)


def test_packed_and_padded_conversation_losses_are_equal(tok):
    import torch

    from fl_llm.client.train import _answer_loss, _forward
    from fl_llm.config import load
    from fl_llm.data.instructions import instruction_records
    from fl_llm.data.synthetic import make_world
    from fl_llm.model.adapters import apply_lora
    from fl_llm.model.attention import segments as flat_segments
    from fl_llm.model.build import build_base

    cfg = load(None, ["data.task=instruction"])
    base, tokenizer = build_base(cfg.model, cfg.seed, num_labels=0)
    model = apply_lora(base, cfg.model, cfg.seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    enc = encode_chat(instruction_records(make_world(0, 3), 1, 12, split="train"), tokenizer, 256)
    assert any(m.sum() > 0 and len(r) for r, m in zip(enc.input_ids, enc.target_mask))
    idx = np.arange(12)
    model.eval()
    with torch.no_grad():
        padded = _answer_loss(*_forward(model, collate(enc, idx, tokenizer.pad_token_id), "cpu"), "mean")
        packed = _answer_loss(*_forward(model, pack(enc, idx, tokenizer.pad_token_id, 512), "cpu"), "mean")
        with flat_segments(model):
            flat = _answer_loss(*_forward(model, flatten(enc, idx), "cpu"), "mean")
    assert float(packed) == pytest.approx(float(padded), rel=1e-5)
    assert float(flat) == pytest.approx(float(padded), rel=1e-5)


# --- generation metrics against hand-computed values and the libraries --------------------------


def test_exact_match_and_token_f1_on_known_pairs():
    from fl_llm.text_metrics import exact_match, token_f1

    assert exact_match("  Yes. ", "yes.") == 1.0
    assert exact_match("Yes", "Yes.") == 0.0
    # P = 3/3, R = 3/4 -> F1 = 6/7
    assert token_f1("the cat sat", "the cat sat on") == pytest.approx(6 / 7)
    # Chinese by character: 你好世界 vs 你好 -> P = 2/4, R = 1 -> F1 = 2/3
    assert token_f1("你好世界", "你好") == pytest.approx(2 / 3)
    assert token_f1("Orbit红色手机", "Orbit 红色 手机") == 1.0
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0


def test_rouge_l_and_chrf_match_the_libraries():
    from rouge_score import rouge_scorer
    from sacrebleu.metrics import CHRF

    from fl_llm.text_metrics import text_metrics

    pairs = [("the red phone costs five dollars", "the phone is red and costs five dollars")]
    got = text_metrics([p for p, _ in pairs], [r for _, r in pairs])
    lib = rouge_scorer.RougeScorer(["rougeL"]).score(pairs[0][1], pairs[0][0])["rougeL"].fmeasure
    assert got["rouge_l"] == pytest.approx(lib)
    # LCS "the phone costs five dollars" = 5 tokens; P = 5/6, R = 5/8
    assert got["rouge_l"] == pytest.approx(2 * (5 / 6) * (5 / 8) / (5 / 6 + 5 / 8))
    assert got["chrf"] == pytest.approx(CHRF().sentence_score(pairs[0][0], [pairs[0][1]]).score / 100)
    # Chinese, by character: LCS(我在北京, 我爱北京) = 我北京, P = R = 3/4
    zh = text_metrics(["我在北京"], ["我爱北京"])
    assert zh["rouge_l"] == pytest.approx(0.75)
    assert zh["chrf"] == pytest.approx(CHRF().sentence_score("我在北京", ["我爱北京"]).score / 100)
    assert 0 < zh["chrf"] < 1


def test_metrics_per_skill():
    from fl_llm.text_metrics import by_tag

    got = by_tag(["a", "b", "c"], ["a", "x", "c"], [("title", "shared"), ("title", "shared"), ("policy",)])
    assert got["exact_match"] == pytest.approx(2 / 3)
    assert got["exact_match/title"] == 0.5 and got["exact_match/policy"] == 1.0
    assert got["exact_match/shared"] == 0.5 and got["token_f1/shared"] == 0.5


def test_a_record_is_tagged_by_skill_scope_language_and_policy_fact_in_its_language():
    """A policy fact is reported in its record's language, so a model that gets one window wrong in
    Chinese only shows it; a file's tag columns are kept."""
    from fl_llm.data.chat import conversation_records, record_tags
    from fl_llm.text_metrics import by_tag

    rec = {"skill": "policy", "scope": "own", "lang": "zh", "fact": "return_other"}
    assert record_tags(rec) == ("policy", "own", "zh", "return_other/zh")
    assert record_tags({"skill": "qa"}) == ("qa",) and record_tags({"fact": "shipping"}) == ("shipping",)
    rows = [{"prompt": "q", "completion": "a", "lang": "en", "fact": "warranty", "other": 1}]
    assert record_tags(conversation_records(rows, {}, "f.jsonl")[0]) == ("en", "warranty/en")
    got = by_tag(["7", "30"], ["30", "30"], [("zh", "return_other/zh"), ("en", "return_other/en")])
    assert got["exact_match/return_other/zh"] == 0.0 and got["exact_match/return_other/en"] == 1.0
    assert got["token_f1/zh"] == 0.0 and "token_f1/return_other/zh" not in got
