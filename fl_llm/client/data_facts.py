"""Aggregate facts of a platform's data, computed where the data is: the label balance and its
warnings, and the sampling rate and noise of its DP-SGD (they depend on its data size)."""

from __future__ import annotations

import numpy as np

from fl_llm.config import RunConfig

MIN_PER_CLASS = 20  # fewer rows of a class in a split than this gets a warning at start


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
