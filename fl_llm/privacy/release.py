"""What a platform's answers carry to the driver, by privacy mode — and what it keeps in its own log.

Under differential privacy nothing computed from a platform's private training records may leave
it un-noised: the noised update (record level) and its DP-SGD step count do; its training loss,
gradient norms, clipped fraction, realised batch sizes, token counts, label balance and peak
memory (a function of its records' lengths) stay in the platform's own log
(`<state dir>/metrics.jsonl`), which the driver never reads. Under client-level DP the update
itself is noised only on the driver, so even the step count stays home (with a sampled cohort
under secure aggregation it would say whether the platform joined the round).

Held-out evaluation metrics are released in every mode: they are computed on the held-out split,
which training never touches and DP does not cover (docs/privacy.md, "Threat model").
"""

from __future__ import annotations

import json
from pathlib import Path

# train(): the metrics a platform sends, by privacy.dp.level (None: all of them)
TRAIN_METRICS = {
    "none": None,
    "record": ("steps", "dp_steps", "train_seconds", "worker"),
    "client": ("worker",),
}
# describe(): statistics of the training records, withheld under DP (sizes are declared metadata)
DESCRIBE_WITHHELD = ("label_counts", "train_positive_rate", "warnings")
# train(): answer keys withheld under DP (secagg_clipped: the share of the update's values beyond
# the fixed-point range, a statistic of the un-noised update)
ANSWER_WITHHELD = ("secagg_clipped",)


def release(answer: dict, level: str, log: Path | None, round_: int, call: str) -> dict:
    """`answer` as the driver may see it under `level`; what is held back goes to `log`."""
    if level == "none":
        return answer
    out, kept = dict(answer), {}
    if call == "train":
        allowed = TRAIN_METRICS[level]
        metrics = out.get("metrics", {})
        out["metrics"] = {k: v for k, v in metrics.items() if k in allowed}
        kept.update({k: v for k, v in metrics.items() if k not in allowed})
        kept.update({k: out.pop(k) for k in ANSWER_WITHHELD if k in out})
    elif call == "describe":
        kept.update({k: out.pop(k) for k in DESCRIBE_WITHHELD if k in out})
    if log is not None and kept:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a", encoding="utf-8") as f:
            f.write(json.dumps({"round": round_, "call": call, **kept}, default=float) + "\n")
    return out
