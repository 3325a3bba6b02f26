"""Task registry: how a record becomes a prompt and an answer, and how predictions are scored.

A task is a plain value: a prompt template over the record's fields, a verbalizer (the answer
text for each label), the metrics it reports and the one that headlines it. A causal LM is scored
by the probability it gives each answer's first token at the end of the prompt (p("Yes") for a
yes/no task); a sequence classifier by its class probabilities. Templates and answer words can be
replaced from the config (`data.template`, `data.verbalizer`); add a task by registering another
`Task` in `TASKS`.

`instruction` is the generative one: its records are conversations (`fl_llm.data.chat`), it
trains on every assistant turn and is judged by what the model generates (`fl_llm.text_metrics`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from fl_llm.metrics import average_precision, binary_metrics, macro_f1, ranking_metrics, recall_at_fpr, roc_auc


def _recommendation_metrics(labels, scores, groups=None) -> dict[str, float]:
    out = binary_metrics(labels, scores)
    if groups is not None:
        out.update(ranking_metrics(labels, scores, groups, ks=(1, 3)))
    return out


def _fraud_metrics(labels, scores, groups=None) -> dict[str, float]:
    return {
        "pr_auc": average_precision(labels, scores),
        "recall@1%fpr": recall_at_fpr(labels, scores, 0.01),
        "auc": roc_auc(labels, scores),
    }


def _review_metrics(labels, scores, groups=None) -> dict[str, float]:
    s = np.asarray(scores)
    pred = (s >= 0.5).astype(int) if s.ndim == 1 else s.argmax(1)
    k = 2 if s.ndim == 1 else s.shape[1]
    out = {"accuracy": float((pred == np.asarray(labels)).mean()), "macro_f1": macro_f1(labels, pred, k)}
    if s.ndim == 1:
        out["auc"] = roc_auc(labels, s)
    return out


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    template: str
    verbalizer: tuple[str, ...]  # answer text for label 0, 1, ...
    metrics: Callable[..., dict[str, float]]
    primary: str  # the metric that headlines progress lines and comparisons
    label_field: str = "label"
    generative: bool = False  # conversations judged by generation (no template, no verbalizer)

    def prompt(self, record: dict) -> str:
        return self.template.format(**record)

    def answer(self, record: dict) -> str:
        return self.verbalizer[int(record[self.label_field])]

    def fields(self) -> list[str]:
        import string

        return [f for _, f, _, _ in string.Formatter().parse(self.template) if f]


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task(
            name="recommendation",
            description="will this customer like the candidate item? yes/no from liked and disliked history "
            "(AUC; HR@K, NDCG@K over candidate lists)",
            template="Customer liked: {liked}. Disliked: {disliked}. Candidate: {candidate}. "
            "Will the customer like the candidate? Answer:",
            verbalizer=(" No", " Yes"),
            metrics=_recommendation_metrics,
            primary="auc",
        ),
        Task(
            name="ctr",
            description="will this user click this ad? yes/no from user, ad and context (AUC, log loss)",
            template="User: {user}. Context: {context}. Ad: {ad}. Will the user click the ad? Answer:",
            verbalizer=(" No", " Yes"),
            metrics=binary_metrics,
            primary="auc",
        ),
        Task(
            name="fraud",
            description="is this transaction fraud? yes/no from transaction and account history "
            "(PR-AUC, recall at 1% FPR)",
            template="Account: {account}. Transaction: {transaction}. Is this fraud? Answer:",
            verbalizer=(" No", " Yes"),
            metrics=_fraud_metrics,
            primary="pr_auc",
        ),
        Task(
            name="review",
            description="is this product review positive? from the review text (accuracy, macro-F1)",
            template="Review of {item}: {review}. Is the review positive? Answer:",
            verbalizer=(" No", " Yes"),
            metrics=_review_metrics,
            primary="macro_f1",
        ),
        Task(
            name="instruction",
            description="answer the conversation's last turn (chat messages, Alpaca or prompt/completion records); "
            "judged by generation: exact match, token F1, ROUGE-L, chrF, and loss / perplexity of the references",
            template="",
            verbalizer=(),
            metrics=lambda *a, **k: {},
            primary="exact_match",
            generative=True,
        ),
    )
}


def resolve_task(name: str, template: str | None = None, verbalizer: list[str] | None = None) -> Task:
    """The registered task, with the config's template and answer words if given."""
    task = TASKS[name]
    if template:
        task = replace(task, template=template)
    if verbalizer:
        task = replace(task, verbalizer=tuple(verbalizer))
    return task
