"""model/gate.py and model/fusion.py: the pure decision logic and the numpy fusion heads."""

from __future__ import annotations

import math

import numpy as np
import pytest
from osteogate.model.card import ModelCard
from osteogate.model.covariates import Covariates
from osteogate.model.estimand import Z80, on_grid
from osteogate.model.fusion import (
    FEATURES,
    FusionHead,
    FusionInputs,
    feature_vector,
    features_for,
    probabilities_from_t,
    situation_key,
)
from osteogate.model.gate import (
    discrimination_reason,
    image_path_reason,
    out_of_range,
    situation_reason,
    trained_regions,
    without,
)
from osteogate.model.scoring import decide_label


def auc(value: float, low: float, high: float) -> dict[str, float]:
    return {"value": value, "ci_low": low, "ci_high": high}


@pytest.mark.parametrize(("low", "reported"), [(0.3729, False), (0.5, False), (0.5001, True), (0.9, True)])
def test_discrimination_needs_lower_bound_above_chance(low, reported):
    reason = discrimination_reason({"auc_low_bmd": auc(max(low, 0.6), low, 0.99)}, "the knee image alone")
    assert (reason is None) == reported
    if not reported:
        assert "no demonstrated discrimination for the knee image alone" in reason
        assert f"{low:.2f}" in reason


@pytest.mark.parametrize("validation", [{}, {"auc_low_bmd": 0.9}, {"auc_low_bmd": {"value": 0.9}},
                                        {"auc_low_bmd": {"value": "x", "ci_low": 0.8, "ci_high": 1}}, None])
def test_missing_or_malformed_figures_are_not_assessed(validation):
    assert "no grouped-validation figures" in discrimination_reason(validation or {}, "x")


def card_with(**changes) -> ModelCard:
    base = {"trained": True, "training": {"data": {"regions": ["knee"]}},
            "metrics": {"cross_validation": {"pooled_out_of_fold": {"auc_low_bmd": auc(0.7, 0.6, 0.8)}}}}
    base.update(changes)
    return ModelCard(**base)


def test_image_path_reason():
    assert image_path_reason(card_with(), "knee") is None
    assert image_path_reason(card_with(), "spine") == "the spine image head is untrained on real data"
    assert "untrained (random weights)" in image_path_reason(card_with(trained=False), "knee")
    chance = card_with(metrics={"cross_validation": {"pooled_out_of_fold": {"auc_low_bmd": auc(0.5, 0.37, 0.63)}}})
    assert "no demonstrated discrimination for the knee image alone" in image_path_reason(chance, "knee")
    # The fusion's own image-only figures win over the network's CV, and its image_regions over training data.
    fused = card_with(fusion={"image_regions": ["knee", "spine"],
                              "situations": {"image": {"validation": {"auc_low_bmd": auc(0.52, 0.4, 0.64)}}}})
    assert trained_regions(fused) == ("knee", "spine")
    assert "0.52" in image_path_reason(fused, "spine")


def test_operating_point_that_flags_everyone_is_not_assessed():
    weak = {"inputs": ["weight"], "validation": {"auc_low_bmd": auc(0.64, 0.53, 0.75),
                                                 "specificity_low_bmd": auc(0.0, 0.0, 0.0)}}
    reason = situation_reason(weak, ("weight",))
    assert reason.startswith("no useful operating point for the inputs weight")
    useful = {"inputs": ["age"], "validation": {"auc_low_bmd": auc(0.92, 0.87, 0.96),
                                                "specificity_low_bmd": auc(0.83, 0.7, 0.95)}}
    assert situation_reason(useful, ("age",)) is None
    card = card_with(metrics={"cross_validation": {"pooled_out_of_fold": {
        "auc_low_bmd": auc(0.7, 0.6, 0.8), "specificity_low_bmd": auc(0.02, 0.0, 0.06)}}})
    assert "no useful operating point for the knee image alone" in image_path_reason(card, "knee")


@pytest.mark.parametrize(("sensitivity", "specificity", "reported"), [
    (0.91, 0.17, False),  # flags 83 % of patients without low BMD: positive likelihood ratio 1.1
    (0.93, 0.42, False),  # 1.6
    (0.90, 0.56, True),  # 2.05: just above the floor
    (0.90, 0.71, True),  # 3.1
    (0.92, 1.00, True),  # no false positive at all
])
def test_operating_point_that_barely_changes_the_odds_is_not_assessed(sensitivity, specificity, reported):
    entry = {"inputs": ["sex", "weight"], "validation": {
        "auc_low_bmd": auc(0.64, 0.53, 0.77), "sensitivity_low_bmd": auc(sensitivity, sensitivity - 0.05, 1.0),
        "specificity_low_bmd": auc(specificity, max(specificity - 0.12, 0.01), min(specificity + 0.14, 1.0))}}
    reason = situation_reason(entry, ("sex", "weight"))
    assert (reason is None) is reported
    if not reported:
        assert reason.startswith("no useful operating point for the inputs sex, weight")
        assert "positive likelihood ratio" in reason and "below 2" in reason


def test_situation_reason():
    good = {"inputs": ["age"], "validation": {"auc_low_bmd": auc(0.93, 0.89, 0.96)}}
    assert situation_reason(good, ("age",)) is None
    assert "no usable inputs" in situation_reason(None, ())
    assert "no model for the inputs age, sex" in situation_reason(None, ("age", "sex"))
    bad = {"inputs": ["sex"], "validation": {"auc_low_bmd": auc(0.55, 0.45, 0.65)}}
    assert "the inputs sex" in situation_reason(bad, ("sex",))


def test_out_of_range_and_without():
    ranges = {"age": [17, 107], "weight": [40, 120], "height": [1.3, 2.0], "bmi": [15, 45]}
    adult = Covariates(age_years=60, sex="F", weight_kg=70, height_m=1.65)
    assert out_of_range(adult, ranges) == {}
    child = Covariates(age_years=9, sex="M", weight_kg=30, height_m=1.35)
    reasons = out_of_range(child, ranges)
    assert set(reasons) == {"age", "weight"} and "17-107" in reasons["age"]
    heavy = Covariates(age_years=50, weight_kg=119, height_m=1.5)  # each in range, BMI 52.9 is not
    assert set(out_of_range(heavy, ranges)) == {"weight", "height"}
    assert out_of_range(adult, {}) == {}
    stripped = without(adult, ["age", "height"])
    assert stripped.present == ("sex", "weight")


def test_decide_label():
    probs = {"normal": 0.5, "osteopenia": 0.3, "osteoporosis": 0.2}
    assert decide_label(probs, {}) == "normal"
    assert decide_label(probs, {"low_bmd": 0.4}) == "osteopenia"
    assert decide_label(probs, {"low_bmd": 0.4, "osteoporosis": 0.15}) == "osteoporosis"
    assert decide_label(probs, {"low_bmd": 0.6, "osteoporosis": 0.25}) == "normal"
    # Osteoporosis is a grade within the low-BMD flag: a P(osteoporosis) above its threshold does not
    # override a negative screen (the low-BMD point keeps the sensitivity/specificity the card states).
    assert decide_label(probs, {"low_bmd": 0.6, "osteoporosis": 0.15}) == "normal"
    assert decide_label(probs, {"low_bmd": 0.5, "osteoporosis": 0.2}) == "osteoporosis"  # thresholds inclusive
    assert decide_label(probs, {"low_bmd": 0.5, "osteoporosis": 0.21}) == "osteopenia"


def test_situation_keys_and_features():
    assert situation_key(["height", "age", "image"]) == "image+age+height"
    assert situation_key([]) == "none"
    assert features_for(["age"]) == ("age", "age_over_50", "age_over_65")
    assert "bmi" in features_for(["weight", "height"]) and "bmi" not in features_for(["weight"])
    x = FusionInputs(Covariates(age_years=70, sex="F", weight_kg=80, height_m=2.0),
                     {"normal": 0.2, "osteopenia": 0.5, "osteoporosis": 0.3})
    assert x.available == ("image", "age", "sex", "weight", "height")
    vector = feature_vector(x, list(FEATURES))
    expected = [70, 20, 5, 1, 80, 2.0, 20.0, math.log(0.8 / 0.2), math.log(0.3 / 0.7)]
    np.testing.assert_allclose(vector, expected)
    with pytest.raises(ValueError, match="needs an input"):
        feature_vector(FusionInputs(Covariates(age_years=70)), ["weight"])


def head_entry(kind: str = "multinomial") -> dict:
    entry = {
        "inputs": ["age", "sex"], "features": ["age", "female"], "center": [55.0, 0.5], "scale": [10.0, 0.5],
        "regression": {"coef": [-0.5, -0.2], "intercept": -1.5, "residual_sd": 0.4, "residual_quantiles": [-0.5, 0.45]},
        "classifier": {"kind": kind, "coef": [[-1.0, 0.0], [0.0, 0.0], [1.0, 0.5]], "intercept": [0.0, 1.0, -0.5]},
    }
    return entry


def test_old_multinomial_head_is_read_as_one_t_score_distribution():
    """A format-1 entry with a multinomial classifier: its coefficients are no longer evaluated (they
    could disagree with the T-score); the distribution is Normal(mu, sigma from the residual quantiles)."""
    head = FusionHead(head_entry())
    result = head.predict(FusionInputs(Covariates(age_years=65, sex="F")))
    mu = -1.5 - 0.5 - 0.2  # z = (65-55)/10, (1-0.5)/0.5 = 1, 1
    sigma = (0.45 + 0.5) / (2 * Z80)
    assert result.t_score == on_grid(mu) == -2.2
    expected = probabilities_from_t(np.array([-2.2]), sigma)[0]
    np.testing.assert_allclose(list(result.probabilities.values()), expected, atol=1e-12)
    assert result.t_score_interval == (on_grid(-2.2 - Z80 * sigma), on_grid(-2.2 + Z80 * sigma))
    assert result.distribution.category == "osteopenia"


def test_normal_head_uses_its_calibrated_sigma():
    entry = head_entry("normal_t")
    entry["classifier"] = {"kind": "normal_t", "sigma": 0.3}
    result = FusionHead(entry).predict(FusionInputs(Covariates(age_years=65, sex="F")))
    assert result.distribution.sd == 0.3
    assert result.t_score_interval == (on_grid(-2.2 - Z80 * 0.3), on_grid(-2.2 + Z80 * 0.3)) == (-2.6, -1.8)


def test_ordinal_head_reads_the_t_score_through_who_cut_offs():
    head = FusionHead(head_entry("ordinal_t"))
    young = head.predict(FusionInputs(Covariates(age_years=30, sex="M")))
    old = head.predict(FusionInputs(Covariates(age_years=85, sex="F")))
    assert young.t_score > old.t_score
    assert young.probabilities["normal"] > old.probabilities["normal"]
    assert old.probabilities["osteoporosis"] > young.probabilities["osteoporosis"]
    for r in (young, old):
        assert sum(r.probabilities.values()) == pytest.approx(1.0)
    probs = probabilities_from_t(np.array([-1.0, -2.5, 0.0]), 0.5)
    assert probs[0, 0] == pytest.approx(0.5) and probs[1, 2] == pytest.approx(0.5)
    assert np.all(np.diff(probs[:, 2]) != 0)


@pytest.mark.parametrize("breakage", ["shape", "kind", "feature", "missing", "scale"])
def test_malformed_heads_are_refused(breakage):
    entry = head_entry()
    if breakage == "shape":
        entry["center"] = [1.0]
    elif breakage == "kind":
        entry["classifier"]["kind"] = "forest"
    elif breakage == "feature":
        entry["features"] = ["age", "shoe_size"]
    elif breakage == "missing":
        del entry["regression"]
    else:
        entry["scale"] = [0.0, 1.0]
    with pytest.raises(ValueError):
        FusionHead(entry)
