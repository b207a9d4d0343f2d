"""Fast metrics of the fusion evaluation (thousands of bootstrap draws): AUC, macro P/R/F1, ECE,
the T-score and interval figures, the referral's sensitivity and specificity, percentile CIs over
duplicate groups, and the paired AUC difference."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from osteogate.model.taxonomy import CLASSES

# ------------------------------------------------------------------------------- metrics (fast, for bootstraps)


def auc(y_binary: np.ndarray, score: np.ndarray) -> float:
    """ROC-AUC by the Mann-Whitney rank formula (ties = half), equal to sklearn's roc_auc_score."""
    from scipy.stats import rankdata

    positives = y_binary.astype(bool)
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(score)
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _macro_prf(y: np.ndarray, pred: np.ndarray) -> tuple[float, float, float]:
    k = len(CLASSES)
    matrix = np.bincount(y * k + pred, minlength=k * k).reshape(k, k)
    tp = np.diag(matrix).astype(float)
    predicted, actual = matrix.sum(axis=0), matrix.sum(axis=1)
    precision = np.divide(tp, predicted, out=np.zeros(k), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros(k), where=actual > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(k), where=(precision + recall) > 0)
    return float(precision.mean()), float(recall.mean()), float(f1.mean())


def _ece(y: np.ndarray, probs: np.ndarray, n_bins: int = 10) -> float:
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y).astype(float)
    bins = np.minimum((confidence * n_bins).astype(int), n_bins - 1)
    total = np.bincount(bins, minlength=n_bins)
    gap = np.abs(np.bincount(bins, correct, n_bins) - np.bincount(bins, confidence, n_bins))
    return float(gap.sum() / len(y)) if total.sum() else float("nan")


def _rate(hit: np.ndarray, among: np.ndarray) -> float:
    return float(hit[among].mean()) if among.any() else float("nan")


@dataclass
class Predictions:
    """What one table row predicts for the evaluated images (any part may be absent)."""

    probs: np.ndarray | None = None
    low_bmd_score: np.ndarray | None = None  # for AUC when there are no probabilities (OST)
    osteoporosis_score: np.ndarray | None = None
    labels: np.ndarray | None = None  # reported class (thresholds / published cut-offs)
    mu: np.ndarray | None = None
    low: np.ndarray | None = None
    high: np.ndarray | None = None
    correlate: np.ndarray | None = None  # a score to correlate with the T-score when there is no estimate
    referred: np.ndarray | None = None  # the screening decision, when it is not "category is low BMD"


def row_metrics(y: np.ndarray, t: np.ndarray, p: Predictions) -> dict[str, float]:
    out: dict[str, float] = {}
    y_low, y_op = y >= 1, y == 2
    low_score = p.low_bmd_score if p.low_bmd_score is not None else (p.probs[:, 1] + p.probs[:, 2] if p.probs is not None else None)
    op_score = p.osteoporosis_score if p.osteoporosis_score is not None else (p.probs[:, 2] if p.probs is not None else None)
    pred = p.probs.argmax(axis=1) if p.probs is not None else p.labels
    if pred is not None:
        out["accuracy"] = float((pred == y).mean())
        out["precision_macro"], out["recall_macro"], out["f1_macro"] = _macro_prf(y, pred)
    if low_score is not None:
        out["auc_low_bmd"] = auc(y_low, low_score)
    if op_score is not None:
        out["auc_osteoporosis"] = auc(y_op, op_score)
    if p.probs is not None:
        out["ece"] = _ece(y, p.probs)
    if p.mu is not None:
        out["t_score_mae"] = float(np.abs(p.mu - t).mean())
        out["t_score_pearson_r"] = float(np.corrcoef(p.mu, t)[0, 1]) if np.std(p.mu) > 0 else float("nan")
    elif p.correlate is not None:
        out["t_score_pearson_r"] = float(np.corrcoef(p.correlate, t)[0, 1])
    if p.low is not None and p.high is not None:
        out["pi80_coverage"] = float(((t >= p.low) & (t <= p.high)).mean())
    if p.labels is not None:
        flagged_low = p.referred if p.referred is not None else p.labels >= 1
        flagged_op = p.labels == 2
        out["sensitivity_low_bmd"] = _rate(flagged_low, y_low)
        out["specificity_low_bmd"] = _rate(~flagged_low, ~y_low)
        out["sensitivity_osteoporosis"] = _rate(flagged_op, y_op)
        out["specificity_osteoporosis"] = _rate(~flagged_op, ~y_op)
        # The 3-class figures of the label the gateway reports (the thresholded one), beside those
        # of the most probable class above.
        out["label_accuracy"] = float((p.labels == y).mean())
        out["label_precision_macro"], out["label_recall_macro"], out["label_f1_macro"] = _macro_prf(y, p.labels)
    return out


def group_bootstrap_indices(groups: np.ndarray, n_boot: int, seed: int = 0) -> list[np.ndarray]:
    """Resample duplicate groups (not images) with replacement: copies of one film move together."""
    rng = np.random.default_rng(seed)
    unique, inverse = np.unique(groups, return_inverse=True)
    members = [np.nonzero(inverse == g)[0] for g in range(len(unique))]
    draws = []
    for _ in range(n_boot):
        picked = rng.integers(0, len(unique), len(unique))
        draws.append(np.concatenate([members[g] for g in picked]))
    return draws


def _subset(p: Predictions, idx: np.ndarray) -> Predictions:
    return Predictions(**{k: (None if v is None else v[idx]) for k, v in vars(p).items()})


def with_ci(y: np.ndarray, t: np.ndarray, p: Predictions, draws: list[np.ndarray]) -> dict[str, dict[str, float]]:
    point = row_metrics(y, t, p)
    samples: dict[str, list[float]] = {k: [] for k in point}
    for idx in draws:
        for key, value in row_metrics(y[idx], t[idx], _subset(p, idx)).items():
            if np.isfinite(value):
                samples[key].append(value)
    result = {}
    for key, value in point.items():
        low, high = np.percentile(samples[key], [2.5, 97.5]) if samples[key] else (np.nan, np.nan)
        result[key] = {"value": round(value, 4), "ci_low": round(float(low), 4), "ci_high": round(float(high), 4)}
    return result


def paired_delta(y: np.ndarray, a: np.ndarray, b: np.ndarray, draws: list[np.ndarray]) -> dict[str, float]:
    """AUC(a) - AUC(b) for low BMD on the same resampled images, with its 95 % CI."""
    y_low = y >= 1
    value = auc(y_low, a) - auc(y_low, b)
    deltas = [auc(y_low[i], a[i]) - auc(y_low[i], b[i]) for i in draws]
    deltas = [d for d in deltas if np.isfinite(d)]
    low, high = np.percentile(deltas, [2.5, 97.5])
    return {"value": round(float(value), 4), "ci_low": round(float(low), 4), "ci_high": round(float(high), 4)}


