"""What the SR, the result card and ``show`` say, worded once: the decision, the estimate with its
interval, the WHO category, what was read, the plain-language summary and the validation figures.

Everything here is pure (no I/O) so the SR (gateway/report/sr.py), the result card
(gateway/report/card.py) and ``show`` cannot drift apart: each number is rounded once (the model
rounds the estimate and the interval endpoints to the 0.1 grid, model/estimand.py) and printed by
the one function here that prints it. Header hygiene and image order live in
gateway/report/hygiene.py (re-exported here for callers).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from typing import Any

from osteogate.gateway.report.hygiene import (  # noqa: F401 - re-exported: one import for the builders
    SIDE_WORDS,
    clean_dataset,
    ensure_charset,
    evidence_header,
    laterality,
    text_value,
)
from osteogate.gateway.report.numbers import (  # noqa: F401 - re-exported: one import for the builders
    PROBABILITY_WORDS,
    fmt_t_score,
    interval_endpoints,
    interval_phrase,
    interval_text,
    low_bmd_percent,
    percentages,
    probability_phrase,
    t_score_text,
)
from osteogate.model.assessment import Assessment, StudyAssessment
from osteogate.model.covariates import Covariates
from osteogate.model.estimand import REFERRAL
from osteogate.model.taxonomy import COVARIATES, LOW_BMD_CLASSES

DISCLAIMER = (
    "Screening aid, not a diagnosis: it cannot rule out low bone density; confirm with DXA. "
    "Not cleared for clinical use."
)
SHORT_DISCLAIMER = "Screening aid, not a diagnosis. Not cleared for clinical use."

INPUT_LABELS: dict[str, str] = {"image": "image", "age": "age", "sex": "sex", "weight": "weight", "height": "height"}
SEX_WORDS = {"F": "female", "M": "male"}


# -- words -----------------------------------------------------------------------------------------

# The WHO category of the estimate, in words. The normal range is worded by what it is not: a
# screen cannot call bone density normal.
CATEGORY_WORDS = {
    "normal": "above the osteopenia range",
    "osteopenia": "osteopenia range",
    "osteoporosis": "osteoporosis range",
}
DECISION_HEADS = {REFERRAL: "DXA REFERRAL SUGGESTED"}
BELOW_HEAD = "BELOW REFERRAL THRESHOLD"
CANNOT_RULE_OUT = "this screen cannot rule out low bone density"
NOT_ASSESSED_HEAD = "NOT ASSESSED"


def category_phrase(assessment: Assessment) -> str | None:
    """The WHO category of the estimate in words ("osteopenia range"), or None when not assessed.

    Parameters
    ----------
    assessment : Assessment
        A result.

    Returns
    -------
    str or None
    """
    if not assessment.assessed or assessment.label is None:
        return None
    return CATEGORY_WORDS.get(assessment.label, assessment.label)


def decision_words(assessment: Assessment) -> str:
    """ "DXA referral suggested", "below the referral threshold" or "not assessed".

    Parameters
    ----------
    assessment : Assessment
        A result.

    Returns
    -------
    str
    """
    if not assessment.assessed:
        return "not assessed"
    return str(assessment.decision or ("DXA referral suggested" if assessment.label in LOW_BMD_CLASSES
                                       else "below the referral threshold"))


def _covariate_list(names: list[str]) -> str:
    if len(names) <= 1:
        return "".join(names)
    return ", ".join(names[:-1]) + " and " + names[-1]


def read_phrase(assessment: Assessment) -> str | None:
    """What was read, when the radiograph was not: "from age, sex, weight and height in the header;
    the radiograph was not used". None when the image contributed (or nothing was assessed).

    Parameters
    ----------
    assessment : Assessment
        A result.

    Returns
    -------
    str or None
    """
    if not assessment.assessed or "image" in assessment.inputs_used:
        return None
    used = [n for n in COVARIATES if n in assessment.inputs_used]
    return f"from {_covariate_list(used) or 'no input'} in the header; the radiograph was not used"


def headline(assessment: Assessment) -> str:
    """The one line a radiologist reads first (card banner, SR summary's first sentence).

    "DXA REFERRAL SUGGESTED - estimated T-score -1.9 (80 % interval -2.4 to -1.4), osteopenia
    range" or "BELOW REFERRAL THRESHOLD - estimated T-score -1.1 (-1.6 to -0.6), osteopenia range;
    this screen cannot rule out low bone density", followed by what was read when the radiograph
    was not used.

    Parameters
    ----------
    assessment : Assessment
        The study's result.

    Returns
    -------
    str
    """
    if not assessment.assessed:
        return f"{NOT_ASSESSED_HEAD} - {assessment.reason}"
    referral = decision_words(assessment) == REFERRAL
    head = DECISION_HEADS[REFERRAL] if referral else BELOW_HEAD
    parts = []
    if assessment.t_score is not None:
        interval = interval_phrase(assessment, long=referral)
        parts.append(f"estimated T-score {fmt_t_score(assessment.t_score)}" + (f" ({interval})" if interval else ""))
    elif assessment.probabilities is not None:
        parts.append(f"low bone density probability {low_bmd_percent(assessment.probabilities)} %")
    category = category_phrase(assessment)
    text = f"{head} - " + ", ".join([*parts, *([category] if category else [])])
    if not referral:
        text += f"; {CANNOT_RULE_OUT}"
    read = read_phrase(assessment)
    return text + (f"; {read}" if read else "")


def low_bmd_threshold(assessment: Assessment) -> float | None:
    """The referral threshold on P(T < -1.0) behind the decision (from the card's grouped
    validation), or None.

    Parameters
    ----------
    assessment : Assessment
        A result.

    Returns
    -------
    float or None
    """
    if assessment.referral_threshold is not None:
        return float(assessment.referral_threshold)
    points = assessment.validation.get("operating_points") if assessment.validation else None
    try:
        value = float(points["low_bmd"]["threshold"])  # type: ignore[index]
    except (KeyError, TypeError, ValueError):
        return None
    return value if math.isfinite(value) and 0 < value < 1 else None


def decision_basis(assessment: Assessment) -> str | None:
    """Why the decision is what it is: "P(T < -1.0) 62 %, referral threshold 84 %".

    Parameters
    ----------
    assessment : Assessment
        A result.

    Returns
    -------
    str or None
    """
    if assessment.probabilities is None:
        return None
    text = f"P(T < -1.0) {low_bmd_percent(assessment.probabilities)} %"
    threshold = low_bmd_threshold(assessment)
    if threshold is not None:
        text += f", referral threshold {round(100 * threshold)} %"
    return text


def result_phrase(assessment: Assessment) -> str:
    """One result in a few words: "DXA referral suggested; estimated T-score -1.9 (80 % interval
    -2.4 to -1.4), osteopenia range" or "not assessed: <reason>".

    Parameters
    ----------
    assessment : Assessment
        A result.

    Returns
    -------
    str
    """
    if not assessment.assessed:
        return f"not assessed: {assessment.reason}"
    parts = [decision_words(assessment)]
    t_text = t_score_text(assessment)
    detail = ", ".join(p for p in ((t_text[0].lower() + t_text[1:]) if t_text else None,
                                   category_phrase(assessment)) if p)
    return "; ".join([*parts, *([detail] if detail else [])])


def inputs_phrase(assessment: Assessment) -> str:
    """ "Inputs used: age, sex; missing: weight, height".

    Parameters
    ----------
    assessment : Assessment
        A result.

    Returns
    -------
    str
    """
    used = ", ".join(INPUT_LABELS.get(n, n) for n in assessment.inputs_used) or "none"
    text = f"Inputs used: {used}"
    if assessment.inputs_missing:
        text += f"; missing: {', '.join(INPUT_LABELS.get(n, n) for n in assessment.inputs_missing)}"
    return text


def algorithm_name(assessment: Assessment, default: str) -> str:
    """The name of the head that produced the result (``default``: the checkpoint's).

    Parameters
    ----------
    assessment : Assessment
        A result.
    default : str
        The checkpoint's name.

    Returns
    -------
    str
    """
    return assessment.model_name or default


_VALIDATION_NAMES = {
    "auc_low_bmd": "low-BMD AUC",
    "auc_osteoporosis": "osteoporosis AUC",
    "sensitivity_low_bmd": "referral sensitivity",
    "specificity_low_bmd": "referral specificity",
    "t_score_mae": "T-score MAE",
    "pi80_coverage": "80 % interval coverage",
    "n_images": "images",
}


def _figure(value: Any) -> str | None:
    if isinstance(value, Mapping):
        try:
            text = f"{float(value['value']):.2f}"
        except (KeyError, TypeError, ValueError):
            return None
        with contextlib.suppress(KeyError, TypeError, ValueError):
            text += f" (95 % CI {float(value['ci_low']):.2f}-{float(value['ci_high']):.2f})"
        return text
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(float(value)):
        return None
    return f"{value}" if isinstance(value, int) else f"{float(value):.2f}"


def validation_text(assessment: Assessment) -> str | None:
    """The grouped-validation figures of the head behind a result, and on whom (SR comment, card footer).

    Parameters
    ----------
    assessment : Assessment
        A result.

    Returns
    -------
    str or None
    """
    parts = []
    for key, name in _VALIDATION_NAMES.items():
        figure = _figure(assessment.validation.get(key)) if assessment.validation else None
        if figure is not None:
            parts.append(f"{name} {figure}")
    if not parts:
        return None
    where = assessment.validation.get("evaluated_on")
    text = "Validation (grouped cross-validation" + (f", {where}" if isinstance(where, str) else "")
    if assessment.population:
        text += f"; {assessment.population}"
    return text + "): " + "; ".join(parts)


def notes(assessment: Assessment, covariates: Covariates | None = None) -> tuple[str, ...]:
    """What a reader should know about the inputs (values converted or dropped, inputs left out).

    Parameters
    ----------
    assessment : Assessment
        A result.
    covariates : Covariates or None
        The study's covariates (their notes when the result has none).

    Returns
    -------
    tuple of str
    """
    return tuple(assessment.notes) or (tuple(covariates.notes) if covariates is not None else ())


def covariate_values(covariates: Covariates) -> dict[str, str]:
    """Display values of the covariates that are present (patient data: SR, card, show; never logs).

    Parameters
    ----------
    covariates : Covariates
        The covariates.

    Returns
    -------
    dict of str to str
    """
    values: dict[str, str] = {}
    if covariates.age_years is not None:
        values["age"] = f"{covariates.age_years:.0f} y"
    if covariates.sex is not None:
        values["sex"] = SEX_WORDS.get(covariates.sex, covariates.sex)
    if covariates.weight_kg is not None:
        values["weight"] = f"{covariates.weight_kg:.0f} kg"
    if covariates.height_m is not None:
        values["height"] = f"{covariates.height_m:.2f} m"
    return values


def summary_text(study: StudyAssessment) -> str:
    """The plain-language summary at the top of the SR: the headline first, then the numbers.

    Parameters
    ----------
    study : StudyAssessment
        The study's result.

    Returns
    -------
    str
        e.g. "DXA REFERRAL SUGGESTED - estimated T-score -1.9 (80 % interval -2.4 to -1.4),
        osteopenia range; from age, sex, weight and height in the header; the radiograph was not
        used. P(T < -1.0) 91 %, referral threshold 84 %. Inputs used: ... Screening aid, ..."
    """
    result = study.study
    parts = [headline(result) + "."]
    if result.assessed:
        basis = decision_basis(result)
        if basis:
            parts.append(basis[0].upper() + basis[1:] + ".")
    parts.append(inputs_phrase(result) + ".")
    parts.append(SHORT_DISCLAIMER)
    return " ".join(parts)
