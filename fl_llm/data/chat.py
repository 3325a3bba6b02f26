"""Conversations for supervised fine-tuning: records -> chat messages -> token rows with a loss mask.

Three record shapes become one: chat `messages` (`[{"role", "content"}, ...]`, the Hugging Face
/ OpenAI shape), Alpaca's `instruction` / `input` / `output`, and `prompt` / `completion`. A
conversation is rendered with the tokenizer's own chat template (`apply_chat_template`); a
tokenizer without one gets `DEFAULT_CHAT_TEMPLATE` (the built-in tokenizer ships with it):

    <|bos|>system\\n{content}<|eos|>\\n<|bos|>user\\n{content}<|eos|>\\n<|bos|>assistant\\n{content}<|eos|>\\n

The loss mask comes from rendering the conversation turn by turn: the text an assistant turn
adds to the rendering of everything before it (with the generation prompt) is that turn's
answer — its content and the template's end-of-turn marker, so the model learns to stop. Every
assistant turn of a multi-turn conversation is trained; the prompt text never is. A template
whose rendering of a conversation does not extend the rendering of its beginning (some drop
earlier turns' reasoning) cannot be split this way and is refused with the reason.
"""

from __future__ import annotations

import numpy as np

from fl_llm.data.batching import Encoded
from fl_llm.errors import UserError

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}<|bos|>{{ message['role'] }}\n{{ message['content'] }}<|eos|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|bos|>assistant\n{% endif %}"
)
ROLES = ("system", "user", "assistant")
SHAPES = ("messages", "instruction/input/output", "prompt/completion")


def to_messages(record: dict, where: str = "record", open_ended: bool = False) -> list[dict]:
    """The record's conversation as chat messages: `messages` as given (checked), Alpaca's
    instruction (+ input) as the user turn and output as the assistant's, or prompt/completion.
    `open_ended`: a conversation still to be answered (no final assistant turn) is fine too."""
    if "messages" in record:
        msgs = record["messages"]
        if isinstance(msgs, str):
            import json

            try:
                msgs = json.loads(msgs)
            except ValueError:
                raise UserError(f"{where}: 'messages' is text that is not JSON") from None
        if not isinstance(msgs, list) or not msgs:
            raise UserError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
        out = []
        for k, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise UserError(
                    f"{where}: message {k} must be {{'role': one of {', '.join(ROLES)}, 'content': text}}, got {m!r}"[
                        :300
                    ]
                )
            out.append({"role": m["role"], "content": m["content"]})
        if out[-1]["role"] != "assistant" and not open_ended:
            raise UserError(f"{where}: the last message must be the assistant's answer (role 'assistant')")
        return out
    if open_ended and "instruction" in record and "output" not in record:
        record = {**record, "output": None}
    if open_ended and "prompt" in record and "completion" not in record:
        record = {**record, "completion": None}
    if "instruction" in record and "output" in record:
        user = str(record["instruction"])
        extra = record.get("input")
        if extra is not None and str(extra).strip():
            user = f"{user}\n\n{extra}"
        return _exchange(user, record["output"])
    if "prompt" in record and "completion" in record:
        return _exchange(str(record["prompt"]), record["completion"])
    raise UserError(
        f"{where}: a conversation needs 'messages', or 'instruction' and 'output' (Alpaca), or 'prompt' and "
        f"'completion'; it has {', '.join(map(str, record)) or 'no fields'} (map columns with data.files.columns)"
    )


# A record's optional tags: the generation metrics are also reported per tag. A `fact` is reported
# in its record's language where it has one (`return_other/zh`).
TAG_FIELDS = ("skill", "scope", "lang", "fact")


def record_tags(record: dict) -> tuple[str, ...]:
    """The tags a record's generation metrics are reported under (TAG_FIELDS it has)."""
    tags = [str(record[k]) for k in TAG_FIELDS if k != "fact" and record.get(k)]
    if record.get("fact"):
        tags.append(f"{record['fact']}/{record['lang']}" if record.get("lang") else str(record["fact"]))
    return tuple(tags)


def conversation_records(rows: list[dict], columns: dict, path: str, extra: tuple[str, ...] = ()) -> list[dict]:
    """A file's rows as conversation records: chat messages (`to_messages`; columns renamed by
    data.files.columns, e.g. {messages: conversation}), with the TAG_FIELDS columns where the
    file has them (metrics per tag) and the columns a split needs."""
    rename = {col: field for field, col in columns.items()}
    out = []
    for i, row in enumerate(rows, 1):
        named = {rename.get(k, k): v for k, v in row.items()}
        rec = {"messages": to_messages(named, f"data file {path!r}, row {i}")}
        for tag in TAG_FIELDS:
            if named.get(tag) is not None:
                rec[tag] = str(named[tag])
        for c in extra:
            if c not in row:
                raise UserError(f"data file {path!r}: no column {c!r}; its columns are {', '.join(rows[0])}")
            rec[c] = row[c]
        out.append(rec)
    return out


def _exchange(user: str, answer) -> list[dict]:
    msgs = [{"role": "user", "content": user}]
    return msgs if answer is None else [*msgs, {"role": "assistant", "content": str(answer)}]


def ensure_template(tokenizer) -> None:
    """Give a tokenizer without a chat template the documented default."""
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def segments(tokenizer, messages: list[dict]) -> list[tuple[str, bool]]:
    """The conversation's rendered text in pieces, each (text, trained?): the assistant turns'
    answers are trained, everything else is prompt. The pieces concatenate to the template's
    rendering of the whole conversation."""
    pieces: list[tuple[str, bool]] = []
    done = ""
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:k], True) if k else ""
        upto = _render(tokenizer, messages[: k + 1], False)
        if not before.startswith(done) or not upto.startswith(before):
            raise UserError(
                "the tokenizer's chat template does not render a conversation as an extension of its beginning, "
                "so its assistant turns cannot be told apart; use a template that does (e.g. "
                "fl_llm.data.chat.DEFAULT_CHAT_TEMPLATE)"
            )
        pieces.append((before[len(done) :], False))
        pieces.append((upto[len(before) :], True))
        done = upto
    rest = _render(tokenizer, messages, False)[len(done) :]
    if rest:
        pieces.append((rest, False))
    return pieces


def encode_conversation(tokenizer, messages: list[dict], max_length: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(token ids, trained-token mask, tokens from the last assistant turn's start to the end),
    cut from the left to `max_length` (the last answer matters most)."""
    ids: list[int] = []
    mask: list[bool] = []
    last_start = 0
    for text, trained in segments(tokenizer, messages):
        tokens = _ids(tokenizer, text)
        if trained:
            last_start = len(ids)
        ids.extend(tokens)
        mask.extend([trained] * len(tokens))
    cut = max(0, len(ids) - max_length)
    ids_arr = np.asarray(ids[cut:], dtype=np.int64)
    mask_arr = np.asarray(mask[cut:], dtype=bool)
    if len(mask_arr):
        mask_arr[0] = False  # nothing precedes the first token to predict it from
    return ids_arr, mask_arr, len(ids) - max(last_start, cut)


def generation_prompt(tokenizer, messages: list[dict], max_length: int) -> np.ndarray:
    """Token ids the model continues to answer the conversation: everything before its last
    assistant turn (the whole conversation when it ends with the user), with the template's
    generation prompt, cut from the left to `max_length`."""
    last = len(messages) - 1 if messages[-1]["role"] == "assistant" else len(messages)
    ids = _ids(tokenizer, _render(tokenizer, messages[:last], True))
    return np.asarray(ids[-max_length:], dtype=np.int64)


def record_messages(record: dict, k: int) -> list[dict]:
    """A loaded record's conversation (record `k`, from 1): its `messages` as read, else its Alpaca
    or prompt/completion fields as messages — how a platform reads its held-out conversations."""
    return record["messages"] if "messages" in record else to_messages(record, f"record {k}")


def encode_chat(
    records: list[dict], tokenizer, max_length: int, prompt_room: int = 0, choices: list[str] = ()
) -> Encoded:
    """Conversations as rows trained on every assistant turn; with each row's generation prompt
    (at most max_length - `prompt_room` tokens), reference answer (the last assistant turn) and
    tags (`record_tags`) for generation-based evaluation. The label of a row is
    the index of its reference among `choices` (-1: none of them; 0 without choices)."""
    from fl_llm.text_metrics import normalize

    choice_of = {normalize(c): k for k, c in enumerate(choices)}
    ensure_template(tokenizer)
    rows, masks, alen, prompts, refs, tags, labels = [], [], [], [], [], [], []
    for i, r in enumerate(records):
        msgs = record_messages(r, i + 1)
        ids, mask, a = encode_conversation(tokenizer, msgs, max_length)
        rows.append(ids)
        masks.append(mask)
        alen.append(a)
        prompts.append(generation_prompt(tokenizer, msgs, max(8, max_length - prompt_room)))
        refs.append(msgs[-1]["content"])
        tags.append(record_tags(r))
        labels.append(choice_of.get(normalize(refs[-1]), -1) if choices else 0)
    return Encoded(
        rows,
        np.asarray(alen, dtype=np.int64),
        np.asarray(labels, dtype=np.int64),
        target_mask=masks,
        prompts=prompts,
        references=refs,
        tags=tags,
    )


def choice_token_ids(choices: list[str], tokenizer) -> list[int]:
    """First token of each of `eval.choices` (the answers also scored by probability)."""
    if not choices:
        return []
    ids = [tokenizer(c, add_special_tokens=False)["input_ids"][0] for c in choices]
    if len(set(ids)) != len(ids):
        raise UserError(f"eval.choices {choices} share a first token; pick answers that start differently")
    return ids
