"""How close a generated answer is to its reference: exact match, token F1, ROUGE-L and chrF.

Text is compared after the same normalisation everywhere (Unicode NFKC, case folded, runs of
white space as one space, ends stripped). Tokens are words in Latin script and single characters
in Chinese, Japanese and Korean script, where words are not separated by spaces — so token F1
and ROUGE-L read Chinese character by character. ROUGE-L is the `rouge-score` package's (Lin,
"ROUGE", 2004; F-measure of the longest common subsequence, averaged over answers) with that
tokenizer; chrF is sacrebleu's corpus chrF (Popović, WMT 2015; character n-grams, so it needs no
word boundaries). Token F1 is the bag-of-tokens F1 of SQuAD (Rajpurkar et al., EMNLP 2016).
All four are in [0, 1].
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter

# CJK ideographs, kana, hangul and full-width forms: one token per character
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
_TOKEN = re.compile(rf"[{_CJK}]|[^\W{_CJK}]+", re.UNICODE)


def normalize(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def tokens(text: str) -> list[str]:
    """Words in Latin script, single characters in CJK script; punctuation dropped."""
    return _TOKEN.findall(normalize(text))


class _Tokenizer:
    """The `rouge-score` tokenizer interface over `tokens`."""

    def tokenize(self, text: str) -> list[str]:
        return tokens(text)


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


def token_f1(prediction: str, reference: str) -> float:
    p, r = tokens(prediction), tokens(reference)
    if not p or not r:
        return float(p == r)
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def text_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean exact match, token F1 and ROUGE-L over the pairs, and corpus chrF (all in [0, 1])."""
    from rouge_score import rouge_scorer
    from sacrebleu.metrics import CHRF

    if not predictions:
        return {}
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_Tokenizer())
    n = len(predictions)
    chrf = CHRF().corpus_score([normalize(p) for p in predictions], [[normalize(r) for r in references]])
    return {
        "exact_match": sum(exact_match(p, r) for p, r in zip(predictions, references)) / n,
        "token_f1": sum(token_f1(p, r) for p, r in zip(predictions, references)) / n,
        "rouge_l": sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)) / n,
        "chrf": chrf.score / 100.0,
    }


def by_tag(predictions: list[str], references: list[str], tags: list[tuple[str, ...]]) -> dict[str, float]:
    """`text_metrics` over all pairs, and exact match and token F1 per tag (`exact_match/<tag>`);
    each pair may carry several tags (a skill, a scope, a language). A tag that narrows another
    (`return_other/zh`) gets exact match only: it is there to show which answers a model gets wrong."""
    out = text_metrics(predictions, references)
    for tag in sorted({t for ts in tags for t in ts}):
        pairs = [(p, r) for p, r, ts in zip(predictions, references, tags) if tag in ts]
        out[f"exact_match/{tag}"] = sum(exact_match(p, r) for p, r in pairs) / len(pairs)
        if "/" not in tag:
            out[f"token_f1/{tag}"] = sum(token_f1(p, r) for p, r in pairs) / len(pairs)
    return out
