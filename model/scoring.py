"""From image scores and header covariates to a study's assessment (pure numpy, no torch).

``assess_study`` is what ``Classifier.assess`` runs: per image, the image alone (gated by the
card's image-only figures and the region head's training); for the study, the card's fusion head
for the input situation the study offers (gated by that situation's grouped-CV figures), with the
T-score estimate and its 80 % prediction interval, and the label from the situation's operating
thresholds. Every result that cannot be backed by the card is "not assessed" with the reason.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from osteogate.model.assessment import Assessment, ImageAssessment, ImageScore, StudyAssessment
from osteogate.model.card import ModelCard
from osteogate.model.covariates import Covariates
from osteogate.model.estimand import category_from_probabilities, referral_decision
from osteogate.model.fusion import FUSION_FORMAT, FusionHead, FusionInputs, FusionResult, situation_key
from osteogate.model.gate import (
    image_path_reason,
    image_validation,
    out_of_range,
    situation_reason,
    trained_regions,
    with_age_fallback,
    without,
)
from osteogate.model.taxonomy import CLASSES, COVARIATES, LOW_BMD_CLASSES

# Validation figures copied onto an Assessment (and from there to the SR and the result card).
# ``operating_points`` states each threshold's rule with its cross-validated sensitivity and
# specificity; ``label_*`` are the 3-class figures of the reported (thresholded) label, beside the
# most-probable-class ``f1_macro``.
VALIDATION_KEYS = ("auc_low_bmd", "auc_osteoporosis", "f1_macro", "ece", "t_score_mae", "t_score_pearson_r",
                   "pi80_coverage", "sensitivity_low_bmd", "specificity_low_bmd", "sensitivity_osteoporosis",
                   "specificity_osteoporosis", "operating_points", "label_accuracy", "label_precision_macro",
                   "label_recall_macro", "label_f1_macro", "n_images", "target_sensitivity", "evaluated_on")


def decide_label(probabilities: Mapping[str, float], thresholds: Mapping[str, float]) -> str:
    """The class reported for one image (or a study), from calibrated probabilities.

    With operating thresholds (chosen on validation by the card's stated rules): low BMD when
    P(osteopenia) + P(osteoporosis) >= thresholds.low_bmd (the screening prompt); within that flag,
    osteoporosis when P(osteoporosis) >= thresholds.osteoporosis (a severity grade), else osteopenia;
    normal when low BMD is not flagged. The grade never overrides the screening threshold, so the
    low-BMD label keeps exactly the sensitivity and specificity the card states for it. Without
    thresholds: the most probable class. Kept for the legacy per-image ``Classifier.predict`` API;
    reported results name the category of their T-score distribution instead (model/estimand.py).

    Parameters
    ----------
    probabilities : Mapping[str, float]
        Calibrated class probabilities.
    thresholds : Mapping[str, float]
        Operating thresholds (``low_bmd``, optionally ``osteoporosis``).

    Returns
    -------
    str
        One of ``taxonomy.CLASSES``.
    """
    low_bmd = thresholds.get("low_bmd")
    osteoporosis = thresholds.get("osteoporosis")
    if low_bmd is None or not set(CLASSES) <= probabilities.keys():
        return max(probabilities, key=probabilities.__getitem__)
    if sum(probabilities[c] for c in LOW_BMD_CLASSES) < low_bmd:
        return "normal"
    if osteoporosis is not None and probabilities["osteoporosis"] >= osteoporosis:
        return "osteoporosis"
    return "osteopenia"


def load_fusion_heads(card: ModelCard) -> dict[str, FusionHead]:
    """Situation key -> head, from the card's fusion section.

    Parameters
    ----------
    card : ModelCard
        The checkpoint's card.

    Returns
    -------
    dict
        Situation key -> ``FusionHead`` (empty for a card without fusion heads).

    Raises
    ------
    ValueError
        When the fusion section is malformed (checked at checkpoint load).
    """
    fusion = card.fusion
    if not fusion:
        return {}
    if fusion.get("format") != FUSION_FORMAT:
        raise ValueError(f"model card fusion format {fusion.get('format')!r} is not {FUSION_FORMAT}")
    situations = fusion.get("situations")
    if not isinstance(situations, dict):
        raise ValueError("model card fusion.situations must be an object")
    heads = {}
    for key, entry in situations.items():
        try:
            heads[key] = FusionHead(entry)
        except ValueError as exc:
            raise ValueError(f"model card fusion situation {key!r}: {exc}") from exc
    return heads


def _validation(figures: Mapping[str, Any] | None) -> dict[str, Any]:
    figures = figures or {}
    return {key: figures[key] for key in VALIDATION_KEYS if key in figures}


def _mean_probabilities(scores: Sequence[ImageScore]) -> dict[str, float]:
    """Study-level image probabilities: the mean over the study's images (as patches are pooled)."""
    stacked = np.array([[s.probabilities[c] for c in CLASSES] for s in scores], dtype=np.float64)
    return {c: float(p) for c, p in zip(CLASSES, stacked.mean(axis=0), strict=True)}


def _rounded(probabilities: Mapping[str, float]) -> dict[str, float]:
    return {c: round(float(probabilities[c]), 4) for c in CLASSES}


def model_identity(card: ModelCard, inputs_used: Sequence[str]) -> tuple[str, str]:
    """(name, validation population) of the head behind a result.

    A result that used no image comes from the covariates head, not from the image network the
    checkpoint is named after: it is named ``fusion.covariates_model`` (default: the card's name with
    its region replaced by "covariates", e.g. "osteogate-covariates").

    Parameters
    ----------
    card : ModelCard
        The checkpoint's card.
    inputs_used : Sequence[str]
        The inputs the result used.

    Returns
    -------
    tuple of str
        The head's name and the population its validation figures come from ("" when unknown).
    """
    fusion = card.fusion or {}
    population = str(fusion.get("population") or "")
    if "image" in inputs_used:
        return card.name, population
    base = card.name.rsplit("-", 1)[0] if "-" in card.name else card.name
    return str(fusion.get("covariates_model") or f"{base}-covariates"), population


def _from_distribution(card: ModelCard, result: FusionResult, entry: Mapping[str, Any], **fields: Any) -> Assessment:
    """An assessed result whose every number derives from the head's one T-score distribution."""
    distribution = result.distribution
    threshold = (entry.get("thresholds") or {}).get("low_bmd")
    name, population = model_identity(card, fields.get("inputs_used", ()))
    return Assessment(
        assessed=True, label=distribution.category, probabilities=distribution.probabilities,
        t_score=distribution.estimate, t_score_interval=distribution.interval, t_score_sd=round(distribution.sd, 4),
        decision=referral_decision(distribution.p_low, threshold),
        referral_threshold=None if threshold is None else float(threshold),
        validation=_validation(entry.get("validation")), model_name=name, population=population, **fields,
    )


def _from_probabilities(card: ModelCard, probabilities: Mapping[str, float], thresholds: Mapping[str, float],
                        **fields: Any) -> Assessment:
    """An assessed result of an image network without a T-score head (older cards)."""
    rounded = _rounded(probabilities)
    threshold = thresholds.get("low_bmd")
    p_low = sum(probabilities[c] for c in LOW_BMD_CLASSES)
    name, population = model_identity(card, ("image",))
    return Assessment(assessed=True, label=category_from_probabilities(probabilities), probabilities=rounded,
                      decision=referral_decision(p_low, threshold),
                      referral_threshold=None if threshold is None else float(threshold),
                      model_name=name, population=population, **fields)


def _image_assessment(card: ModelCard, heads: Mapping[str, FusionHead], score: ImageScore,
                      reason: str | None) -> Assessment:
    if reason is not None:
        # An untrained region head has no figures of its own: the knee's would mislead.
        figures = image_validation(card) if score.region in trained_regions(card) else None
        return Assessment(assessed=False, reason=reason, situation="image", validation=_validation(figures))
    head = heads.get("image")
    if head is not None:  # the fusion's recalibrated image-only head
        entry = card.fusion["situations"]["image"]
        result = head.predict(FusionInputs(Covariates(), score.probabilities))
        return _from_distribution(card, result, entry, inputs_used=("image",), situation="image")
    return _from_probabilities(card, score.probabilities, card.thresholds, inputs_used=("image",),
                               situation="image", validation=_validation(image_validation(card)))


def _legacy_study(card: ModelCard, scores: Sequence[ImageScore], covariates: Covariates,
                  image_reason: str | None, notes: list[str]) -> Assessment:
    """A card without fusion heads (image network only)."""
    missing = tuple(covariates.missing) + (() if scores else ("image",))
    if image_reason is None and scores:
        probabilities = _mean_probabilities(scores)
        if covariates.present:
            notes.append("header covariates not used: no covariate model in this checkpoint")
        return _from_probabilities(card, probabilities, card.thresholds, inputs_used=("image",),
                                   inputs_missing=missing, situation="image",
                                   validation=_validation(image_validation(card)), notes=tuple(notes))
    reasons = []
    if covariates.present:
        reasons.append("no covariate model in this checkpoint")
    else:
        reasons.append("no usable age, sex, weight or height in the header")
    reasons.append(image_reason if scores and image_reason else "no image of this region was scored")
    return Assessment(assessed=False, reason="; ".join(reasons), inputs_missing=missing,
                      situation=situation_key(covariates.present), notes=tuple(notes))


def assess_study(card: ModelCard, heads: Mapping[str, FusionHead], scores: Sequence[ImageScore],
                 covariates: Covariates, region: str) -> StudyAssessment:
    """A study's assessment: the card's head for the input situation the study offers, gated.

    Parameters
    ----------
    card : ModelCard
        The checkpoint's card.
    heads : Mapping[str, FusionHead]
        ``load_fusion_heads(card)``.
    scores : Sequence[ImageScore]
        The image network's scores of the study's images of this region.
    covariates : Covariates
        The header covariates.
    region : str
        The study's region.

    Returns
    -------
    StudyAssessment
        Per image and for the study: assessed (estimate, interval, probabilities, category and
        decision from one T-score distribution) or not assessed with the reason.
    """
    image_reason = image_path_reason(card, region)
    images = tuple(ImageAssessment(region=region, assessment=_image_assessment(card, heads, s, image_reason), score=s)
                   for s in scores)
    notes = list(covariates.notes)
    if not heads:
        study = _legacy_study(card, scores, covariates, image_reason, notes)
        return StudyAssessment(region=region, study=study, images=images, covariates=covariates)

    fusion = card.fusion
    covariates, fallback_note = with_age_fallback(covariates, fusion.get("covariate_ranges") or {})
    if fallback_note:
        notes.append(fallback_note)
    dropped = out_of_range(covariates, fusion.get("covariate_ranges") or {})
    for reason in dict.fromkeys(dropped.values()):
        notes.append(reason)
    usable = without(covariates, list(dropped))
    image_ok = bool(scores) and image_reason is None
    if scores and image_reason is not None:
        notes.append(f"image not used: {image_reason}")
    available = tuple(name for name in ("image", *COVARIATES) if (name == "image" and image_ok) or name in usable.present)
    key = situation_key(available)
    entry = fusion["situations"].get(key)
    missing = tuple(name for name in COVARIATES if name not in usable.present) + (() if scores else ("image",))
    reason = situation_reason(entry, available)
    if reason is None and entry is not None:
        reason = _extra_gate(entry)
    if reason is not None or entry is None:
        if scores and image_reason is not None and not usable.present:
            reason = image_reason
        study = Assessment(assessed=False, reason=reason or "no model for these inputs", inputs_missing=missing,
                           situation=key, validation=_validation(entry.get("validation") if entry else None),
                           notes=tuple(notes))
        return StudyAssessment(region=region, study=study, images=images, covariates=covariates)
    head = heads[key]
    if "image" in available and "image" not in head.inputs:
        notes.append(str(entry.get("note") or "image not used: it added nothing measurable in grouped validation"))
    image_probabilities = _mean_probabilities(scores) if "image" in head.inputs else None
    result = head.predict(FusionInputs(usable, image_probabilities))
    study = _from_distribution(card, result, entry, inputs_used=tuple(head.inputs), inputs_missing=missing,
                               situation=key, notes=tuple(notes))
    return StudyAssessment(region=region, study=study, images=images, covariates=covariates)


def _extra_gate(entry: Mapping[str, Any]) -> str | None:
    """An explicit ``assessed: false`` a training run may set on a situation (with its reason)."""
    if entry.get("assessed") is False:
        return str(entry.get("reason") or "marked not assessed by its training run")
    return None
