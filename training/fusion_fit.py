"""Fitting one fusion head (training/fusion.py runs it per situation and per fold): the ridge T-score
regression, its calibrated spread, and the referral threshold on P(T < -1.0), all chosen by inner
grouped CV on the training rows only."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from osteogate.model.estimand import INTERVAL_LEVEL, Z80, on_grid
from osteogate.model.fusion import FusionHead, probabilities_from_t
from osteogate.model.taxonomy import CLASSES
from osteogate.training.metrics import OperatingRule, operating_thresholds
from osteogate.training.splits import grouped_folds

RIDGE_ALPHAS = (0.3, 3.0, 30.0)  # on standardised features, ~130 training images
LOGISTIC_CS = (0.03, 0.3, 3.0)
INNER_FOLDS = 5
PI_QUANTILES = (0.10, 0.90)  # 80 % prediction interval


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


