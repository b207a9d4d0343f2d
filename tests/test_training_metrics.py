"""Metrics agree with scikit-learn, calibration helps a miscalibrated toy, thresholds hit their target
(low BMD at a sensitivity, the osteoporosis grade at a specificity or the best label macro-F1 above a
specificity floor)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from osteogate.model.scoring import decide_label
from osteogate.model.taxonomy import CLASSES
from osteogate.training.engine import balance_weights, set_loss, warmup_cosine
from osteogate.training.metrics import (
    OperatingRule,
    bootstrap,
    expected_calibration_error,
    fit_temperature,
    label_macro_f1,
    nll,
    operating_thresholds,
    point_metrics,
    pooled_probs,
    sensitivity_at_specificity,
    threshold_for_sensitivity,
    threshold_for_specificity,
)
from scipy.special import softmax
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score, roc_auc_score


@pytest.fixture
def predictions() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 200)
    logits = rng.normal(0, 1, (200, 3))
    logits[np.arange(200), y] += 1.2  # informative but imperfect
    return y, softmax(logits, axis=1)


def test_point_metrics_match_sklearn(predictions: tuple[np.ndarray, np.ndarray]) -> None:
    y, probs = predictions
    pred = probs.argmax(1)
    m = point_metrics(y, probs)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["f1_macro"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert m["precision_macro"] == pytest.approx(precision_score(y, pred, average="macro"))
    assert m["recall_osteopenia"] == pytest.approx(recall_score(y, pred, average=None)[1])
    assert m["auc_osteoporosis"] == pytest.approx(roc_auc_score(y == 2, probs[:, 2]))
    assert m["auc_low_bmd"] == pytest.approx(roc_auc_score(y >= 1, probs[:, 1] + probs[:, 2]))


def test_known_small_case() -> None:
    y = np.array([0, 0, 1, 2])
    probs = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.1, 0.2, 0.7]])
    m = point_metrics(y, probs)
    assert m["accuracy"] == 0.75
    assert m["recall_normal"] == 0.5 and m["precision_osteopenia"] == 0.5
    assert m["auc_low_bmd"] == 1.0  # low-BMD scores 0.2, 0.8 (normals) vs 0.9, 0.9
    assert m["sens_low_bmd_at_spec_0.90"] == 1.0


def test_sensitivity_at_specificity_and_threshold() -> None:
    y = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 1])
    score = np.array([0.1, 0.2, 0.3, 0.4, 0.9, 0.35, 0.5, 0.6, 0.7, 0.8])
    assert sensitivity_at_specificity(y, score, 0.8) == pytest.approx(0.8)  # threshold 0.5: 4/5, FPR 1/5
    t = threshold_for_sensitivity(y, score, 1.0)
    assert t == pytest.approx(0.35) and ((score >= t) & (y == 1)).sum() == 5


def test_bootstrap_ci_brackets_the_value(predictions: tuple[np.ndarray, np.ndarray]) -> None:
    y, probs = predictions
    result = bootstrap(y, probs, n_boot=200)
    for key in ("accuracy", "auc_low_bmd", "f1_macro", "ece"):
        assert result[key]["ci_low"] <= result[key]["value"] <= result[key]["ci_high"]
    assert result["accuracy"]["ci_high"] - result["accuracy"]["ci_low"] < 0.3


def test_temperature_scaling_fixes_overconfidence(predictions: tuple[np.ndarray, np.ndarray]) -> None:
    y, probs = predictions
    logits = np.log(probs) * 4.0  # 4x overconfident
    t = fit_temperature(logits, y)
    assert 3.0 < t < 5.5
    assert nll(logits, y, t) < nll(logits, y) - 0.1
    assert expected_calibration_error(y, softmax(logits / t, 1)) < expected_calibration_error(y, softmax(logits, 1))


def test_patch_pooling_is_mean_of_probabilities() -> None:
    logits = np.array([[[4.0, 0.0, 0.0], [0.0, 4.0, 0.0]]])
    expected = (softmax(logits[0, 0]) + softmax(logits[0, 1])) / 2
    assert np.allclose(pooled_probs(logits)[0], expected)


def test_operating_thresholds_reach_target() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 300)
    probs = softmax(rng.normal(0, 1, (300, 3)) + 1.5 * np.eye(3)[y], axis=1)
    thresholds = operating_thresholds(y, probs, 0.9)
    flagged = probs[:, 1] + probs[:, 2] >= thresholds["low_bmd"]
    assert flagged[y >= 1].mean() >= 0.9


def _labels(probs: np.ndarray, thresholds: dict[str, float]) -> np.ndarray:
    """The reported labels, through serving's own decision rule."""
    return np.array([CLASSES.index(decide_label(dict(zip(CLASSES, row, strict=True)), thresholds)) for row in probs])


def _graded_toy(seed: int = 3, n: int = 400) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.choice(3, n, p=[0.2, 0.6, 0.2])
    return y, softmax(rng.normal(0, 1, (n, 3)) + 1.2 * np.eye(3)[y], axis=1)


def test_threshold_for_specificity() -> None:
    y = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 1])
    score = np.array([0.1, 0.2, 0.3, 0.4, 0.7, 0.5, 0.6, 0.8, 0.9, 0.35])
    # Specificity 0.8 allows one of 5 negatives flagged: the lowest such threshold is 0.5 (0.7 flagged).
    assert threshold_for_specificity(y, score, 0.8) == 0.5
    assert threshold_for_specificity(y, score, 1.0) == 0.8  # no negative flagged, best sensitivity
    assert threshold_for_specificity(y, score, 0.0) == 0.1  # everyone flagged is allowed
    only_negatives_high = threshold_for_specificity(np.array([1, 0]), np.array([0.2, 0.9]), 1.0)
    assert only_negatives_high > 0.9  # nothing can be flagged without a false positive


@pytest.mark.parametrize("target", [0.7, 0.8, 0.9])
def test_osteoporosis_grade_reaches_its_specificity_and_keeps_the_low_bmd_point(target: float) -> None:
    y, probs = _graded_toy()
    rule = OperatingRule(0.9, "specificity", target)
    thresholds = operating_thresholds(y, probs, rule)
    labels = _labels(probs, thresholds)
    graded = labels == 2
    assert 1 - graded[y != 2].mean() >= target  # specificity of the reported "osteoporosis"
    # The lowest such threshold: one step lower would over-call.
    lower = probs[:, 2][(probs[:, 2] < thresholds["osteoporosis"]) & (labels >= 1)]
    if len(lower):
        looser = _labels(probs, {**thresholds, "osteoporosis": float(lower.max())})
        assert 1 - (looser == 2)[y != 2].mean() < target
    # The grade never changes who is flagged low BMD: the screening point keeps its sensitivity.
    flagged = probs[:, 1] + probs[:, 2] >= thresholds["low_bmd"]
    np.testing.assert_array_equal(labels >= 1, flagged)
    assert flagged[y >= 1].mean() >= 0.9


def test_label_f1_rule_keeps_its_specificity_floor_and_beats_the_other_rules_in_sample() -> None:
    y, probs = _graded_toy(seed=4)
    f1 = {}
    for name in ("label_f1", "specificity", "sensitivity"):
        thresholds = operating_thresholds(y, probs, OperatingRule(0.9, name, 0.8))
        labels = _labels(probs, thresholds)
        f1[name] = label_macro_f1(y, labels)
        if name != "sensitivity":
            assert 1 - (labels == 2)[y != 2].mean() >= 0.8
    assert f1["label_f1"] >= max(f1["specificity"], f1["sensitivity"])
    # A bare number is the low-BMD target with the default osteoporosis rule.
    assert operating_thresholds(y, probs, 0.9) == operating_thresholds(y, probs, OperatingRule(0.9))
    assert OperatingRule().osteoporosis == "label_f1" and OperatingRule().osteoporosis_specificity == 0.8


def test_label_macro_f1_matches_scikit_learn() -> None:
    rng = np.random.default_rng(2)
    y, pred = rng.integers(0, 3, 100), rng.integers(0, 3, 100)
    assert label_macro_f1(y, pred) == pytest.approx(f1_score(y, pred, average="macro", labels=[0, 1, 2], zero_division=0))
    assert label_macro_f1(np.array([0, 1]), np.array([0, 0])) == pytest.approx(f1_score([0, 1], [0, 0], average="macro",
                                                                                        labels=[0, 1, 2], zero_division=0))


def test_operating_rule_describes_itself_and_refuses_nonsense() -> None:
    described = OperatingRule(0.9, "label_f1", 0.8).describe()
    assert described["low_bmd"]["target"] == {"sensitivity": 0.9}
    assert described["osteoporosis"]["target"] == {"max": "label_f1_macro", "min_specificity": 0.8}
    assert "specificity >= 0.8" in described["osteoporosis"]["rule"]
    assert OperatingRule(0.9, "specificity", 0.85).describe()["osteoporosis"]["target"] == {"specificity": 0.85}
    with pytest.raises(ValueError, match="osteoporosis rule"):
        OperatingRule(0.9, "youden")
    with pytest.raises(ValueError, match="osteoporosis_specificity"):
        OperatingRule(0.9, "specificity", 1.5)


def test_set_loss_is_cross_entropy_for_one_hot_and_uses_the_set_otherwise() -> None:
    logits = torch.tensor([[[2.0, 0.5, -1.0]], [[0.1, 1.0, 1.5]]])
    one_hot = torch.tensor([[True, False, False], [False, False, True]])
    weights = torch.ones(2)
    expected = torch.nn.functional.cross_entropy(logits[:, 0], torch.tensor([0, 2]))
    assert torch.allclose(set_loss(logits, one_hot, weights), expected)
    low_bmd = torch.tensor([[False, True, True]])
    p = torch.softmax(logits[1, 0], 0)
    assert torch.allclose(set_loss(logits[1:], low_bmd, torch.ones(1)), -torch.log(p[1] + p[2]))


def test_balance_weights_and_schedule() -> None:
    w = balance_weights(["a", "a", "a", "b"])
    assert w[3] == pytest.approx(3 * w[0]) and w.mean() == pytest.approx(1.0)
    assert warmup_cosine(0, 10, 100) == pytest.approx(0.1)
    assert warmup_cosine(10, 10, 100) == pytest.approx(1.0)
    assert warmup_cosine(100, 10, 100) == pytest.approx(0.0)
