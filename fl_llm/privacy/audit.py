"""Membership-inference audit statistics: how well can an attacker tell training records
(members) from held-out records of the same distribution (non-members)?

Attacks (ALGORITHMS.md, "Privacy audit"), each a score where larger means "member":
    loss        −NLL under the fine-tuned model (Yeom et al., CSF 2018)
    reference   NLL under the base model − NLL under the fine-tuned one: how much fine-tuning
                lowered this record's loss (Carlini et al., "Membership Inference Attacks From
                First Principles", S&P 2022, with the base model as the reference)

(ε, δ)-DP bounds every such test: TPR ≤ e^ε·FPR + δ at every threshold (Kairouz et al. 2015).
With finitely many records the measured rates are noisy, so the check uses one-sided
Clopper-Pearson bounds (Jagielski et al., "Auditing Differentially Private Machine Learning",
NeurIPS 2020): ε_lower = max over thresholds of log((TPR_low − δ) / FPR_high), and the same for
the complementary test; the bound holds when ε_lower ≤ ε. A larger ε_lower is a bug in the DP
pipeline, not bad luck (at the chosen confidence).
"""

from __future__ import annotations

import math

import numpy as np

from fl_llm.metrics import roc_auc


def label_matched_samples(
    member_labels: np.ndarray, nonmember_labels: np.ndarray, max_examples: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(member indices, non-member indices), sorted, with the same number of each label on both
    sides and at most `max_examples` a side. Otherwise a loss attack also scores the label mix:
    a model that says "No" to everyone gives lower loss to whichever sample holds more "No"s."""
    member_labels, nonmember_labels = np.asarray(member_labels), np.asarray(nonmember_labels)
    classes = np.union1d(member_labels, nonmember_labels)
    avail = {c: min(int((member_labels == c).sum()), int((nonmember_labels == c).sum())) for c in classes}
    scale = min(1.0, max_examples / max(sum(avail.values()), 1))
    members, nonmembers = [], []
    for c in classes:
        n = int(avail[c] * scale)
        members.append(rng.choice(np.flatnonzero(member_labels == c), n, replace=False))
        nonmembers.append(rng.choice(np.flatnonzero(nonmember_labels == c), n, replace=False))
    return np.sort(np.concatenate(members)).astype(np.int64), np.sort(np.concatenate(nonmembers)).astype(np.int64)


def roc_counts(members: np.ndarray, nonmembers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(true positives, false positives) for every threshold "score ≥ t", t over all scores."""
    thresholds = np.unique(np.concatenate([members, nonmembers]))[::-1]
    ms, ns = np.sort(members), np.sort(nonmembers)
    tp = len(ms) - np.searchsorted(ms, thresholds, side="left")
    fp = len(ns) - np.searchsorted(ns, thresholds, side="left")
    return tp, fp


def tpr_at_fpr(members: np.ndarray, nonmembers: np.ndarray, fpr: float) -> float:
    """The largest TPR among thresholds whose FPR is at most `fpr`."""
    tp, fp = roc_counts(members, nonmembers)
    ok = fp / len(nonmembers) <= fpr
    return float(tp[ok].max() / len(members)) if ok.any() else 0.0


def clopper_pearson(k: np.ndarray, n: int, alpha: float, upper: bool) -> np.ndarray:
    """One-sided exact binomial confidence bound on k/n at level 1 − alpha."""
    from scipy.stats import beta

    k = np.asarray(k, dtype=np.float64)
    if upper:
        return np.where(k >= n, 1.0, beta.ppf(1 - alpha, k + 1, np.maximum(n - k, 1e-12)))
    return np.where(k <= 0, 0.0, beta.ppf(alpha, np.maximum(k, 1e-12), n - k + 1))


def epsilon_lower_bound(members: np.ndarray, nonmembers: np.ndarray, delta: float, alpha: float = 0.05) -> float:
    """The ε this attack proves, at confidence 1 − alpha (Bonferroni over both test directions)."""
    tp, fp = roc_counts(members, nonmembers)
    m, n = len(members), len(nonmembers)
    a = alpha / 2
    tpr_lo, fpr_hi = clopper_pearson(tp, m, a, upper=False), clopper_pearson(fp, n, a, upper=True)
    # the complementary test ("non-member" when score ≥ t): TNR against FNR
    tnr_lo, fnr_hi = clopper_pearson(n - fp, n, a, upper=False), clopper_pearson(m - tp, m, a, upper=True)
    best = 0.0
    for num, den in ((tpr_lo - delta, fpr_hi), (tnr_lo - delta, fnr_hi)):
        ok = (num > 0) & (den > 0)
        if ok.any():
            best = max(best, float(np.max(np.log(num[ok] / den[ok]))))
    return best


def attack_report(members: np.ndarray, nonmembers: np.ndarray, epsilon: float, delta: float) -> dict:
    """AUC, TPR at 1% and 0.1% FPR, the DP bound at those points, and the audited ε."""
    labels = np.concatenate([np.ones(len(members)), np.zeros(len(nonmembers))])
    scores = np.concatenate([members, nonmembers])
    eps_lower = epsilon_lower_bound(members, nonmembers, delta)
    report = {"auc": roc_auc(labels, scores), "epsilon_lower_bound": eps_lower}
    for name, fpr in (("1%", 0.01), ("0.1%", 0.001)):
        report[f"tpr_at_{name}_fpr"] = tpr_at_fpr(members, nonmembers, fpr)
        report[f"dp_bound_at_{name}_fpr"] = min(1.0, math.exp(epsilon) * fpr + delta) if math.isfinite(epsilon) else 1.0
    report["bound_holds"] = eps_lower <= epsilon
    return report


def record_level_guarantee(level: str, epsilon: float, delta: float) -> tuple[float, float]:
    """(ε, δ) for one record from the run's guarantee. Client level protects a platform's whole
    data set against adding or removing it; changing one record replaces that data set, i.e. a
    group of two such steps: (2ε, (1 + e^ε)·δ)."""
    if level == "client":
        return 2 * epsilon, (1 + math.exp(min(epsilon, 700))) * delta
    return epsilon, delta
