"""Fit and cross-validate the late-fusion heads of model/fusion.py: one per input situation.

Data: the 3-class-labelled images with a T-score, their covariates, and the image network's
*out-of-fold* calibrated probabilities from the grouped cross-validation (training/crossval.py).
Using out-of-fold image scores keeps the fusion honest: the image score a head learns to trust
was made by a network that never saw that image.

Protocol (everything chosen on training folds only):

* outer loop = the image network's grouped folds (copies of one film never on both sides);
* inside each outer training fold, an inner grouped CV chooses the ridge penalty of the T-score
  regression (squared error) and the 3-class head (multinomial logistic at a few penalties, or
  the T-score read through the WHO cut-offs, "ordinal_t") by log-loss; its out-of-fold
  predictions give the operating thresholds (training/metrics.OperatingRule: low BMD at a stated
  sensitivity, the osteoporosis grade at a stated specificity), the residual SD and the 80 %
  prediction interval quantiles; the chosen head is refitted on the whole training fold and
  predicts the outer test fold once;
* the shipped head of a situation is the same procedure run on all data, and its card entry
  carries the outer (nested) CV figures of that situation.

Every sample is weighted 1 / (images of its duplicate group), so a film filed twice counts once.
The evaluation of a fitted head goes through model.fusion.FusionHead: training measures exactly
what serving computes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

import numpy as np
from osteogate.model.covariates import Covariates
from osteogate.model.estimand import INTERVAL_LEVEL, REFERRAL, Z80, on_grid, referral_decision
from osteogate.model.fusion import (
    FEATURES,
    FUSION_FORMAT,
    FusionHead,
    FusionInputs,
    features_for,
    probabilities_from_t,
    situation_key,
)
from osteogate.model.taxonomy import CLASSES, COVARIATES, class_from_t_score
from osteogate.training.metrics import OperatingRule, operating_thresholds
from osteogate.training.splits import grouped_folds

RIDGE_ALPHAS = (0.3, 3.0, 30.0)  # on standardised features, ~130 training images
LOGISTIC_CS = (0.03, 0.3, 3.0)
INNER_FOLDS = 5
PI_QUANTILES = (0.10, 0.90)  # 80 % prediction interval
MIN_ROWS = 12  # below this no head is fitted (the gate would refuse it anyway: CIs span everything)


@dataclass
class FusionData:
    """One row per 3-class-labelled image with a T-score (out-of-fold image probabilities)."""

    covariates: list[Covariates]
    image_probs: np.ndarray | None  # [N, 3] calibrated, out of fold; None = no image network
    y: np.ndarray  # class index
    t: np.ndarray  # T-score
    groups: np.ndarray  # duplicate group
    folds: np.ndarray  # outer fold id (the image network's fold of this image)
    columns: dict[str, np.ndarray] = field(default_factory=dict)  # feature -> values (nan = unavailable)

    def __post_init__(self) -> None:
        n = len(self.y)
        for name in FEATURES:
            values = np.full(n, np.nan)
            for i in range(n):
                image = None
                if self.image_probs is not None:
                    image = dict(zip(CLASSES, self.image_probs[i], strict=True))
                value = FEATURES[name][1](FusionInputs(self.covariates[i], image))
                if value is not None:
                    values[i] = value
            self.columns[name] = values

    def __len__(self) -> int:
        return len(self.y)

    def matrix(self, names: Sequence[str]) -> np.ndarray:
        if not names:
            return np.zeros((len(self), 0))
        return np.stack([self.columns[n] for n in names], axis=1)

    def usable(self, names: Sequence[str]) -> np.ndarray:
        """Rows that have every feature of ``names``."""
        return np.isfinite(self.matrix(names)).all(axis=1) & np.isfinite(self.t)


def group_weights(groups: np.ndarray) -> np.ndarray:
    _, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    weights = 1.0 / counts[inverse]
    return weights / weights.mean()


def _strata(y: np.ndarray) -> list[str]:
    return [CLASSES[int(k)] for k in y]


# ------------------------------------------------------------------------------- fitting one head


def _fit_ridge(z: np.ndarray, t: np.ndarray, w: np.ndarray, alpha: float) -> tuple[np.ndarray, float]:
    """Weighted ridge regression, intercept unpenalised (what sklearn's Ridge fits), closed form."""
    z_mean = np.average(z, axis=0, weights=w)
    t_mean = float(np.average(t, weights=w))
    zc, tc = z - z_mean, t - t_mean
    gram = (zc * w[:, None]).T @ zc + alpha * np.eye(z.shape[1])
    coef = np.linalg.solve(gram, (zc * w[:, None]).T @ tc)
    return coef, t_mean - float(z_mean @ coef)


def _fit_multinomial(z: np.ndarray, y: np.ndarray, w: np.ndarray, c: float) -> tuple[np.ndarray, np.ndarray] | None:
    """Weighted multinomial logistic regression with sklearn's objective
    (0.5 ||W||^2 + C sum_i w_i CE_i, intercepts unpenalised), by damped Newton steps.

    Thousands of these tiny fits run per training; a closed loop in numpy is ~20x faster than the
    general-purpose solver and converges to the same optimum (tests/test_training_fusion.py)."""
    k = len(CLASSES)
    if len(np.unique(y)) < k:
        return None  # a fold without one class cannot fit a 3-class head
    n, f = z.shape
    x = np.hstack([z, np.ones((n, 1))])
    onehot = np.eye(k)[y]
    penalty = np.tile(np.r_[np.ones(f), 1e-8], k)  # per parameter, class-major [k, f + 1]
    theta = np.zeros(k * (f + 1))

    def objective(params: np.ndarray) -> tuple[float, np.ndarray]:
        logits = x @ params.reshape(k, f + 1).T
        logits -= logits.max(axis=1, keepdims=True)
        log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        value = -c * float((w[:, None] * onehot * log_p).sum()) + 0.5 * float((penalty * params**2).sum())
        return value, np.exp(log_p)

    value, p = objective(theta)
    for _ in range(100):
        gradient = (c * ((w[:, None] * (p - onehot)).T @ x)).ravel() + penalty * theta
        # Hessian blocks: C sum_i w_i (delta_ab p_a - p_a p_b) x_i x_i^T.
        weighted = x * w[:, None]
        hessian = np.zeros((k * (f + 1), k * (f + 1)))
        for a in range(k):
            for b in range(a, k):
                factor = p[:, a] * ((a == b) - p[:, b])
                block = c * (weighted * factor[:, None]).T @ x
                hessian[a * (f + 1):(a + 1) * (f + 1), b * (f + 1):(b + 1) * (f + 1)] = block
                hessian[b * (f + 1):(b + 1) * (f + 1), a * (f + 1):(a + 1) * (f + 1)] = block.T
        hessian[np.diag_indices_from(hessian)] += penalty
        step = np.linalg.solve(hessian, gradient)
        scale = 1.0
        while scale > 1e-6:
            candidate = theta - scale * step
            new_value, new_p = objective(candidate)
            if new_value <= value:
                break
            scale /= 2
        else:
            break
        converged = value - new_value < 1e-10 * max(1.0, abs(value))
        theta, value, p = candidate, new_value, new_p
        if converged:
            break
    params = theta.reshape(k, f + 1)
    coef, intercept = params[:, :f].copy(), params[:, f].copy()
    # The softmax is unchanged by a common shift of the intercepts: centre them (sklearn does too).
    return coef - coef.mean(axis=0), intercept - intercept.mean()


def _log_loss(y: np.ndarray, probs: np.ndarray, w: np.ndarray) -> float:
    p = np.clip(probs[np.arange(len(y)), y], 1e-9, 1.0)
    return float(-(w * np.log(p)).sum() / w.sum())


@dataclass
class Candidate:
    kind: str  # "multinomial" | "ordinal_t"
    c: float = 0.0


def _candidates(fixed: Candidate | None) -> list[Candidate]:
    if fixed is not None:
        return [fixed]
    return [Candidate("multinomial", c) for c in LOGISTIC_CS] + [Candidate("ordinal_t")]


def _standardise(x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    center = np.average(x, axis=0, weights=w) if x.shape[1] else np.zeros(0)
    scale = np.sqrt(np.average((x - center) ** 2, axis=0, weights=w)) if x.shape[1] else np.zeros(0)
    scale = np.where(scale > 1e-9, scale, 1.0)
    return center, scale


def _head_params(x: np.ndarray, y: np.ndarray, t: np.ndarray, w: np.ndarray, alpha: float,
                 candidate: Candidate, sigma: float) -> dict[str, Any] | None:
    center, scale = _standardise(x, w)
    z = (x - center) / scale
    reg_coef, reg_intercept = _fit_ridge(z, t, w, alpha) if x.shape[1] else (np.zeros(0), float(np.average(t, weights=w)))
    if candidate.kind == "multinomial":
        if x.shape[1] == 0:
            return None
        fitted = _fit_multinomial(z, y, w, candidate.c)
        if fitted is None:
            return None
        classifier: dict[str, Any] = {"kind": "multinomial", "coef": fitted[0].tolist(), "intercept": fitted[1].tolist(),
                                      "C": candidate.c}
    else:
        classifier = {"kind": "normal_t", "sigma": sigma}
    return {"center": center.tolist(), "scale": scale.tolist(), "classifier": classifier,
            "regression": {"coef": reg_coef.tolist(), "intercept": reg_intercept, "alpha": alpha,
                           "residual_sd": sigma, "residual_quantiles": [0.0, 0.0]}}


def _predict(params: dict[str, Any], names: Sequence[str], x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    entry = {"inputs": [], "features": list(names), **params}
    return FusionHead(entry).predict_raw(x)


def fit_head(
    x: np.ndarray, y: np.ndarray, t: np.ndarray, groups: np.ndarray, names: Sequence[str], inputs: Sequence[str],
    operating: OperatingRule | float, seed: int = 0, fixed: Candidate | None = None,
    fixed_alpha: float | None = None,
) -> dict[str, Any]:
    """Choose (inner grouped CV) and fit one head; returns its card entry (without validation).

    ``operating``: the rule of the operating thresholds (a bare number = the low-BMD target
    sensitivity, osteoporosis by the default rule); they are chosen on the inner out-of-fold
    predictions, never on the rows this head will be evaluated on."""
    w = group_weights(groups)
    n_inner = max(2, min(INNER_FOLDS, len(np.unique(groups))))
    inner = grouped_folds(_strata(y), groups, n_inner, seed)
    alphas = (fixed_alpha,) if fixed_alpha is not None else RIDGE_ALPHAS
    # 1. T-score regression: penalty by out-of-fold squared error.
    best: tuple[float, float, np.ndarray] | None = None
    for alpha in alphas:
        mu = np.zeros(len(y))
        for train, test in inner:
            params = _head_params(x[train], y[train], t[train], w[train], alpha, Candidate("normal_t"), 1.0)
            assert params is not None
            mu[test] = _predict(params, names, x[test])[1]
        mse = float(np.average((t - mu) ** 2, weights=w))
        if best is None or mse < best[0]:
            best = (mse, alpha, mu)
    assert best is not None
    _, alpha, mu_oof = best
    residuals = t - mu_oof
    sigma = float(np.sqrt(np.average(residuals**2, weights=w)))
    q_low, q_high = (float(np.quantile(residuals, q)) for q in PI_QUANTILES)
    # 2. The predictive spread: calibrated so that the 80 % interval covers 80 % of the inner
    # out-of-fold residuals (the estimate is rounded to the reporting grid first, as served).
    sigma80 = calibrated_sigma(t, mu_oof, w)
    probs_oof = probabilities_from_t(np.array([on_grid(m) for m in mu_oof]), sigma80)
    candidate = Candidate("normal_t")
    params = _head_params(x, y, t, w, alpha, candidate, sigma80)
    assert params is not None
    params["regression"]["residual_sd"] = round(sigma, 4)
    params["regression"]["residual_quantiles"] = [round(q_low, 4), round(q_high, 4)]
    thresholds = operating_thresholds(y, probs_oof, operating)
    # The osteoporosis range is the estimate's WHO category (P(T <= -2.5) >= 0.5): no threshold.
    thresholds = {k: v for k, v in thresholds.items() if k == "low_bmd"}
    return {
        "inputs": list(inputs), "features": list(names), **params,
        "thresholds": thresholds,
        "selection": {"ridge_alpha": alpha, "classifier": candidate.kind, "sigma": round(sigma80, 4),
                      "inner_log_loss": round(_log_loss(y, probs_oof, w), 4), "inner_folds": n_inner},
    }


def calibrated_sigma(t: np.ndarray, mu: np.ndarray, w: np.ndarray) -> float:
    """The normal spread whose central 80 % interval covers 80 % (weighted) of |t - mu|.

    Parameters
    ----------
    t, mu : numpy.ndarray
        Densitometry T-scores and out-of-fold estimates.
    w : numpy.ndarray
        Sample weights (1 / images of the duplicate group).

    Returns
    -------
    float
        sigma = weighted 80th percentile of |t - on_grid(mu)| / Phi^-1(0.9).
    """
    residual = np.abs(t - np.array([on_grid(m) for m in mu]))
    order = np.argsort(residual)
    cumulative = np.cumsum(w[order]) / w.sum()
    q80 = float(residual[order][min(int(np.searchsorted(cumulative, INTERVAL_LEVEL)), len(order) - 1)])
    return max(q80 / Z80, 0.05)


# ------------------------------------------------------------------------------- cross-validation


@dataclass
class HeadCV:
    """Out-of-fold predictions of one situation's head (rows = FusionData rows used)."""

    inputs: tuple[str, ...]
    rows: np.ndarray
    probs: np.ndarray
    mu: np.ndarray
    low: np.ndarray
    high: np.ndarray
    labels: np.ndarray  # class index of the reported category (WHO category of the estimate)
    selections: list[dict[str, Any]]
    referred: np.ndarray | None = None  # DXA referral suggested (P(low) >= the fold's threshold)


def cross_validate_head(data: FusionData, inputs: Sequence[str], operating: OperatingRule | float, seed: int = 0,
                        names: Sequence[str] | None = None, fixed: Candidate | None = None,
                        fixed_alpha: float | None = None) -> HeadCV | None:
    from threadpoolctl import threadpool_limits

    # Thousands of tiny fits: multithreaded BLAS only adds overhead (6x slower on a shared 2-core box).
    with threadpool_limits(1):
        return _cross_validate_head(data, inputs, OperatingRule.of(operating), seed, names, fixed, fixed_alpha)


def _cross_validate_head(data: FusionData, inputs: Sequence[str], operating: OperatingRule, seed: int,
                         names: Sequence[str] | None, fixed: Candidate | None, fixed_alpha: float | None
                         ) -> HeadCV | None:
    names = tuple(names) if names is not None else features_for(inputs)
    rows = np.nonzero(data.usable(names))[0]
    if len(rows) < MIN_ROWS:
        return None
    x = data.matrix(names)
    n = len(rows)
    probs, mu = np.zeros((n, len(CLASSES))), np.zeros(n)
    low, high, labels = np.zeros(n), np.zeros(n), np.zeros(n, dtype=int)
    referred = np.zeros(n, dtype=bool)
    selections = []
    position = {row: k for k, row in enumerate(rows)}
    for fold in np.unique(data.folds[rows]):
        train = rows[data.folds[rows] != fold]
        test = rows[data.folds[rows] == fold]
        entry = fit_head(x[train], data.y[train], data.t[train], data.groups[train], names, inputs,
                         operating, seed + int(fold), fixed, fixed_alpha)
        head = FusionHead(entry)
        p, m = head.predict_raw(x[test])
        at = [position[r] for r in test]
        probs[at], mu[at] = p, m
        low[at], high[at] = head.interval_raw(m)
        threshold = entry["thresholds"].get("low_bmd")
        labels[at] = [CLASSES.index(class_from_t_score(float(v))) for v in m]
        referred[at] = [referral_decision(1.0 - float(row[0]), threshold) == REFERRAL for row in p]
        selections.append(entry["selection"])
    return HeadCV(tuple(inputs), rows, probs, mu, low, high, labels, selections, referred)


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


# ------------------------------------------------------------------------------- all situations -> card.fusion


def covariate_situations() -> list[tuple[str, ...]]:
    return [covs for n in range(len(COVARIATES) + 1) for covs in combinations(COVARIATES, n)]


def validation_population(data: FusionData) -> str:
    """Who the figures were measured on, in words for the SR and the card (from the training data,
    i.e. the data set's manifest): "155 patients of one public knee data set, ages 17-107"."""
    ages = data.columns["age"][np.isfinite(data.columns["age"])]
    text = f"{len(np.unique(data.groups))} patients of one public knee data set"
    if len(ages):
        text += f", ages {ages.min():.0f}-{ages.max():.0f}"
    return text


def covariate_ranges(data: FusionData) -> dict[str, list[float]]:
    """Validated ranges: age as seen in training (a linear head must not extrapolate to children);
    weight, height and BMI widened by 10 % of their span (a slightly heavier patient is fine)."""
    ranges = {}
    for name, column, widen in (("age", "age", 0.0), ("weight", "weight", 0.1), ("height", "height", 0.1),
                                ("bmi", "bmi", 0.1)):
        values = data.columns[column][np.isfinite(data.columns[column])]
        if len(values):
            span = float(values.max() - values.min())
            ranges[name] = [round(float(values.min()) - widen * span, 3), round(float(values.max()) + widen * span, 3)]
    return ranges


def operating_rules(operating: OperatingRule) -> dict[str, dict[str, Any]]:
    """The card's statement of the decision rule and of the category rule (the SR and card quote ``rule``).

    Parameters
    ----------
    operating : OperatingRule
        Its ``target_sensitivity`` sets the referral threshold; the osteoporosis rule of older
        cards is not used (the osteoporosis range is the category of the estimate).

    Returns
    -------
    dict
        ``{"low_bmd": {...}, "osteoporosis": {...}}`` with ``rule`` and ``target``.
    """
    return {
        "low_bmd": {"rule": f"sensitivity >= {operating.target_sensitivity:g} for low BMD on validation predictions: "
                            "DXA referral suggested when P(T < -1.0) >= thresholds.low_bmd",
                    "target": {"sensitivity": operating.target_sensitivity}},
        "osteoporosis": {"rule": "the WHO category of the estimate: osteoporosis range when the estimated T-score is "
                                 "at or below -2.5 (P(T <= -2.5) >= 0.5)",
                         "target": {"median": -2.5}},
    }


def operating_points(operating: OperatingRule, figures: Mapping[str, Any],
                     thresholds: Mapping[str, float] | None = None) -> dict[str, Any]:
    """Each operating point's rule with its cross-validated sensitivity and specificity (95 % CIs):
    what the SR and the result card state beside a label. ``thresholds``: the shipped head's."""
    out: dict[str, Any] = {}
    for name, rule in operating_rules(operating).items():
        point: dict[str, Any] = dict(rule)
        if thresholds is not None and name in thresholds:
            point["threshold"] = thresholds[name]
        for figure in ("sensitivity", "specificity"):
            if f"{figure}_{name}" in figures:
                point[figure] = figures[f"{figure}_{name}"]
        out[name] = point
    return out


def validation_figures(data: FusionData, cv: HeadCV, draws_for: Callable[[np.ndarray], list[np.ndarray]],
                       operating: OperatingRule) -> dict[str, Any]:
    rows = cv.rows
    p = Predictions(probs=cv.probs, labels=cv.labels, mu=cv.mu, low=cv.low, high=cv.high, referred=cv.referred)
    figures: dict[str, Any] = with_ci(data.y[rows], data.t[rows], p, draws_for(rows))
    figures["operating_points"] = operating_points(operating, figures)
    figures["n_images"] = len(rows)
    figures["target_sensitivity"] = operating.target_sensitivity
    figures["evaluated_on"] = "grouped 5-fold CV, nested selection, out-of-fold"
    figures["selections"] = cv.selections
    return figures


def build_fusion(
    data: FusionData, image_regions: Sequence[str], operating: OperatingRule | float, seed: int = 0,
    n_boot: int = 1000, log: Callable[[str], None] = print,
) -> tuple[dict[str, Any], dict[str, HeadCV], dict[str, Any]]:
    """(card.fusion, out-of-fold results by situation key, image decisions) for every situation."""
    operating = OperatingRule.of(operating)
    all_draws = group_bootstrap_indices(data.groups, n_boot, seed)
    position_cache: dict[bytes, list[np.ndarray]] = {}

    def draws_for(rows: np.ndarray) -> list[np.ndarray]:
        key = rows.tobytes()
        if key not in position_cache:
            if len(rows) == len(data):
                position_cache[key] = all_draws
            else:
                position_cache[key] = group_bootstrap_indices(data.groups[rows], n_boot, seed)
        return position_cache[key]

    has_image = data.image_probs is not None
    cvs: dict[str, HeadCV] = {}
    figures: dict[str, dict[str, Any]] = {}
    for covs in covariate_situations():
        for inputs in ((*(("image",) if has_image else ()), *covs), covs) if covs else ((("image",),) if has_image else ()):
            key = situation_key(inputs)
            if key in cvs or key == "none":
                continue
            result = cross_validate_head(data, inputs, operating, seed)
            if result is None:
                continue
            cvs[key] = result
            figures[key] = validation_figures(data, result, draws_for, operating)
    # Does the image add anything? Per covariate set: paired bootstrap of the low-BMD AUC.
    decisions: dict[str, Any] = {}
    for covs in covariate_situations():
        if not covs or not has_image:
            continue
        with_key, without_key = situation_key(("image", *covs)), situation_key(covs)
        if with_key not in cvs or without_key not in cvs:
            continue
        a, b = cvs[with_key], cvs[without_key]
        if not np.array_equal(a.rows, b.rows):
            continue
        delta = paired_delta(data.y[a.rows], a.probs[:, 1] + a.probs[:, 2], b.probs[:, 1] + b.probs[:, 2],
                             draws_for(a.rows))
        decisions[with_key] = {"delta_auc_low_bmd": delta, "image_used": delta["ci_low"] > 0}
    situations: dict[str, Any] = {}
    final: dict[str, dict[str, Any]] = {}  # fitted once per head actually shipped
    for key, cv in cvs.items():
        use_key = key
        note = None
        decision = decisions.get(key)
        if decision is not None and not decision["image_used"]:
            use_key = situation_key([i for i in cv.inputs if i != "image"])
            d = decision["delta_auc_low_bmd"]
            note = (f"image not used: it added nothing measurable in grouped validation (low-BMD AUC with minus "
                    f"without the image {d['value']:+.3f}, 95 % CI {d['ci_low']:+.3f} to {d['ci_high']:+.3f})")
        use = cvs[use_key]
        if use_key not in final:
            rows = use.rows
            final[use_key] = fit_head(data.matrix(features_for(use.inputs))[rows], data.y[rows], data.t[rows],
                                      data.groups[rows], features_for(use.inputs), use.inputs, operating, seed)
        entry = dict(final[use_key])
        entry["validation"] = dict(figures[use_key])
        entry["validation"]["operating_points"] = operating_points(operating, figures[use_key], entry["thresholds"])
        if note:
            entry["note"] = note
        situations[key] = entry
        log(f"fusion {key:<30} -> {situation_key(use.inputs):<28} low-BMD AUC {figures[use_key]['auc_low_bmd']['value']:.3f} "
            f"[{figures[use_key]['auc_low_bmd']['ci_low']:.2f}, {figures[use_key]['auc_low_bmd']['ci_high']:.2f}]")
    fusion = {
        "format": FUSION_FORMAT,
        "method": ("late fusion: per input situation, one predictive distribution of the T-score, Normal(mu, "
                   "sigma): mu from a ridge regression on standardised covariates (and the image network's "
                   "calibrated low-BMD / osteoporosis logits), sigma calibrated on inner grouped-CV residuals so "
                   "the 80 % interval covers 80 %; estimate, interval, class probabilities, WHO category and the "
                   "referral threshold on P(T < -1.0) all derive from it; chosen and thresholded by inner grouped CV"),
        "image_regions": list(image_regions) if has_image else [],
        "covariate_ranges": covariate_ranges(data),
        "target_sensitivity": operating.target_sensitivity,
        "operating_rules": operating_rules(operating),
        "pi_quantiles": list(PI_QUANTILES),
        "population": validation_population(data),
        "covariates_model": "osteogate-covariates",
        "image_decisions": decisions,
        "situations": situations,
    }
    return fusion, cvs, decisions
