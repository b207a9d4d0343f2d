"""training/fusion.py: fast metrics against scikit-learn, grouped bootstrap, nested CV without leakage,
and the rule that ships the image only where it adds something."""

from __future__ import annotations

import numpy as np
import pytest
from osteogate.model.covariates import Covariates
from osteogate.model.fusion import FusionHead
from osteogate.model.taxonomy import class_from_t_score
from osteogate.training.fusion import (
    FusionData,
    Predictions,
    _ece,
    _macro_prf,
    auc,
    build_fusion,
    cross_validate_head,
    fit_head,
    group_bootstrap_indices,
    operating_rules,
    row_metrics,
)
from osteogate.training.metrics import OperatingRule, expected_calibration_error
from sklearn.metrics import precision_recall_fscore_support, roc_auc_score

CLASS_INDEX = {"normal": 0, "osteopenia": 1, "osteoporosis": 2}


def synthetic(n: int = 150, seed: int = 0, image_signal: float = 0.0) -> FusionData:
    """T-score falls with age; the image probabilities carry `image_signal` of the residual T-score."""
    rng = np.random.default_rng(seed)
    age = rng.uniform(25, 85, n)
    sex = rng.choice(["F", "M"], n)
    weight = rng.normal(70, 10, n)
    height = rng.normal(1.66, 0.08, n)
    residual = rng.normal(0, 0.5, n)
    t = -0.045 * (age - 30) - 0.3 + 0.01 * (weight - 70) + residual
    y = np.array([CLASS_INDEX[class_from_t_score(v)] for v in t])
    low = 1 / (1 + np.exp(image_signal * residual * 4 + rng.normal(0, 1, n)))  # lower residual -> higher P(low)
    op = low * 0.4
    probs = np.stack([1 - low, low - op, op], axis=1)
    groups = np.arange(n) // 2  # pairs of copies
    folds = groups % 5
    covariates = [Covariates(age_years=float(a), sex=str(s), weight_kg=float(w), height_m=float(h))
                  for a, s, w, h in zip(age, sex, weight, height, strict=True)]
    return FusionData(covariates=covariates, image_probs=probs, y=y, t=t, groups=groups, folds=folds)


def test_fast_metrics_match_scikit_learn():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 200)
    score = np.round(rng.random(200), 1)  # many ties
    assert auc(y >= 1, score) == pytest.approx(roc_auc_score(y >= 1, score))
    pred = rng.integers(0, 3, 200)
    p, r, f, _ = precision_recall_fscore_support(y, pred, labels=[0, 1, 2], average="macro", zero_division=0)
    assert _macro_prf(y, pred) == pytest.approx((p, r, f))
    probs = rng.dirichlet([1, 1, 1], 200)
    assert _ece(y, probs) == pytest.approx(expected_calibration_error(y, probs))
    assert np.isnan(auc(np.zeros(5, bool), np.arange(5)))


def test_own_solvers_match_scikit_learn():
    from osteogate.training.fusion import _fit_multinomial, _fit_ridge
    from sklearn.linear_model import LogisticRegression, Ridge

    rng = np.random.default_rng(0)
    z = rng.normal(size=(120, 4))
    y = rng.integers(0, 3, 120)
    z[:, 0] += y
    w = rng.uniform(0.5, 1.5, 120)
    for c in (0.03, 3.0):
        coef, intercept = _fit_multinomial(z, y, w, c)
        reference = LogisticRegression(C=c, max_iter=10000, tol=1e-10).fit(z, y, sample_weight=w)
        np.testing.assert_allclose(coef, reference.coef_ - reference.coef_.mean(axis=0), atol=1e-5)
        np.testing.assert_allclose(intercept, reference.intercept_ - reference.intercept_.mean(), atol=1e-5)
    t = z[:, 0] + rng.normal(size=120)
    coef, intercept = _fit_ridge(z, t, w, 3.0)
    reference = Ridge(alpha=3.0).fit(z, t, sample_weight=w)
    np.testing.assert_allclose(coef, reference.coef_, atol=1e-9)
    assert intercept == pytest.approx(reference.intercept_)
    assert _fit_multinomial(z, np.minimum(y, 1), w, 1.0) is None  # a class missing: no 3-class head


def test_group_bootstrap_moves_copies_together():
    groups = np.repeat(np.arange(30), 3)
    for draw in group_bootstrap_indices(groups, 20, seed=0):
        counts = np.bincount(groups[draw], minlength=30)
        assert np.all(counts % 3 == 0)


def test_fit_head_learns_the_age_effect_and_its_interval():
    data = synthetic(300)
    names = ("age", "female", "weight")
    entry = fit_head(data.matrix(names), data.y, data.t, data.groups, names, ("age", "sex", "weight"), 0.9)
    head = FusionHead(entry)
    assert head.reg_coef[0] < 0  # older -> lower T-score
    test = synthetic(300, seed=5)
    probs, mu = head.predict_raw(test.matrix(names))
    low, high = head.interval_raw(mu)
    coverage = np.mean((test.t >= low) & (test.t <= high))
    assert 0.7 < coverage < 0.9  # sigma calibrated on inner CV residuals: ~80 % on new data
    assert auc(test.y >= 1, probs[:, 1] + probs[:, 2]) > 0.85
    assert set(entry["thresholds"]) == {"low_bmd"}
    assert entry["selection"]["classifier"] == "normal_t" and entry["classifier"]["sigma"] > 0


def test_outer_test_fold_labels_never_reach_its_predictions():
    """Scrambling the labels and T-scores of one outer fold leaves that fold's predictions unchanged."""
    data = synthetic(150)
    inputs = ("age", "sex")
    before = cross_validate_head(data, inputs, 0.9)
    fold0 = np.nonzero(data.folds == 0)[0]
    rng = np.random.default_rng(9)
    data.t[fold0] = rng.permutation(data.t[fold0]) + 3.0
    data.y[fold0] = rng.permutation(data.y[fold0])
    after = cross_validate_head(data, inputs, 0.9)
    rows = np.isin(before.rows, fold0)
    np.testing.assert_allclose(before.probs[rows], after.probs[rows])
    np.testing.assert_allclose(before.mu[rows], after.mu[rows])
    assert not np.allclose(before.probs[~rows], after.probs[~rows])  # the other folds did train on them


def test_row_metrics_operating_point():
    y = np.array([0, 0, 1, 2, 2])
    labels = np.array([0, 1, 1, 2, 1])
    m = row_metrics(y, np.zeros(5), Predictions(labels=labels, low_bmd_score=np.arange(5.0)))
    assert m["sensitivity_low_bmd"] == 1.0 and m["specificity_low_bmd"] == 0.5
    assert m["sensitivity_osteoporosis"] == 0.5 and m["specificity_osteoporosis"] == 1.0
    assert m["auc_low_bmd"] == 1.0
    # 3-class figures of the reported label: 3 of 5 right; per class F1 0.67, 0.5, 0.67.
    assert m["label_accuracy"] == pytest.approx(0.6)
    assert m["label_f1_macro"] == pytest.approx((2 / 3 + 0.5 + 2 / 3) / 3)
    assert m["label_precision_macro"] == pytest.approx((1 + 1 / 3 + 1) / 3)
    assert m["label_recall_macro"] == pytest.approx((0.5 + 1 + 0.5) / 3)


@pytest.mark.parametrize(("signal", "used"), [(0.0, False), (3.0, True)])
def test_image_is_shipped_only_where_it_adds_something(signal, used):
    data = synthetic(200, image_signal=signal)
    fusion, cvs, decisions = build_fusion(data, ["knee"], 0.9, n_boot=200, log=lambda _m: None)
    decision = decisions["image+age+sex+weight+height"]
    assert decision["image_used"] is used
    entry = fusion["situations"]["image+age+sex+weight+height"]
    assert ("image" in entry["inputs"]) is used
    if not used:
        assert entry["note"].startswith("image not used: it added nothing measurable")
        assert entry["validation"] == fusion["situations"]["age+sex+weight+height"]["validation"]
    assert fusion["covariate_ranges"]["age"][0] >= 25 and "none" not in fusion["situations"]
    assert len(fusion["situations"]) == 31  # 15 covariate sets, with and without the image, and the image alone
    for entry in fusion["situations"].values():
        FusionHead(entry)  # every shipped head loads in serving


def test_card_states_each_operating_point_with_its_rule_and_figures():
    data = synthetic(200)
    rule = OperatingRule(0.9, "specificity", 0.8)
    fusion, _, _ = build_fusion(data, ["knee"], rule, n_boot=100, log=lambda _m: None)
    assert fusion["target_sensitivity"] == 0.9 and fusion["operating_rules"] == operating_rules(rule)
    entry = fusion["situations"]["age+sex+weight+height"]
    points = entry["validation"]["operating_points"]
    assert set(points) == {"low_bmd", "osteoporosis"}
    assert points["low_bmd"]["threshold"] == entry["thresholds"]["low_bmd"]  # the shipped head's own threshold
    for name in points:
        assert points[name]["rule"] == operating_rules(rule)[name]["rule"]
        for figure in ("sensitivity", "specificity"):
            assert points[name][figure] == entry["validation"][f"{figure}_{name}"]
            assert {"value", "ci_low", "ci_high"} <= set(points[name][figure])
    assert points["osteoporosis"]["target"] == {"median": -2.5}  # the category of the estimate
    assert entry["validation"]["specificity_osteoporosis"]["value"] >= 0.7
    for key in ("label_accuracy", "label_precision_macro", "label_recall_macro", "label_f1_macro", "f1_macro"):
        assert {"value", "ci_low", "ci_high"} <= set(entry["validation"][key])


def test_outer_labels_use_only_training_fold_thresholds():
    """The nested label rule is chosen on the outer training folds: scrambling one outer test fold's
    labels leaves that fold's reported labels unchanged."""
    data = synthetic(150)
    rule = OperatingRule(0.9, "label_f1", 0.8)
    before = cross_validate_head(data, ("age", "sex"), rule)
    fold0 = np.nonzero(data.folds == 0)[0]
    data.y[fold0] = np.random.default_rng(2).permutation(data.y[fold0])
    data.t[fold0] = data.t[fold0] - 2.0
    after = cross_validate_head(data, ("age", "sex"), rule)
    rows = np.isin(before.rows, fold0)
    np.testing.assert_array_equal(before.labels[rows], after.labels[rows])
