"""Task registry: how a record becomes a prompt and an answer, and how predictions are scored.

A task is a plain value: a prompt template over the record's fields, a verbalizer (the answer
text for each label) and a metrics function. The model is scored by the probability it gives to
each answer word's first token at the end of the prompt, so a yes/no task yields p(yes) for AUC.
Add a task by registering another `Task` in `TASKS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fl_llm.metrics import binary_metrics


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    template: str
    verbalizer: tuple[str, ...]  # answer text for label 0, 1, ...
    metrics: Callable[..., dict[str, float]]
    label_field: str = "label"

    def prompt(self, record: dict) -> str:
        return self.template.format(**record)

    def answer(self, record: dict) -> str:
        return self.verbalizer[int(record[self.label_field])]


RECOMMENDATION = Task(
    name="recommendation",
    description="will this customer like the candidate item? yes/no from liked and disliked history (AUC)",
    template=(
        "Customer liked: {liked}. Disliked: {disliked}. Candidate: {candidate}. "
        "Will the customer like the candidate? Answer:"
    ),
    verbalizer=(" No", " Yes"),
    metrics=binary_metrics,
)

TASKS: dict[str, Task] = {t.name: t for t in (RECOMMENDATION,)}
