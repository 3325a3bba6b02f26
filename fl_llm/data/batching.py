"""Tokenize prompt + answer, pad on the left, and keep the loss to the answer tokens (for a
conversation: to every assistant turn, `fl_llm.data.chat`).

Prompt and answer are tokenized separately and concatenated, so the answer's first token is
always the verbalizer's own token (no merge across the boundary) and the score position — the last
prompt token — is known exactly. Long prompts are cut from the left: the question at the end of
the template matters more than the oldest history.

Batches are padded on the left so that every row's answer sits at the end. The model then only
has to project the last `keep` positions onto the vocabulary (`logits_to_keep`): for a short
answer that is a few positions instead of the whole sequence, which on a large vocabulary is most
of the memory and much of the time of a step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fl_llm.data.tasks import Task

IGNORE = -100


@dataclass
class Encoded:
    """A split, tokenized once: one row per example."""

    input_ids: list[np.ndarray]  # prompt + answer token ids (causal LM) or the prompt (classifier)
    answer_len: np.ndarray  # answer tokens at the end of each row (0 for a classifier)
    labels: np.ndarray  # the task label of each row
    groups: np.ndarray | None = None  # candidate-list id of each row, for ranking metrics
    kind: str = "causal_lm"
    # Conversations (`fl_llm.data.chat`): which tokens of each row are trained on (every assistant
    # turn); None: the last `answer_len` tokens. Then `answer_len` counts from the last turn's start.
    target_mask: list[np.ndarray] | None = None
    # Held-out conversations: the prompt of each row's last assistant turn (generation input), the
    # reference answer text and its tags (chat.record_tags) for per-tag metrics.
    prompts: list[np.ndarray] | None = None
    references: list[str] | None = None
    tags: list[tuple[str, ...]] | None = None

    def __len__(self) -> int:
        return len(self.input_ids)

    def targets(self, i: int) -> np.ndarray:
        """Positions of row `i`'s trained tokens (each predicted from the position before it)."""
        if self.target_mask is not None:
            return np.flatnonzero(self.target_mask[i])
        n = len(self.input_ids[i])
        return np.arange(n - int(self.answer_len[i]), n)


def answer_token_ids(task: Task, tokenizer) -> list[int]:
    """First token of each verbalizer answer: what the model is scored on."""
    ids = [tokenizer(a, add_special_tokens=False)["input_ids"][0] for a in task.verbalizer]
    if len(set(ids)) != len(ids):
        raise ValueError(f"task {task.name!r}: answers {task.verbalizer} share a first token; pick distinct words")
    return ids


def _groups(records: list[dict]) -> np.ndarray | None:
    return np.asarray([r["group"] for r in records]) if records and "group" in records[0] else None


def encode_classifier(records: list[dict], task: Task, tokenizer, max_length: int) -> Encoded:
    """Prompt only, with the tokenizer's special tokens ([CLS] ... [SEP]); cut from the left."""
    tokenizer.truncation_side = "left"
    prompts = tokenizer(
        [task.prompt(r) for r in records], add_special_tokens=True, truncation=True, max_length=max_length
    )["input_ids"]
    rows = [np.asarray(p, dtype=np.int64) for p in prompts]
    labels = np.asarray([int(r[task.label_field]) for r in records], dtype=np.int64)
    return Encoded(rows, np.zeros(len(rows), dtype=np.int64), labels, _groups(records), "seq_cls")


def encode(
    records: list[dict], task: Task, tokenizer, max_length: int, kind: str = "causal_lm", first_token: bool = False
) -> Encoded:
    """Prompt + answer token ids per record (the prompt cut from the left to fit max_length);
    `first_token`: only the answer's first token, the one a verbalizer loss scores."""
    if kind == "seq_cls":
        return encode_classifier(records, task, tokenizer, max_length)
    prompts = tokenizer([task.prompt(r) for r in records], add_special_tokens=False)["input_ids"]
    answers = tokenizer([task.answer(r) for r in records], add_special_tokens=False)["input_ids"]
    if first_token:
        answers = [a[:1] for a in answers]
    rows, alen = [], []
    for p, a in zip(prompts, answers):
        keep = max(1, max_length - len(a))
        rows.append(np.asarray(p[-keep:] + a, dtype=np.int64))
        alen.append(len(a))
    labels = np.asarray([int(r[task.label_field]) for r in records], dtype=np.int64)
    return Encoded(rows, np.asarray(alen, dtype=np.int64), labels, _groups(records))


def left_pad(rows: list[np.ndarray], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(input ids, attention mask) of `rows` padded on the left to the longest: every row ends
    at the last column (where its answer is, or where generation continues)."""
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for j, r in enumerate(rows):
        ids[j, width - len(r) :] = r
        mask[j, width - len(r) :] = 1
    return ids, mask


def collate(enc: Encoded, idx: np.ndarray, pad_id: int) -> dict[str, np.ndarray]:
    """Left-padded batch of rows `idx` (right-padded, with class targets, for a classifier).

    Returns model inputs (input_ids, attention_mask, position_ids restarting at each row's first
    real token), `keep` (how many final positions need logits), `targets` (keep-wide next-token
    targets, IGNORE outside the answer) and `score_idx` (window index of the last prompt token).
    """
    rows = [enc.input_ids[i] for i in idx]
    width = max(len(r) for r in rows)
    if enc.kind == "seq_cls":
        ids = np.full((len(rows), width), pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for j, r in enumerate(rows):
            ids[j, : len(r)] = r
            mask[j, : len(r)] = 1
        return {"input_ids": ids, "attention_mask": mask, "targets": enc.labels[idx]}
    alen = enc.answer_len[idx]
    spans = [enc.targets(int(i)) for i in idx]
    # The window holds every trained position: from the earliest target of any row to the end.
    keep = max(len(r) - int(t[0]) if len(t) else int(a) for r, t, a in zip(rows, spans, alen)) + 1
    ids, mask = left_pad(rows, pad_id)
    targets = np.full((len(rows), keep), IGNORE, dtype=np.int64)
    for j, (r, t) in enumerate(zip(rows, spans)):
        # window position m predicts the row's token t = len(r) - keep + m + 1
        targets[j, keep - len(r) + t - 1] = r[t]
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "position_ids": positions,
        "keep": keep,
        "targets": targets,
        "score_idx": keep - 1 - alen,
    }


def pack(enc: Encoded, idx: np.ndarray, pad_id: int, row_len: int) -> dict[str, np.ndarray]:
    """The examples `idx` packed into as few rows of at most `row_len` tokens as first-fit
    decreasing finds, instead of one padded row each: short, uneven e-commerce prompts then fill
    the sequence instead of padding it.

    No attention crosses an example boundary: position ids restart at 0 for every example (and
    for the padding at a row's end), and with no attention mask transformers turns those restarts
    into a block-diagonal causal mask (sdpa / flex) or varlen flash-attention. Returns model
    inputs (input_ids, position_ids) and the answer targets as flat lists — `rows`, `cols` of
    each predicting position and its `targets` token — so that only those positions ever meet the
    vocabulary projection (the memory-saving loss for large vocabularies).
    """
    if enc.kind != "causal_lm":
        raise ValueError("packing applies to causal LM examples")
    order = sorted((int(i) for i in idx), key=lambda i: -len(enc.input_ids[i]))
    bins: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = len(enc.input_ids[i])
        slot = next((b for b in range(len(bins)) if free[b] >= n), None)
        if slot is None:
            bins.append([i])
            free.append(row_len - n)
        else:
            bins[slot].append(i)
            free[slot] -= n
    width = max(row_len - f for f in free)
    ids = np.full((len(bins), width), pad_id, dtype=np.int64)
    positions = np.zeros((len(bins), width), dtype=np.int64)
    rows, cols, targets = [], [], []
    for r, members in enumerate(bins):
        c = 0
        for i in members:
            tokens, n, t = enc.input_ids[i], len(enc.input_ids[i]), enc.targets(i)
            ids[r, c : c + n] = tokens
            positions[r, c : c + n] = np.arange(n)
            rows.extend([r] * len(t))  # position c+t-1 predicts the example's token t
            cols.extend((c + t - 1).tolist())
            targets.extend(tokens[t].tolist())
            c += n
        positions[r, c:] = np.arange(width - c)  # the padding: a segment of its own, no targets
    return {
        "input_ids": ids,
        "position_ids": positions,
        "rows": np.asarray(rows, dtype=np.int64),
        "cols": np.asarray(cols, dtype=np.int64),
        "targets": np.asarray(targets, dtype=np.int64),
    }


def flatten(enc: Encoded, idx: np.ndarray) -> dict[str, np.ndarray]:
    """The examples `idx` end to end in ONE sequence — no padding at all — for attention that
    keeps each example to itself (`fl_llm.model.attention`): `cu_seq_lens` are the examples'
    cumulative bounds (0, n₁, n₁+n₂, …) and `max_length` the longest; position ids restart per
    example; answer targets as flat `rows` / `cols` / `targets`, as in `pack`."""
    if enc.kind != "causal_lm":
        raise ValueError("packing applies to causal LM examples")
    members = [int(i) for i in idx]
    lengths = [len(enc.input_ids[i]) for i in members]
    ids = np.concatenate([enc.input_ids[i] for i in members])[None].astype(np.int64)
    positions = np.concatenate([np.arange(n) for n in lengths])[None].astype(np.int64)
    cols, targets, c = [], [], 0
    for i, n in zip(members, lengths):
        tokens, t = enc.input_ids[i], enc.targets(i)
        cols.extend((c + t - 1).tolist())
        targets.extend(tokens[t].tolist())
        c += n
    return {
        "input_ids": ids,
        "position_ids": positions,
        "cu_seq_lens": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32),
        "max_length": max(lengths),
        "rows": np.zeros(len(cols), dtype=np.int64),
        "cols": np.asarray(cols, dtype=np.int64),
        "targets": np.asarray(targets, dtype=np.int64),
    }
