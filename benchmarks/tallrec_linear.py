"""How much a linear model finds in TALLRec's prompts: TF-IDF (words and word pairs) + logistic
regression, trained on one domain's prompts (local) or on both domains' (pooled), scored by AUC
on each domain's full test file with a 95% bootstrap interval (200 resamples, seed 0).

    python benchmarks/tallrec_linear.py DATA_DIR     # DATA_DIR holds {movie,book}_{valid,test}.json

If pooling the other domain's prompts does not help a model that sees every word, federating them
cannot be expected to either; and if a few hundred prompts give AUC near 0.5, the task is not
learnable at that size by the route being compared.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score


def read(path: Path) -> tuple[list[str], np.ndarray]:
    rows = json.loads(path.read_text(encoding="utf-8"))
    return [r["input"] for r in rows], np.array([r["output"].startswith("Yes") for r in rows], dtype=int)


def fit_and_score(train: list[tuple[list[str], np.ndarray]], test, rows: int | None) -> tuple[float, float, float]:
    texts = [t for x, _ in train for t in x[:rows]]
    labels = np.concatenate([y[:rows] for _, y in train])
    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    model = LogisticRegression(C=1.0, max_iter=2000).fit(vec.fit_transform(texts), labels)
    p = model.predict_proba(vec.transform(test[0]))[:, 1]
    rng, boot = np.random.default_rng(0), []
    for _ in range(200):
        i = rng.integers(0, len(p), len(p))
        if len(set(test[1][i])) == 2:
            boot.append(roc_auc_score(test[1][i], p[i]))
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return roc_auc_score(test[1], p), lo, hi


def main(data_dir: str) -> None:
    d = Path(data_dir)
    sets = {k: (read(d / f"{k}_valid.json"), read(d / f"{k}_test.json")) for k in ("movie", "book")}
    for k, ((_, y_train), (_, y_test)) in sets.items():
        print(
            f"{k}: {len(y_train)} training prompts ({y_train.mean():.2f} yes), {len(y_test)} test ({y_test.mean():.2f} yes)"
        )
    print(f"{'domain':<7} {'training rows':<14} {'local AUC':<24} pooled AUC")
    for rows in (400, None):
        for k in sets:
            local = fit_and_score([sets[k][0]], sets[k][1], rows)
            pooled = fit_and_score([sets["movie"][0], sets["book"][0]], sets[k][1], rows)
            cells = [f"{a:.3f} [{lo:.3f}, {hi:.3f}]" for a, lo, hi in (local, pooled)]
            print(f"{k:<7} {rows or 'all':<14} {cells[0]:<24} {cells[1]}")


if __name__ == "__main__":
    main(sys.argv[1])
