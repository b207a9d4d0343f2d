"""The one estimand and its words: category, decision, probabilities and interval always agree
(hypothesis property tests over random inputs), and the words never rule disease out."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st
from osteogate.gateway.report import wording as reporting
from osteogate.model.assessment import Assessment
from osteogate.model.covariates import Covariates
from osteogate.model.estimand import (
    BELOW_THRESHOLD,
    REFERRAL,
    Z80,
    TScoreDistribution,
    on_grid,
    referral_decision,
)
from osteogate.model.fusion import FusionHead, FusionInputs
from osteogate.model.taxonomy import CLASSES, class_from_t_score

T_SCORES = st.floats(min_value=-6.0, max_value=4.0, allow_nan=False)
SDS = st.floats(min_value=0.05, max_value=3.0, allow_nan=False)
THRESHOLDS = st.floats(min_value=0.01, max_value=0.99, allow_nan=False)


def result(mu: float, sd: float, threshold: float, inputs: tuple[str, ...] = ("age", "sex")) -> Assessment:
    """What model/scoring.py builds from one head's distribution."""
    dist = TScoreDistribution.from_regression(mu, sd)
    return Assessment(True, label=dist.category, probabilities=dist.probabilities, t_score=dist.estimate,
                      t_score_interval=dist.interval, t_score_sd=sd,
                      decision=referral_decision(dist.p_low, threshold), referral_threshold=threshold,
                      inputs_used=inputs)


@settings(max_examples=400, deadline=None)
@given(T_SCORES, SDS, THRESHOLDS)
def test_category_probabilities_decision_and_interval_always_agree(mu: float, sd: float, threshold: float) -> None:
    dist = TScoreDistribution.from_regression(mu, sd)
    r = result(mu, sd, threshold)
    assert r.p_low is not None and r.p_osteoporosis is not None
    # P(low) >= 0.5 exactly when the estimate is below -1.0; P(osteoporosis range) >= 0.5 exactly
    # when it is at or below -2.5; the category named is the estimate's.
    assert (r.p_low >= 0.5) == (r.t_score < -1.0)
    assert (r.p_osteoporosis >= 0.5) == (r.t_score <= -2.5)
    assert r.label == class_from_t_score(r.t_score) == dist.category
    assert math.isclose(sum(r.probabilities.values()), 1.0, abs_tol=1e-12)
    assert all(0.0 <= r.probabilities[c] <= 1.0 for c in CLASSES)
    # The decision is P(low) against the threshold, nothing else.
    assert (r.decision == REFERRAL) == (r.p_low >= threshold)
    # The interval: rounded once, around the estimate, as wide as sd says (within the rounding).
    low, high = r.t_score_interval
    assert low <= r.t_score <= high
    assert (on_grid(low), on_grid(high)) == (low, high)
    assert abs((high - low) - 2 * Z80 * sd) <= 0.1 + 1e-9
    # The words say the same: the estimate, the interval's endpoints exactly, the category, the decision.
    line = reporting.headline(r)
    ends = reporting.interval_endpoints(r)
    assert f"estimated T-score {reporting.fmt_t_score(r.t_score)}" in line
    assert f"{ends[0]} to {ends[1]}" in line
    assert reporting.CATEGORY_WORDS[r.label] in line
    assert line.startswith("DXA REFERRAL SUGGESTED" if r.decision == REFERRAL else "BELOW REFERRAL THRESHOLD")


@settings(max_examples=200, deadline=None)
@given(st.floats(min_value=17, max_value=107), st.sampled_from(["F", "M"]), SDS)
def test_a_head_gives_one_distribution(age: float, sex: str, sigma: float) -> None:
    head = FusionHead({
        "inputs": ["age", "sex"], "features": ["age", "female"], "center": [55.0, 0.5], "scale": [10.0, 0.5],
        "classifier": {"kind": "normal_t", "sigma": sigma},
        "regression": {"coef": [-0.5, -0.2], "intercept": -1.5, "residual_sd": sigma, "residual_quantiles": [-1, 1]},
    })
    out = head.predict(FusionInputs(Covariates(age_years=age, sex=sex)))
    dist = out.distribution
    assert out.t_score == dist.estimate and out.t_score_interval == dist.interval
    assert out.probabilities == dist.probabilities
    probs, mu = head.predict_raw([[age, float(sex == "F")]])
    assert mu[0] == dist.estimate and list(probs[0]) == [dist.probabilities[c] for c in CLASSES]


def test_the_edges_of_the_who_ranges() -> None:
    on_cut = TScoreDistribution(-1.0, 0.4)
    assert on_cut.category == "normal" and on_cut.p_low < 0.5  # WHO: -1.0 or above is not low BMD
    below = TScoreDistribution(-1.1, 0.4)
    assert below.category == "osteopenia" and below.p_low > 0.5
    osteo = TScoreDistribution(-2.5, 0.4)
    assert osteo.category == "osteoporosis" and osteo.p_osteoporosis == 0.5
    assert on_grid(-1.05) == -1.1 and on_grid(0.04) == 0.0 and on_grid(-0.04) == 0.0


def test_headlines_say_decision_estimate_interval_and_category() -> None:
    referred = result(-1.92, 0.39, 0.84, inputs=("image", "age"))
    assert reporting.headline(referred) == (
        "DXA REFERRAL SUGGESTED - estimated T-score -1.9 (80 % interval -2.4 to -1.4), osteopenia range")
    below = result(-1.1, 0.39, 0.84, inputs=("image", "age"))
    assert reporting.headline(below) == (
        "BELOW REFERRAL THRESHOLD - estimated T-score -1.1 (-1.6 to -0.6), osteopenia range; this screen cannot "
        "rule out low bone density")
    assert below.decision == BELOW_THRESHOLD


def test_what_was_read_is_said_when_the_radiograph_was_not() -> None:
    covariates_only = result(-2.3, 0.4, 0.84, inputs=("age", "sex", "weight", "height"))
    assert reporting.headline(covariates_only).endswith(
        "; from age, sex, weight and height in the header; the radiograph was not used")
    assert "radiograph" not in reporting.headline(result(-2.3, 0.4, 0.84, inputs=("image", "age")))
    assert reporting.read_phrase(result(-2.3, 0.4, 0.84, inputs=("age",))) == (
        "from age in the header; the radiograph was not used")


def test_words_never_rule_disease_out() -> None:
    for mu in (-3.0, -1.5, -1.0, 0.0, 1.5):
        for threshold in (0.2, 0.9):
            r = result(mu, 0.4, threshold)
            for text in (reporting.headline(r), reporting.result_phrase(r)):
                lowered = text.lower()
                assert "not detected" not in lowered and "normal" not in lowered, text
    assert reporting.result_phrase(Assessment(False, reason="no inputs")) == "not assessed: no inputs"
    assert reporting.headline(Assessment(False, reason="no inputs")) == "NOT ASSESSED - no inputs"


def test_decision_basis_states_the_probability_and_the_threshold() -> None:
    r = result(-1.2, 0.4, 0.843)
    assert reporting.decision_basis(r) == f"P(T < -1.0) {reporting.low_bmd_percent(r.probabilities)} %, " \
                                          "referral threshold 84 %"


def test_malformed_operating_points_are_ignored() -> None:
    for validation in ({"operating_points": {"low_bmd": {"threshold": "x"}}}, {"operating_points": None},
                       {"operating_points": {"low_bmd": {"threshold": 1.5}}}):
        assert reporting.low_bmd_threshold(Assessment(True, label="normal", validation=validation)) is None
