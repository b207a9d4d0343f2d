"""What the model reports for an image and a study: never more than its card has shown.

These are the types the gateway stores (SQL), writes (SR, result card) and shows (``show``); the
model package fills them (``Classifier.score_images`` then ``Classifier.assess``). An ``Assessment``
with ``assessed = False`` carries the reason and no label: the SR then says "not assessed" with
that reason, never "Detected".

Contract (shared by issue #8 model work and the gateway's SR / result card work):

* ``Classifier.score_images(images, regions, batch_size) -> list[ImageScore]``: the image network
  alone, one ``ImageScore`` per decoded image; may be called incrementally (one image or a small
  batch at a time) so that decoding the next image overlaps inference of this one.
* ``Classifier.assess(scores, covariates, region) -> StudyAssessment``: fusion of the image scores
  with the header covariates (``model.covariates.Covariates``), calibration, T-score estimate with
  its 80 % prediction interval, operating thresholds and the gate that turns an input situation
  without demonstrated discrimination into "not assessed". Pure numpy: cheap, no torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from osteogate.model.covariates import Covariates
from osteogate.model.estimand import DECISIONS

NOT_ASSESSED = "not assessed"


@dataclass(frozen=True)
class ImageScore:
    """What the image network says about one image, before fusion with covariates.

    Parameters
    ----------
    region : str
        The region head that scored the image (``taxonomy.REGIONS``).
    probabilities : Mapping[str, float]
        Image-alone calibrated class probabilities.
    features : tuple of float
        What the fusion head reads from this image.
    boxes : tuple of (x0, y0, x1, y1)
        Areas the network analysed, as fractions of the source image.
    n_inputs : int
        Network inputs pooled into this score.
    """

    region: str
    # Image-alone calibrated class probabilities (names from model.taxonomy.CLASSES).
    probabilities: Mapping[str, float]
    # What the fusion head reads from this image (e.g. the region row's pooled logits).
    features: tuple[float, ...] = ()
    # Areas the network analysed, as (x0, y0, x1, y1) fractions of the source image (result card).
    boxes: tuple[tuple[float, float, float, float], ...] = ()
    n_inputs: int = 1  # network inputs pooled into this score (patches per image)


@dataclass(frozen=True)
class Assessment:
    """One reported result (an image's or a study's).

    Raises
    ------
    ValueError
        When an assessed result lacks a label or carries a reason, a result that is not assessed
        carries a label, or the decision is not one of ``model.estimand.DECISIONS``.
    """

    assessed: bool
    reason: str | None = None  # why not assessed; None when assessed
    # The WHO category of the estimate (one of CLASSES) when assessed, else None. With a T-score
    # distribution it is ``TScoreDistribution.category``: never a class the numbers contradict.
    label: str | None = None
    probabilities: Mapping[str, float] | None = None  # the distribution's class probabilities, when assessed
    t_score: float | None = None  # estimated densitometry T-score (median of the distribution, 0.1 grid)
    t_score_interval: tuple[float, float] | None = None  # 80 % prediction interval, rounded once
    t_score_sd: float | None = None  # the distribution's calibrated spread
    # The screening decision (model.estimand.DECISIONS) and the threshold on P(low) behind it.
    decision: str | None = None
    referral_threshold: float | None = None
    inputs_used: tuple[str, ...] = ()  # names from model.taxonomy.INPUTS
    inputs_missing: tuple[str, ...] = ()
    situation: str = ""  # key of the card's per-input-situation validation figures
    # The validation figures that back this result (e.g. auc_low_bmd with its CI, the
    # sensitivity and specificity at the operating threshold): shown on the card and in the SR.
    validation: Mapping[str, Any] = field(default_factory=dict)
    # What a reader should know about the inputs: values converted or dropped (from Covariates.notes
    # and the validated ranges), inputs the chosen head leaves out and why.
    notes: tuple[str, ...] = ()
    # Who produced the result: the head's own name and the population its figures come from
    # (a covariates-only head is not the knee image network and says so).
    model_name: str = ""
    population: str = ""

    def __post_init__(self) -> None:
        if self.assessed and (self.label is None or self.reason is not None):
            raise ValueError("an assessed result has a label and no not-assessed reason")
        if not self.assessed and (self.label is not None or not self.reason):
            raise ValueError("a result that is not assessed has a reason and no label")
        if self.assessed and self.decision is not None and self.decision not in DECISIONS:
            raise ValueError(f"decision {self.decision!r} is not one of {DECISIONS}")

    @property
    def p_low(self) -> float | None:
        """P(T < -1.0), the low-bone-density probability the decision compares with its threshold."""
        if self.probabilities is None:
            return None
        # 1 - P(normal): exact near 0.5 (Sterbenz), so P(low) >= 0.5 keeps matching the category.
        return 1.0 - float(self.probabilities.get("normal", 0.0))

    @property
    def p_osteoporosis(self) -> float | None:
        """P(T <= -2.5), the osteoporosis-range probability."""
        return None if self.probabilities is None else float(self.probabilities.get("osteoporosis", 0.0))

    @property
    def image_used(self) -> bool:
        """Whether the radiograph contributed to this result."""
        return "image" in self.inputs_used


@dataclass(frozen=True)
class ImageAssessment:
    """Per-image result: the image's own score (when it was scored) and what is reported for it.

    Parameters
    ----------
    region : str
        The image's region.
    assessment : Assessment
        What is reported for the image.
    score : ImageScore or None
        The image network's score, when the image was scored.
    """

    region: str
    assessment: Assessment
    score: ImageScore | None = None


@dataclass(frozen=True)
class StudyAssessment:
    """A study's result: the study-level assessment, the per-image ones and the header covariates.

    Parameters
    ----------
    region : str
        The study's region.
    study : Assessment
        The study-level result (the one the banner, the SR summary and ``studies`` report).
    images : tuple of ImageAssessment
        One per scored image.
    covariates : Covariates
        The header covariates read from the study.
    """

    region: str
    study: Assessment
    images: tuple[ImageAssessment, ...]
    covariates: Covariates
