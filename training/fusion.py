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
from osteogate.model.estimand import REFERRAL, referral_decision
from osteogate.model.fusion import (
    FEATURES,
    FUSION_FORMAT,
    FusionHead,
    FusionInputs,
    features_for,
    situation_key,
)
from osteogate.model.taxonomy import CLASSES, COVARIATES, class_from_t_score
from osteogate.training.fusion_fit import (  # noqa: F401 - re-exported for callers and tests
    INNER_FOLDS,
    LOGISTIC_CS,
    PI_QUANTILES,
    RIDGE_ALPHAS,
    Candidate,
    _fit_multinomial,
    _fit_ridge,
    calibrated_sigma,
    fit_head,
    group_weights,
)
from osteogate.training.fusion_metrics import (  # noqa: F401 - re-exported for callers and tests
    Predictions,
    _ece,
    _macro_prf,
    auc,
    group_bootstrap_indices,
    paired_delta,
    row_metrics,
    with_ci,
)
from osteogate.training.metrics import OperatingRule

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
