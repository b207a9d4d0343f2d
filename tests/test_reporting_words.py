"""Pure wording rules of gateway.report.wording: what a "not detected" result says about its numbers."""

from __future__ import annotations

from osteogate.gateway.report import wording as reporting
from osteogate.model.assessment import Assessment

VALIDATION = {"operating_points": {"low_bmd": {"threshold": 0.763}}}


def test_not_detected_states_the_low_bmd_probability_and_the_threshold() -> None:
    result = Assessment(True, label="normal", probabilities={"normal": 0.38, "osteopenia": 0.59, "osteoporosis": 0.03},
                        validation=VALIDATION)
    assert reporting.result_phrase(result) == "normal (low bone density 62 %, below the screening threshold of 76 %)"
    assert reporting.headline(result) == "Low bone density not detected"


def test_without_an_operating_point_the_probability_still_shows() -> None:
    result = Assessment(True, label="normal", probabilities={"normal": 0.9, "osteopenia": 0.08, "osteoporosis": 0.02})
    assert reporting.result_phrase(result) == "normal (low bone density 10 %)"
    assert reporting.low_bmd_threshold(result) is None


def test_flagged_results_name_their_class() -> None:
    result = Assessment(True, label="osteopenia", probabilities={"normal": 0.2, "osteopenia": 0.72, "osteoporosis": 0.08},
                        validation=VALIDATION)
    assert reporting.result_phrase(result) == "osteopenia 72 %"
    assert reporting.result_phrase(Assessment(False, reason="no inputs")) == "not assessed: no inputs"


def test_malformed_operating_points_are_ignored() -> None:
    for validation in ({"operating_points": {"low_bmd": {"threshold": "x"}}}, {"operating_points": None},
                       {"operating_points": {"low_bmd": {"threshold": 1.5}}}):
        assert reporting.low_bmd_threshold(Assessment(True, label="normal", validation=validation)) is None
