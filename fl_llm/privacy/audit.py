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
NeurIPS 2020): ε_lower = log((TPR_low − δ) / FPR_high) at one threshold (or the same for the
complementary test); the alarm is ε_lower > ε.

Taking the best of all thresholds on one sample would be a multiple comparison: with hundreds of
thresholds some bound fails by chance, and "audit failed" would fire on a model that memorised
nothing. So the records are split in two halves at random: the threshold and the direction are
chosen on one half, and the bound is computed on the other at that single threshold (as in
Jagielski et al.'s and Nasr et al.'s audits, which fix the threshold on separate runs). The run's
alarm then is a level-α statement once α is divided among its tests (Bonferroni over attacks ×
platforms, in `fl_llm.privacy.audit_run`): on a model that leaks nothing beyond its ε it fires
with probability at most α.
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


def _tests(members: np.ndarray, nonmembers: np.ndarray):
    """Every (threshold, direction) test: direction +1 says "member" when score ≥ t, −1 says
    "non-member" when score ≥ t (the complementary inequality TNR ≤ e^ε·FNR + δ). Returns
    (thresholds, [(direction, successes, trials of the test's positive side, its false
    positives, trials of the other side)])."""
    thresholds = np.unique(np.concatenate([members, nonmembers]))[::-1]  # the order roc_counts uses
    tp, fp = roc_counts(members, nonmembers)
    m, n = len(members), len(nonmembers)
    return thresholds, [(1, tp, m, fp, n), (-1, n - fp, n, m - tp, m)]


def _bounds(hits, hits_of, false, false_of, delta: float, alpha: float) -> np.ndarray:
    """log((hit-rate lower bound − δ) / false-rate upper bound), each side at α/2; 0 where the
    numerator is not positive."""
    lo = clopper_pearson(hits, hits_of, alpha / 2, upper=False) - delta
    hi = clopper_pearson(false, false_of, alpha / 2, upper=True)
    out = np.zeros(np.shape(lo))
    ok = (lo > 0) & (hi > 0)
    out[ok] = np.log(lo[ok] / hi[ok])
    return out


def epsilon_lower_bound(
    members: np.ndarray,
    nonmembers: np.ndarray,
    delta: float,
    alpha: float = 0.05,
    rng: np.random.Generator | None = None,
) -> float:
    """The ε this attack proves with confidence 1 − α: the threshold and direction chosen on a
    random half of members and non-members, the Clopper-Pearson bound taken on the other half."""
    rng = rng if rng is not None else np.random.default_rng(0)
    members, nonmembers = np.asarray(members, np.float64), np.asarray(nonmembers, np.float64)
    if min(len(members), len(nonmembers)) < 2:
        return 0.0
    pm, pn = rng.permutation(len(members)), rng.permutation(len(nonmembers))
    sel_m, test_m = members[pm[: len(pm) // 2]], members[pm[len(pm) // 2 :]]
    sel_n, test_n = nonmembers[pn[: len(pn) // 2]], nonmembers[pn[len(pn) // 2 :]]
    thresholds, tests = _tests(sel_m, sel_n)
    best, choice = 0.0, None
    for direction, hits, hits_of, false, false_of in tests:
        bounds = _bounds(hits, hits_of, false, false_of, delta, alpha)
        k = int(np.argmax(bounds))
        if bounds[k] > best:
            best, choice = float(bounds[k]), (direction, thresholds[k])
    if choice is None:
        return 0.0
    direction, t = choice
    if direction == 1:  # TPR ≤ e^ε·FPR + δ for "member when score ≥ t"
        hits, hits_of, false, false_of = (test_m >= t).sum(), len(test_m), (test_n >= t).sum(), len(test_n)
    else:  # TNR ≤ e^ε·FNR + δ: non-members below t against members below t
        hits, hits_of, false, false_of = (test_n < t).sum(), len(test_n), (test_m < t).sum(), len(test_m)
    # on the held-back half the chosen test can prove less than nothing: ε ≥ 0 is all that says
    return max(0.0, float(_bounds(np.array([hits]), hits_of, np.array([false]), false_of, delta, alpha)[0]))


def attack_report(
    members: np.ndarray,
    nonmembers: np.ndarray,
    epsilon: float,
    delta: float,
    alpha: float = 0.05,
    rng: np.random.Generator | None = None,
) -> dict:
    """AUC, TPR at 1% and 0.1% FPR, the DP bound at those points, and the audited ε at
    confidence 1 − α (`epsilon_lower_bound`)."""
    labels = np.concatenate([np.ones(len(members)), np.zeros(len(nonmembers))])
    scores = np.concatenate([members, nonmembers])
    eps_lower = epsilon_lower_bound(members, nonmembers, delta, alpha, rng)
    report = {"auc": roc_auc(labels, scores), "epsilon_lower_bound": eps_lower, "confidence": 1 - alpha}
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
