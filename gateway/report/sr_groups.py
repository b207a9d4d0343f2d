"""TID 1501 measurement groups of the result SR (one for the study, one per image), and the two
small templates highdicom lacks: a per-class Probability NUM and the Qualitative Evaluations
container of TID 1500 rows 12-14.

Group content (codes in gateway/report/sr_codes.py)::

    Measurement Group "study result" | "image N (knee, right)"                   TID 1501
      Tracking Identifier / Tracking Unique Identifier, Finding Site (+ laterality)
      Algorithm Name / Version / Parameters: the head that produced the result     TID 4019
      [assessed] NUM Probability (DCM 122157) [%], one per class + Associated finding
      [assessed] NUM Estimated T-score [{T-score}] with +/- uncertainty = the printed 80 % interval
      [inputs used] NUM Subject Age, CODE Subject Sex, NUM Body weight, NUM Body height
      [assessed] CODE WHO category of the estimated T-score = Osteopenia range | ...
      [assessed] CODE Recommended Follow-up (DCM 111053) = DXA referral suggested |
                 Below the referral threshold
      TEXT Comment: "Result: ...", "Not assessed: <reason>", notes, validation, inputs
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import highdicom as hd
import pydicom
from highdicom.sr.templates import Template
from osteogate.gateway.report import wording as reporting
from osteogate.gateway.report.sr_codes import (
    ASSOCIATED_FINDING,
    BODY_HEIGHT,
    BODY_WEIGHT,
    CATEGORY_CODES,
    CLASS_CODES,
    COMMENT,
    DECISION_CODES,
    KILOGRAMS,
    KNEE,
    METRES,
    NOT_ASSESSED_PREFIX,
    PERCENT,
    PROBABILITY,
    QUALITATIVE_EVALUATIONS,
    RECOMMENDATION,
    SEX_CODES,
    SPINE,
    SPINE_SEGMENTS,
    SUBJECT_AGE,
    SUBJECT_SEX,
    T_SCORE,
    T_SCORE_CATEGORY,
    T_SCORE_UNIT,
    YEARS,
)
from osteogate.gateway.work.outcome import safe_get
from osteogate.model.assessment import Assessment
from osteogate.model.covariates import Covariates
from osteogate.model.estimand import DECISIONS, on_grid
from osteogate.model.taxonomy import CLASSES, REGIONS
from pydicom.sr.coding import Code


class ClassProbability(hd.sr.Measurement):
    """TID 300 Measurement "Probability" (DCM 122157) in whole percent, qualified by its class.

    The class goes in a HAS CONCEPT MOD "Associated finding" (SCT 246090004) CODE item on the
    NUM, so all three per-class probabilities share one standard concept name.

    Parameters
    ----------
    class_name : str
        One of ``taxonomy.CLASSES``.
    percent : int
        Whole percent, 0-100.

    Raises
    ------
    ValueError
        On an unknown class or a percentage outside 0-100.
    """

    def __init__(self, class_name: str, percent: int) -> None:
        if class_name not in CLASS_CODES:
            raise ValueError(f"unknown class {class_name!r}; expected one of {CLASSES}")
        if not 0 <= int(percent) <= 100:
            raise ValueError(f"probability of {class_name!r} out of [0, 100] %: {percent}")
        super().__init__(name=PROBABILITY, value=int(percent), unit=PERCENT)
        num_item = self[0]
        # Whole percent written as such ("72", not "72.0"): what dsr2html and viewers print.
        num_item.MeasuredValueSequence[0].NumericValue = str(int(percent))
        if "ContentSequence" not in num_item:
            num_item.ContentSequence = hd.sr.ContentSequence()
        num_item.ContentSequence.append(
            hd.sr.CodeContentItem(
                name=ASSOCIATED_FINDING,
                value=CLASS_CODES[class_name],
                relationship_type=hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD,
            )
        )


class QualitativeEvaluationsContainer(Template):
    """TID 1500 rows 12-14: CONTAINER "Qualitative Evaluations" with free TEXT items.

    highdicom's MeasurementReport has no parameter for this container, so it is appended to
    the report's root container after construction.

    Parameters
    ----------
    texts : Sequence[str]
        The TEXT Comment values.
    """

    def __init__(self, texts: Sequence[str]) -> None:
        super().__init__()
        container = hd.sr.ContainerContentItem(
            name=QUALITATIVE_EVALUATIONS,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
        container.ContentSequence = hd.sr.ContentSequence([text_item(COMMENT, text) for text in texts])
        self.append(container)


def text_item(name: Code, value: str) -> hd.sr.TextContentItem:
    """A CONTAINS TEXT content item.

    Parameters
    ----------
    name : Code
        Concept name.
    value : str
        The text.

    Returns
    -------
    highdicom.sr.TextContentItem
    """
    return hd.sr.TextContentItem(name=name, value=value, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)


def check_assessment(assessment: Assessment, what: str) -> None:
    """Refuse an assessed result the SR cannot code.

    Raises
    ------
    ValueError
        On a category outside ``CLASSES``, probabilities with other keys, or an unknown decision.

    Parameters
    ----------
    assessment : Assessment
        The result.
    what : str
        Its name in the error message.
    """
    if not assessment.assessed:
        return
    if assessment.label not in CLASSES:
        raise ValueError(f"{what}: label {assessment.label!r} is not one of {CLASSES}")
    if assessment.probabilities is not None and set(assessment.probabilities) != set(CLASSES):
        raise ValueError(f"{what}: probabilities must have keys {CLASSES}, got {sorted(assessment.probabilities)}")
    if assessment.decision is not None and assessment.decision not in DECISIONS:
        raise ValueError(f"{what}: decision {assessment.decision!r} is not one of {DECISIONS}")


def anatomy(region: str, header: pydicom.Dataset | None) -> Code:
    """The finding site code of a region (the spine segment when BodyPartExamined names one).

    Raises
    ------
    ValueError
        On an unknown region.

    Parameters
    ----------
    region : str
        The region.
    header : pydicom.Dataset or None
        A source header (BodyPartExamined).

    Returns
    -------
    Code
    """
    if region == "knee":
        return KNEE
    if region == "spine":
        body_part = str(safe_get(header, "BodyPartExamined") or "").upper() if header else ""
        return SPINE_SEGMENTS.get(body_part, SPINE)
    raise ValueError(f"region {region!r} is not one of {REGIONS}")


def study_side(headers: Sequence[pydicom.Dataset]) -> str | None:
    """The study's side only when every image states one: R, L, or B for both; else none.

    Parameters
    ----------
    headers : Sequence[pydicom.Dataset]
        The study's source headers.

    Returns
    -------
    str or None
    """
    sides = [reporting.laterality(h) for h in headers]
    if not sides or any(s is None for s in sides):
        return None
    if len(set(sides)) == 1:
        return sides[0]
    return "B"


def _evaluations(assessment: Assessment) -> list[hd.sr.QualitativeEvaluation]:
    """The WHO category of the estimate and the referral decision, each its own CODE item."""
    items = [hd.sr.QualitativeEvaluation(T_SCORE_CATEGORY, CATEGORY_CODES[str(assessment.label)])]
    decision = reporting.decision_words(assessment)
    if decision in DECISION_CODES:
        items.append(hd.sr.QualitativeEvaluation(RECOMMENDATION, DECISION_CODES[decision]))
    return items


def t_score_measurement(assessment: Assessment) -> hd.sr.Measurement:
    """NUM Estimated T-score whose +/- uncertainty reproduces the printed interval exactly.

    The interval endpoints were rounded once by the model; the half-widths here are their exact
    distances from the estimate (all on the 0.1 grid), so estimate - lower and estimate + upper give
    back the endpoints the summary, the card and ``show`` print.

    Parameters
    ----------
    assessment : Assessment
        An assessed result with a T-score.

    Returns
    -------
    highdicom.sr.Measurement
    """
    properties = None
    estimate = float(assessment.t_score)  # type: ignore[arg-type]
    if assessment.t_score_interval is not None:
        low, high = assessment.t_score_interval
        properties = hd.sr.MeasurementProperties(
            upper_measurement_uncertainty=on_grid(max(0.0, high - estimate)),
            lower_measurement_uncertainty=on_grid(max(0.0, estimate - low)),
        )
    return hd.sr.Measurement(name=T_SCORE, value=estimate, unit=T_SCORE_UNIT, derivation=None, properties=properties)


def compact(item: pydicom.Dataset) -> None:
    """Write every numeric value of an item tree the way people write it ("58", not "58.0").

    Parameters
    ----------
    item : pydicom.Dataset
        A content item (changed in place).
    """
    for measured in item.get("MeasuredValueSequence", []):
        measured.NumericValue = f"{float(measured.NumericValue):.6g}"
        if "FloatingPointValue" in measured:
            del measured.FloatingPointValue
    for child in item.get("ContentSequence", []):
        compact(child)


def _covariate_items(assessment: Assessment, covariates: Covariates) -> tuple[list[hd.sr.Measurement], list[Any]]:
    """The covariate values this result used, as standard NUM / CODE items."""
    used = set(assessment.inputs_used)
    measurements: list[hd.sr.Measurement] = []
    codes_: list[Any] = []
    if "age" in used and covariates.age_years is not None:
        measurements.append(hd.sr.Measurement(SUBJECT_AGE, round(covariates.age_years, 1), YEARS))
    if "weight" in used and covariates.weight_kg is not None:
        measurements.append(hd.sr.Measurement(BODY_WEIGHT, round(covariates.weight_kg, 1), KILOGRAMS))
    if "height" in used and covariates.height_m is not None:
        measurements.append(hd.sr.Measurement(BODY_HEIGHT, round(covariates.height_m, 2), METRES))
    if "sex" in used and covariates.sex in SEX_CODES:
        codes_.append(hd.sr.QualitativeEvaluation(SUBJECT_SEX, SEX_CODES[covariates.sex]))
    return measurements, codes_


def _result_items(assessment: Assessment) -> tuple[list[hd.sr.Measurement], list[str]]:
    """The result's NUMs (class probabilities, T-score) and its first comment, in words."""
    if not assessment.assessed:
        return [], [f"{NOT_ASSESSED_PREFIX}{assessment.reason}"]
    measurements: list[hd.sr.Measurement] = []
    # The result in words first: SR viewers (dsr2html too) print the class of each probability
    # only in a footnote, so the reader also gets one line that needs no footnote.
    text = f"Result: {reporting.result_phrase(assessment)}"
    if assessment.probabilities is not None:
        rounded = reporting.percentages(assessment.probabilities)
        measurements += [ClassProbability(name, rounded[name]) for name in CLASSES]
        basis = reporting.decision_basis(assessment)
        text += "; " + reporting.probability_phrase(assessment.probabilities) + (f"; {basis}" if basis else "")
    if assessment.t_score is not None:
        measurements.append(t_score_measurement(assessment))
    return measurements, [text]


def measurement_group(
    *,
    identifier: str,
    tracking_uid: str,
    assessment: Assessment,
    algorithm_id: hd.sr.AlgorithmIdentification,
    finding_site: hd.sr.FindingSite,
    covariates: Covariates | None,
    source_images: list[hd.sr.SourceImageForMeasurementGroup] | None = None,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """One TID 1501 group (see the module docstring for its content).

    Parameters
    ----------
    identifier, tracking_uid : str
        Tracking Identifier and Tracking Unique Identifier.
    assessment : Assessment
        The result the group reports.
    algorithm_id : highdicom.sr.AlgorithmIdentification
        The head that produced it.
    finding_site : highdicom.sr.FindingSite
        Where.
    covariates : Covariates or None
        The header covariates (study group only).
    source_images : list or None
        The image the group is about (image groups).

    Returns
    -------
    highdicom.sr.MeasurementsAndQualitativeEvaluations
    """
    measurements, texts = _result_items(assessment)
    evaluations: list[Any] = []
    if covariates is not None:
        values, sex = _covariate_items(assessment, covariates)
        measurements += values
        evaluations += sex
    texts += list(reporting.notes(assessment, covariates))
    validation = reporting.validation_text(assessment)
    if validation:
        texts.append(validation)
    if assessment.assessed:
        evaluations += _evaluations(assessment)
    texts.append(reporting.inputs_phrase(assessment))
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid, identifier=identifier),
        algorithm_id=algorithm_id,
        finding_sites=[finding_site],
        measurements=measurements or None,
        qualitative_evaluations=evaluations or None,
        source_images=source_images,
    )
    # TID 1501 is extensible; free-text comments go after the coded content.
    group[0].ContentSequence.extend(text_item(COMMENT, text) for text in texts)
    return group
