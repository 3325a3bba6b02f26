"""A platform's data as it trains on it, and aggregate facts of it, computed where the data is:
both splits encoded, the label balance and its warnings, text its tokenizer cannot read, and the
sampling rate and noise of its DP-SGD (they depend on its data size)."""

from __future__ import annotations

import numpy as np

from fl_llm.config import RunConfig

MIN_PER_CLASS = 20  # fewer rows of a class in a split than this gets a warning at start
MAX_UNKNOWN_SHARE = 0.05  # more of a platform's training tokens unknown to the tokenizer gets one


def encode_splits(cfg: RunConfig, task, tokenizer, data):
    """(train set, held-out set, answer token ids, verbalizer-loss token ids or None) of a
    platform's records: prompt + answer rows for a yes/no task (the answer words scored by
    probability), conversations for the instruction task (every assistant turn trained; the
    eval.choices scored by probability)."""
    from fl_llm.data.batching import answer_token_ids, encode
    from fl_llm.data.chat import choice_token_ids, encode_chat

    max_len, kind = cfg.model.max_length, cfg.model.kind
    if task.generative:
        choices, room = cfg.eval.choices, cfg.eval.max_new_tokens
        train = encode_chat(data.train, tokenizer, max_len, choices=choices)
        held = encode_chat(data.eval, tokenizer, max_len, prompt_room=room, choices=choices)
        return train, held, choice_token_ids(choices, tokenizer), None
    answer_ids = answer_token_ids(task, tokenizer) if kind == "causal_lm" else []
    verbalizer = cfg.client.loss == "verbalizer"
    train = encode(data.train, task, tokenizer, max_len, kind, first_token=verbalizer)
    held = encode(data.eval, task, tokenizer, max_len, kind, first_token=verbalizer)
    return train, held, answer_ids, answer_ids if verbalizer else None


def record_level_dp(cfg: RunConfig, num_train: int) -> tuple[float, float]:
    """(q, z) of a platform's DP-SGD: q = batch / |data|; z as configured, or the smallest z that
    keeps the platform within privacy.target_epsilon after every local step of every round.
    (0, 0) without record-level DP."""
    if cfg.privacy.dp.level != "record":
        return 0.0, 0.0
    from fl_llm.privacy.accountant import Mechanism, calibrate

    p, c = cfg.privacy, cfg.client
    q = min(1.0, c.batch_size / num_train)
    if p.dp.noise_multiplier is not None:
        return q, p.dp.noise_multiplier
    steps = cfg.server.rounds * c.local_steps
    return q, calibrate(p.target_epsilon, p.delta, steps, Mechanism(1.0, q), p.dp.accountant)


def balance_warnings(name: str, answers: list[str], train_labels, eval_labels) -> list[str]:
    """A split with one class, or fewer than MIN_PER_CLASS rows of a class, makes its metrics
    meaningless (AUC undefined) or its training one-sided: said at start, in one line each."""
    out = []
    k = len(answers)
    for split, labels in (("training", train_labels), ("held-out", eval_labels)):
        counts = np.bincount(labels, minlength=k)
        if (counts > 0).sum() < 2:
            only = answers[int(np.argmax(counts))].strip()
            out.append(f"{name}: its {split} split holds one class only ({only!r}, {int(counts.max())} rows)")
        elif counts.min() < MIN_PER_CLASS:
            few = answers[int(np.argmin(counts))].strip()
            out.append(
                f"{name}: its {split} split has only {int(counts.min())} rows of {few!r} "
                f"(fewer than {MIN_PER_CLASS}: its metrics will be noisy)"
            )
    return out


def unknown_token_warning(name: str, tokenizer, rows) -> str | None:
    """A tokenizer with a fixed vocabulary maps characters it does not know to one unknown token:
    an English encoder reads most Chinese characters as [UNK], so the model sees blanks where the
    text was and learns little, whatever the recipe. Said at start when more than
    MAX_UNKNOWN_SHARE of a platform's training tokens (special tokens aside) are unknown; byte-level
    tokenizers (the built-in one, most LLMs') have no unknown token and never warn."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None or not rows:
        return None
    special = np.asarray(sorted(set(tokenizer.all_special_ids) - {unk}), dtype=np.int64)
    every = max(1, len(rows) // 2000)  # a large split: 2,000 rows spread over it tell the share
    ids = np.concatenate([np.asarray(r, dtype=np.int64) for r in rows[::every]])
    text = ids[~np.isin(ids, special)]
    share = float((text == unk).mean()) if len(text) else 0.0
    if share <= MAX_UNKNOWN_SHARE:
        return None
    return (
        f"{name}: {share:.0%} of its training tokens are unknown to the model's tokenizer "
        f"({tokenizer.unk_token}): the model reads them as blanks and will learn little from this text; "
        "use a model whose vocabulary covers its language (model.name_or_path)"
    )
