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

NOT_ASSESSED = "not assessed"


@dataclass(frozen=True)
class ImageScore:
    """What the image network says about one image, before fusion with covariates."""

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
    """One reported result (an image's or a study's)."""

    assessed: bool
    reason: str | None = None  # why not assessed; None when assessed
    label: str | None = None  # one of CLASSES when assessed, else None
    probabilities: Mapping[str, float] | None = None  # calibrated, when assessed
    t_score: float | None = None  # estimated densitometry T-score
    t_score_interval: tuple[float, float] | None = None  # 80 % prediction interval from validation residuals
    inputs_used: tuple[str, ...] = ()  # names from model.taxonomy.INPUTS
    inputs_missing: tuple[str, ...] = ()
    situation: str = ""  # key of the card's per-input-situation validation figures
    # The validation figures that back this result (e.g. auc_low_bmd with its CI, the
    # sensitivity and specificity at the operating threshold): shown on the card and in the SR.
    validation: Mapping[str, Any] = field(default_factory=dict)
    # What a reader should know about the inputs: values converted or dropped (from Covariates.notes
    # and the validated ranges), inputs the chosen head leaves out and why.
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.assessed and (self.label is None or self.reason is not None):
            raise ValueError("an assessed result has a label and no not-assessed reason")
        if not self.assessed and (self.label is not None or not self.reason):
            raise ValueError("a result that is not assessed has a reason and no label")


@dataclass(frozen=True)
class ImageAssessment:
    """Per-image result: the image's own score (when it was scored) and what is reported for it."""

    region: str
    assessment: Assessment
    score: ImageScore | None = None


@dataclass(frozen=True)
class StudyAssessment:
    region: str
    study: Assessment
    images: tuple[ImageAssessment, ...]
    covariates: Covariates
