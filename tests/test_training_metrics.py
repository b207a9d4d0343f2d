"""Metrics agree with scikit-learn, calibration helps a miscalibrated toy, thresholds hit their target."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from osteogate.training.engine import balance_weights, set_loss, warmup_cosine
from osteogate.training.metrics import (
    bootstrap,
    expected_calibration_error,
    fit_temperature,
    nll,
    operating_thresholds,
    point_metrics,
    pooled_probs,
    sensitivity_at_specificity,
    threshold_for_sensitivity,
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
