"""Metrics with bootstrap 95 % CIs, calibration (temperature scaling, ECE), operating thresholds.

Classification metrics come from scikit-learn. ECE has no scikit-learn implementation; it is the
standard top-label binned ECE (Guo et al. 2017) and is written out below.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from osteogate.model.taxonomy import CLASSES
from scipy.optimize import minimize_scalar
from scipy.special import softmax
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    log_loss,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)


def low_bmd_score(probs: np.ndarray) -> np.ndarray:
    """P(osteopenia) + P(osteoporosis): the screening score for low bone mineral density."""
    return probs[:, 1] + probs[:, 2]


def sensitivity_at_specificity(y_binary: np.ndarray, score: np.ndarray, specificity: float) -> float:
    """Best sensitivity among ROC points whose specificity is >= the target (scikit-learn roc_curve)."""
    fpr, tpr, _ = roc_curve(y_binary, score)
    ok = fpr <= 1.0 - specificity + 1e-12
    return float(tpr[ok].max()) if ok.any() else 0.0


def threshold_for_sensitivity(y_binary: np.ndarray, score: np.ndarray, sensitivity: float) -> float:
    """Highest score threshold (predict positive when score >= t) whose sensitivity reaches the target.

    Highest, because among thresholds meeting the sensitivity target it gives the best specificity.
    """
    fpr, tpr, thresholds = roc_curve(y_binary, score)
    ok = np.nonzero(tpr >= sensitivity - 1e-12)[0]
    threshold = float(thresholds[ok[0]])
    return min(threshold, 1.0)  # roc_curve's first threshold is +inf


def expected_calibration_error(y_true: np.ndarray, probs: np.ndarray, n_bins: int = 10) -> float:
    """Top-label ECE: sum over equal-width confidence bins of |accuracy - confidence| * bin share."""
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y_true).astype(float)
    bins = np.minimum((confidence * n_bins).astype(int), n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        in_bin = bins == b
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)


def pooled_probs(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """[N, C] or [N, K, C] logits -> [N, C] probabilities: softmax(z / T), then the mean over the K
    patches (serving's pooling in model/inference.py: mean of probabilities, not of logits)."""
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim == 2:
        return softmax(logits / temperature, axis=-1)
    return softmax(logits / temperature, axis=-1).mean(axis=1)


def fit_temperature(logits: np.ndarray, y_true: np.ndarray) -> float:
    """Temperature T > 0 minimising the NLL of the pooled probabilities (1-D search on log T).

    `logits` is [N, C] (whole images) or [N, K, C] (patches, pooled as serving pools them).
    """

    def nll(log_t: float) -> float:
        probs = pooled_probs(logits, float(np.exp(log_t)))
        return float(-np.log(np.clip(probs[np.arange(len(y_true)), y_true], 1e-12, None)).mean())

    result = minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded")
    return float(np.exp(result.x))


def nll(logits: np.ndarray, y_true: np.ndarray, temperature: float = 1.0) -> float:
    probs = pooled_probs(logits, temperature)
    return float(log_loss(y_true, probs, labels=list(range(probs.shape[1]))))


def point_metrics(y_true: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """All headline metrics for one set of predictions (3-class y_true in 0..2, probs [N, 3])."""
    labels = list(range(len(CLASSES)))
    pred = probs.argmax(axis=1)
    out: dict[str, float] = {"accuracy": float(accuracy_score(y_true, pred))}
    # One scikit-learn call for all per-class figures (this runs thousands of times in bootstraps);
    # macro = unweighted mean over the 3 classes, exactly sklearn's average="macro" with fixed labels.
    precision, recall, f1, _ = precision_recall_fscore_support(y_true, pred, labels=labels, zero_division=0)
    for k, name in enumerate(CLASSES):
        out[f"precision_{name}"] = float(precision[k])
        out[f"recall_{name}"] = float(recall[k])
        out[f"f1_{name}"] = float(f1[k])
    out["precision_macro"] = float(precision.mean())
    out["recall_macro"] = float(recall.mean())
    out["f1_macro"] = float(f1.mean())
    y_op = (y_true == 2).astype(int)
    y_low = (y_true >= 1).astype(int)
    low = low_bmd_score(probs)
    for name, y_bin, score in (("osteoporosis", y_op, probs[:, 2]), ("low_bmd", y_low, low)):
        if 0 < y_bin.sum() < len(y_bin):
            out[f"auc_{name}"] = float(roc_auc_score(y_bin, score))
        else:
            out[f"auc_{name}"] = float("nan")  # one class only (a bootstrap draw can do this)
    if 0 < y_low.sum() < len(y_low):
        out["sens_low_bmd_at_spec_0.80"] = sensitivity_at_specificity(y_low, low, 0.80)
        out["sens_low_bmd_at_spec_0.90"] = sensitivity_at_specificity(y_low, low, 0.90)
    out["ece"] = expected_calibration_error(y_true, probs)
    return out


def bootstrap(
    y_true: np.ndarray,
    probs: np.ndarray,
    metric_fn: Callable[[np.ndarray, np.ndarray], dict[str, float]] = point_metrics,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """{metric: {value, ci_low, ci_high}}: percentile 95 % CIs over resampled images."""
    point = metric_fn(y_true, probs)
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {k: [] for k in point}
    n = len(y_true)
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        for key, value in metric_fn(y_true[idx], probs[idx]).items():
            if key in draws and np.isfinite(value):
                draws[key].append(value)
    result: dict[str, dict[str, float]] = {}
    for key, value in point.items():
        values = np.asarray(draws[key])
        low, high = (np.percentile(values, [2.5, 97.5]) if len(values) else (np.nan, np.nan))
        result[key] = {"value": round(value, 4), "ci_low": round(float(low), 4), "ci_high": round(float(high), 4)}
    return result


def fold_spread(per_fold: Sequence[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Mean and standard deviation of each metric across CV folds."""
    keys = per_fold[0].keys() if per_fold else []
    out: dict[str, dict[str, float]] = {}
    for key in keys:
        values = np.array([fold[key] for fold in per_fold if key in fold], dtype=float)
        values = values[np.isfinite(values)]
        if len(values):
            out[key] = {"mean": round(float(values.mean()), 4), "sd": round(float(values.std(ddof=1)) if len(values) > 1 else 0.0, 4)}
    return out


def confusion(y_true: np.ndarray, probs: np.ndarray) -> np.ndarray:
    return confusion_matrix(y_true, probs.argmax(axis=1), labels=list(range(len(CLASSES))))


@dataclass(frozen=True)
class OperatingRule:
    """How a head's two operating thresholds are chosen on validation predictions.

    * low BMD (the screening prompt, "refer to DXA"): the highest threshold on
      P(osteopenia) + P(osteoporosis) whose sensitivity reaches ``target_sensitivity``;
    * osteoporosis (a severity grade *within* the low-BMD flag, model/scoring.decide_label):
      ``"specificity"``: the lowest threshold on P(osteoporosis) whose specificity (among patients
      without osteoporosis) reaches ``osteoporosis_specificity``, i.e. the best sensitivity that
      keeps over-calling at or below 1 - specificity; ``"label_f1"``: the threshold that maximises
      the macro-F1 of the reported 3-class label, among those whose specificity still reaches
      ``osteoporosis_specificity`` (a floor, not a target); ``"sensitivity"``: the 1.1.0 rule
      (sensitivity >= ``target_sensitivity``, which over-calls: kept for comparison only).
    """

    target_sensitivity: float = 0.90
    osteoporosis: str = "label_f1"  # the shipped rule (model/shipped/REPORT.md says why)
    osteoporosis_specificity: float = 0.80

    def __post_init__(self) -> None:
        if self.osteoporosis not in OSTEOPOROSIS_RULES:
            raise ValueError(f"osteoporosis rule {self.osteoporosis!r} is not one of {OSTEOPOROSIS_RULES}")
        for name in ("target_sensitivity", "osteoporosis_specificity"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in (0, 1]")

    @classmethod
    def of(cls, value: OperatingRule | float) -> OperatingRule:
        """A rule from a rule or a bare target sensitivity (then the default osteoporosis rule)."""
        return value if isinstance(value, OperatingRule) else cls(target_sensitivity=float(value))

    def describe(self) -> dict[str, dict[str, Any]]:
        """The card's statement of both rules (the SR and result card quote ``rule``)."""
        low = {"rule": f"sensitivity >= {self.target_sensitivity:g} for low BMD on validation predictions: low BMD "
                       "when P(osteopenia) + P(osteoporosis) >= thresholds.low_bmd",
               "target": {"sensitivity": self.target_sensitivity}}
        grade = "osteoporosis when low BMD is flagged and P(osteoporosis) >= thresholds.osteoporosis"
        if self.osteoporosis == "specificity":
            op = {"rule": f"specificity >= {self.osteoporosis_specificity:g} for osteoporosis on validation "
                          f"predictions (best sensitivity at that specificity): {grade}",
                  "target": {"specificity": self.osteoporosis_specificity}}
        elif self.osteoporosis == "label_f1":
            op = {"rule": "the threshold maximising the macro-F1 of the reported 3-class label on validation "
                          f"predictions, with osteoporosis specificity >= {self.osteoporosis_specificity:g}: {grade}",
                  "target": {"max": "label_f1_macro", "min_specificity": self.osteoporosis_specificity}}
        else:
            op = {"rule": f"sensitivity >= {self.target_sensitivity:g} for osteoporosis on validation predictions: "
                          f"{grade}",
                  "target": {"sensitivity": self.target_sensitivity}}
        return {"low_bmd": low, "osteoporosis": op}


OSTEOPOROSIS_RULES = ("specificity", "label_f1", "sensitivity")


def threshold_for_specificity(y_binary: np.ndarray, score: np.ndarray, specificity: float) -> float:
    """Lowest score threshold (predict positive when score >= t) whose specificity reaches the target.

    Lowest, because among thresholds meeting the specificity target it gives the best sensitivity.
    Returns a value above every score (nobody flagged) when only that meets the target."""
    score = np.asarray(score, dtype=np.float64)
    negatives = np.sort(score[~np.asarray(y_binary, dtype=bool)])
    candidates = np.unique(score)  # ascending: the first that meets the target is the lowest
    for t in candidates:
        flagged = len(negatives) - np.searchsorted(negatives, t, side="left")  # negatives with score >= t
        if len(negatives) == 0 or 1.0 - flagged / len(negatives) >= specificity - 1e-12:
            return float(t)
    return float(candidates[-1]) + 1e-6 if len(candidates) else 1.0  # survives rounding to 6 decimals


def label_macro_f1(y_true: np.ndarray, labels: np.ndarray) -> float:
    """Macro-F1 over the 3 classes (scikit-learn's, zero_division=0), in numpy: it runs for every
    candidate threshold of every fitted head."""
    k = len(CLASSES)
    matrix = np.bincount(np.asarray(y_true) * k + np.asarray(labels), minlength=k * k).reshape(k, k)
    tp = np.diag(matrix).astype(float)
    denominator = matrix.sum(axis=0) + matrix.sum(axis=1)  # predicted + actual = 2 TP + FP + FN
    return float(np.divide(2 * tp, denominator, out=np.zeros(k), where=denominator > 0).mean())


def osteoporosis_threshold(y_true: np.ndarray, probs: np.ndarray, low_bmd: float, rule: OperatingRule) -> float:
    """The osteoporosis threshold of ``rule``, given the low-BMD threshold (the grade applies within
    the low-BMD flag, exactly as model/scoring.decide_label reports it)."""
    y_op = np.asarray(y_true) == 2
    flagged = low_bmd_score(probs) >= low_bmd
    # Outside the low-BMD flag nobody is graded osteoporosis, whatever P(osteoporosis) says.
    graded = np.where(flagged, probs[:, 2], -1.0)
    if rule.osteoporosis == "sensitivity":
        return max(0.0, threshold_for_sensitivity(y_op.astype(int), graded, rule.target_sensitivity))
    floor = max(0.0, threshold_for_specificity(y_op, graded, rule.osteoporosis_specificity))
    if rule.osteoporosis == "specificity":
        return floor
    candidates = np.unique(np.r_[probs[:, 2][flagged & (probs[:, 2] >= floor)], 1.0 + 1e-6])
    base = np.where(flagged, 1, 0)
    best_t, best_f1 = float(candidates[-1]), -1.0
    for t in candidates:  # ascending: ties keep the lowest threshold (more sensitive at equal F1)
        f1 = label_macro_f1(np.asarray(y_true), np.where(flagged & (probs[:, 2] >= t), 2, base))
        if f1 > best_f1 + 1e-12:
            best_t, best_f1 = float(t), f1
    return best_t


def operating_thresholds(y_true: np.ndarray, probs: np.ndarray, rule: OperatingRule | float) -> dict[str, float]:
    """Thresholds on validation data by the stated rule (stored in the card).

    ``rule`` may be a bare target sensitivity (the low-BMD target; osteoporosis by the default
    specificity rule)."""
    rule = OperatingRule.of(rule)
    out: dict[str, float] = {}
    y_low = (y_true >= 1).astype(int)
    if 0 < y_low.sum() < len(y_low):
        out["low_bmd"] = round(threshold_for_sensitivity(y_low, low_bmd_score(probs), rule.target_sensitivity), 6)
    y_op = (y_true == 2).astype(int)
    if "low_bmd" in out and 0 < y_op.sum() < len(y_op):
        out["osteoporosis"] = round(osteoporosis_threshold(y_true, probs, out["low_bmd"], rule), 6)
    return out
