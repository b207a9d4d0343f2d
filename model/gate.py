"""The gate: which results the model may report, decided from the card's grouped-validation figures.

Pure decision logic (no I/O, no numpy): every function returns ``None`` when the result may be
reported, else the reason it is "not assessed". A result is reported only when its input situation
showed discrimination in the card's grouped cross-validation (low-BMD ROC-AUC whose 95 % CI lower
bound is above chance), its operating threshold did not flag (nearly) everyone there (specificity
CI reaching 0, or a positive likelihood ratio below 2), and every part it relies on was trained on
real data (an untrained region head, e.g. spine, never yields a label).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from osteogate.model.covariates import Covariates

# A lower 95 % CI bound at or below this is "no demonstrated discrimination" (0.5 = chance).
CHANCE_AUC = 0.5
# A low-BMD flag whose positive likelihood ratio, sensitivity / (1 - specificity), is below this barely
# changes the odds: likelihood ratios of 1-2 alter the probability "to a small and rarely important
# degree" (Jaeschke, Guyatt, Sackett, JAMA 1994). Such a flag calls most patients without low BMD
# "low BMD": as useless as one that flags everyone.
MIN_POSITIVE_LR = 2.0
# Covariate names as the card's validated ranges know them (Covariates attribute names).
_RANGE_ATTRIBUTES = {"age": "age_years", "weight": "weight_kg", "height": "height_m"}


def _figure(validation: Mapping[str, Any], name: str) -> Mapping[str, Any] | None:
    value = validation.get(name) if isinstance(validation, Mapping) else None
    if not isinstance(value, Mapping):
        return None
    try:
        float(value["value"]), float(value["ci_low"]), float(value["ci_high"])
    except (KeyError, TypeError, ValueError):
        return None
    return value


def discrimination_reason(validation: Mapping[str, Any], what: str) -> str | None:
    """None if ``validation`` shows low-BMD discrimination above chance, else why not.

    Parameters
    ----------
    validation : Mapping
        Grouped-CV figures of a situation.
    what : str
        What the figures are of, for the reason.

    Returns
    -------
    str or None
    """
    auc = _figure(validation, "auc_low_bmd")
    if auc is None:
        return f"no grouped-validation figures for {what}"
    if float(auc["ci_low"]) <= CHANCE_AUC:
        return (f"no demonstrated discrimination for {what}: low-BMD cross-validated ROC-AUC "
                f"{float(auc['value']):.2f} (95 % CI {float(auc['ci_low']):.2f}-{float(auc['ci_high']):.2f})")
    return None


def operating_point_reason(validation: Mapping[str, Any], what: str) -> str | None:
    """None unless the situation's operating threshold flagged (nearly) everyone in validation.

    A weak head at a high target sensitivity can put its threshold below every case: it then calls
    every study "low BMD", which says nothing about the patient. That is the case when the low-BMD
    specificity's 95 % CI reaches 0, or when the flag's positive likelihood ratio is below
    ``MIN_POSITIVE_LR`` (it flags most patients without low BMD too). Figures absent (older cards):
    no objection here; the discrimination rule still applies.

    Parameters
    ----------
    validation : Mapping
        Grouped-CV figures of a situation.
    what : str
        What the figures are of, for the reason.

    Returns
    -------
    str or None
    """
    specificity = _figure(validation, "specificity_low_bmd")
    if specificity is None:
        return None
    spec = float(specificity["value"])
    if float(specificity["ci_low"]) <= 0.0:
        return (f"no useful operating point for {what}: at the validated threshold it flags nearly every study "
                f"(low-BMD specificity {spec:.2f}, 95 % CI "
                f"{float(specificity['ci_low']):.2f}-{float(specificity['ci_high']):.2f})")
    sensitivity = _figure(validation, "sensitivity_low_bmd")
    if sensitivity is None:
        return None
    sens = float(sensitivity["value"])
    ratio = sens / (1.0 - spec) if spec < 1.0 else float("inf")
    if ratio < MIN_POSITIVE_LR:
        return (f"no useful operating point for {what}: at the validated threshold it flags most studies without "
                f"low BMD too (low-BMD sensitivity {sens:.2f}, specificity {spec:.2f}: positive likelihood ratio "
                f"{ratio:.1f}, below {MIN_POSITIVE_LR:g})")
    return None


def trained_regions(card: Any) -> tuple[str, ...]:
    """Regions whose image head saw real images in training (from the card).

    Parameters
    ----------
    card : ModelCard
        The checkpoint's card.

    Returns
    -------
    tuple of str
    """
    if not getattr(card, "trained", False):
        return ()
    fusion = getattr(card, "fusion", None) or {}
    if isinstance(fusion.get("image_regions"), list):
        return tuple(str(r) for r in fusion["image_regions"])
    regions = (getattr(card, "training", None) or {}).get("data", {}).get("regions")
    return tuple(str(r) for r in regions) if isinstance(regions, list) else ()


def image_validation(card: Any) -> Mapping[str, Any]:
    """Grouped-CV figures of the image alone: the fusion's image-only head when the card has one,
    else the network's own cross-validation (older cards).

    Parameters
    ----------
    card : ModelCard
        The checkpoint's card.

    Returns
    -------
    Mapping
    """
    fusion = getattr(card, "fusion", None) or {}
    entry = (fusion.get("situations") or {}).get("image")
    if isinstance(entry, Mapping) and isinstance(entry.get("validation"), Mapping):
        return entry["validation"]
    metrics = getattr(card, "metrics", None) or {}
    return metrics.get("cross_validation", {}).get("pooled_out_of_fold", {})


def image_path_reason(card: Any, region: str) -> str | None:
    """None if the image network may report for ``region``, else why not.

    Parameters
    ----------
    card : ModelCard
        The checkpoint's card.
    region : str
        The region.

    Returns
    -------
    str or None
    """
    if not getattr(card, "trained", False):
        return "the image network is untrained (random weights)"
    if region not in trained_regions(card):
        return f"the {region} image head is untrained on real data"
    validation = image_validation(card)
    what = f"the {region} image alone"
    return discrimination_reason(validation, what) or operating_point_reason(validation, what)


def situation_reason(entry: Mapping[str, Any] | None, available: Sequence[str]) -> str | None:
    """None if the card's head for this input situation may report, else why not.

    Parameters
    ----------
    entry : Mapping or None
        The card's head for the situation.
    available : Sequence[str]
        The inputs the study offers.

    Returns
    -------
    str or None
    """
    if not available:
        return "no usable inputs (no image path and no age, sex, weight or height in the header)"
    if entry is None:
        return f"no model for the inputs {', '.join(available)} in this checkpoint"
    inputs = entry.get("inputs") or list(available)
    what = "the inputs " + ", ".join(inputs)
    validation = entry.get("validation") or {}
    return discrimination_reason(validation, what) or operating_point_reason(validation, what)


def out_of_range(covariates: Covariates, ranges: Mapping[str, Sequence[float]]) -> dict[str, str]:
    """Covariates outside the range the fusion head was validated on: name -> reason.

    A linear head extrapolates without warning; a value outside the validated range (e.g. a child's
    age for a model fitted on adults) is treated as missing rather than trusted.

    Parameters
    ----------
    covariates : Covariates
        The covariates.
    ranges : Mapping
        The card's validated ranges.

    Returns
    -------
    dict of str to str
    """
    reasons: dict[str, str] = {}
    for name, attribute in _RANGE_ATTRIBUTES.items():
        bounds = ranges.get(name)
        value = getattr(covariates, attribute)
        if value is None or not isinstance(bounds, list | tuple) or len(bounds) != 2:
            continue
        low, high = float(bounds[0]), float(bounds[1])
        if not low <= value <= high:
            reasons[name] = f"{name} outside the validated range {low:g}-{high:g}: not used"
    bounds = ranges.get("bmi")
    bmi = covariates.bmi
    if bmi is not None and isinstance(bounds, list | tuple) and len(bounds) == 2 and "weight" not in reasons \
            and "height" not in reasons and not float(bounds[0]) <= bmi <= float(bounds[1]):
        reasons["weight"] = reasons["height"] = (
            f"BMI outside the validated range {float(bounds[0]):g}-{float(bounds[1]):g}: weight and height not used")
    return reasons


def without(covariates: Covariates, names: Sequence[str]) -> Covariates:
    """A copy of ``covariates`` with the named ones set to missing (notes kept).

    Parameters
    ----------
    covariates : Covariates
        The covariates.
    names : Sequence[str]
        Names (``taxonomy.COVARIATES``) to drop.

    Returns
    -------
    Covariates
    """
    return Covariates(
        age_years=None if "age" in names else covariates.age_years,
        sex=None if "sex" in names else covariates.sex,
        weight_kg=None if "weight" in names else covariates.weight_kg,
        height_m=None if "height" in names else covariates.height_m,
        notes=covariates.notes,
    )


def with_age_fallback(covariates: Covariates, ranges: Mapping[str, Sequence[float]]) -> tuple[Covariates, str | None]:
    """The covariates with the age from the second source when PatientAge is out of the validated
    range and the birth and study dates give an age inside it; else unchanged.

    Parameters
    ----------
    covariates : Covariates
        As read from the header.
    ranges : Mapping
        The card's validated ranges (``fusion.covariate_ranges``).

    Returns
    -------
    tuple of (Covariates, str or None)
        The covariates to use and the note that says what was done (None when nothing was).
    """
    bounds = ranges.get("age")
    fallback = covariates.age_fallback
    if covariates.age_years is None or fallback is None or not isinstance(bounds, list | tuple) or len(bounds) != 2:
        return covariates, None
    low, high = float(bounds[0]), float(bounds[1])
    if low <= covariates.age_years <= high or not low <= fallback[0] <= high:
        return covariates, None
    note = (f"PatientAge {covariates.age_years:g} y is outside the validated range {low:g}-{high:g}: "
            f"{fallback[1]} ({fallback[0]:g} y) used")
    return replace(covariates, age_years=fallback[0], age_fallback=None), note
