"""The built-in offline tokenizer: byte-level BPE that reads English and Chinese alike.

Byte-level means no text is ever unknown: every UTF-8 byte has a token, so Chinese reviews,
emoji and prices all encode. The merges were learned once from e-commerce text (synthetic
prompts, English recommendation prompts, Chinese product reviews) and ship inside the package as
`builtin_tokenizer.json`, so no process ever downloads or re-trains it and every platform has the
identical vocabulary. Its chat template is `fl_llm.data.chat.DEFAULT_CHAT_TEMPLATE`.

Rebuild it (only when changing the corpus; the file is committed):

    python -m fl_llm.model.tokenizer [DATA_DIR]    # DATA_DIR: the public data sets' folder
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

TOKENIZER_FILE = Path(__file__).with_name("builtin_tokenizer.json")
SPECIAL_TOKENS = {"pad_token": "<|pad|>", "bos_token": "<|bos|>", "eos_token": "<|eos|>", "unk_token": "<|unk|>"}
VOCAB_SIZE = 8192


def load_builtin_tokenizer():
    """A `PreTrainedTokenizerFast` from the shipped file; works offline."""
    from transformers import PreTrainedTokenizerFast

    from fl_llm.data.chat import DEFAULT_CHAT_TEMPLATE

    tok = PreTrainedTokenizerFast(tokenizer_file=str(TOKENIZER_FILE), **SPECIAL_TOKENS)
    tok.padding_side = "right"
    tok.chat_template = DEFAULT_CHAT_TEMPLATE  # conversations (data.task=instruction)
    return tok


def _corpus(shared_data: Path | None):
    from fl_llm.data.synthetic import make_world, recommendation_records

    world = make_world(0, 6)
    for p in range(world.num_platforms):
        for r in recommendation_records(world, p, 400, liked=3, disliked=2, split="train"):
            yield f"Liked: {r['liked']}. Disliked: {r['disliked']}. Candidate: {r['candidate']}. Yes No"
    if shared_data is None:
        return
    for name in ("movie_valid.json", "book_valid.json"):
        path = shared_data / "tallrec" / name
        if path.exists():
            for row in json.loads(path.read_text(encoding="utf-8")):
                yield f"{row['instruction']} {row['input']} {row['output']}"
    reviews = shared_data / "online_shopping_10_cats" / "online_shopping_10_cats.csv.gz"
    if reviews.exists():
        with gzip.open(reviews, "rt", encoding="utf-8") as f:
            for i, line in enumerate(f):
                if i % 3 == 0:
                    yield line
    credit = shared_data / "uci_credit_default" / "uci_credit_default.csv.gz"
    if credit.exists():
        with gzip.open(credit, "rt", encoding="utf-8") as f:
            for i, line in enumerate(f):
                if i > 2000:
                    break
                yield line.replace(",", " ")


def build(shared_data: Path | None, out: Path = TOKENIZER_FILE) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=3,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(shared_data), trainer=trainer)
    tok.save(str(out))
    print(f"wrote {out} ({tok.get_vocab_size()} tokens)")


if __name__ == "__main__":
    build(Path(sys.argv[1]) if len(sys.argv) > 1 else None)
