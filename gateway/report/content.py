"""What one report version is made from (the SR, the result card and the worker share these types)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pydicom
from osteogate.gateway.report import wording as reporting
from osteogate.gateway.work.outcome import image_order_key
from osteogate.model.assessment import ImageAssessment, StudyAssessment


@dataclass(frozen=True)
class AlgorithmInfo:
    """The checkpoint behind a report (the SR and card quote the producing head's name, see
    ``StudyReport.producer``).

    Parameters
    ----------
    name : str
        The checkpoint's display name.
    version : str
        Its card version.
    checkpoint_sha256 : str
        The checkpoint's sha256 (written as an algorithm parameter).
    manufacturer : str
        The manufacturer written into the SR and the card.
    """

    name: str  # e.g. "OsteoGate EfficientNet-B0" or "UNTRAINED OsteoGate ..." (card.display_name)
    version: str  # card version
    checkpoint_sha256: str
    manufacturer: str = "OsteoGate"


@dataclass(frozen=True)
class ReportedImage:
    """A source image the model scored (or declined to assess), with its header."""

    source: pydicom.Dataset  # header of the source image (no pixel data needed)
    result: ImageAssessment


@dataclass(frozen=True)
class SkippedImage:
    """A source image that was not classified, with the reason."""

    source: pydicom.Dataset
    reason: str  # e.g. "region unknown", "out of scope: CHEST"


@dataclass(frozen=True)
class StudyReport:
    """Everything one report version is made from: the SR and the result card read the same.

    Parameters
    ----------
    assessment : StudyAssessment
        The model's result.
    sources : tuple of pydicom.Dataset
        Source headers aligned with ``assessment.images``.
    algorithm : AlgorithmInfo
        The checkpoint.
    skipped : tuple of SkippedImage
        Images not classified.
    thumbnails : tuple
        Small uint8 copies of the source images (result card), aligned with ``sources``.

    Raises
    ------
    ValueError
        When sources, image results and thumbnails are not aligned.
    """

    assessment: StudyAssessment
    sources: tuple[pydicom.Dataset, ...]  # headers aligned with assessment.images
    algorithm: AlgorithmInfo
    skipped: tuple[SkippedImage, ...] = ()
    # Small uint8 copies of the source images for the result card, aligned with ``sources``.
    thumbnails: tuple[Any, ...] = field(default=())

    def __post_init__(self) -> None:
        if len(self.sources) != len(self.assessment.images):
            raise ValueError(f"{len(self.sources)} source headers for {len(self.assessment.images)} image results")
        if self.thumbnails and len(self.thumbnails) != len(self.sources):
            raise ValueError("thumbnails must be aligned with sources")

    @property
    def images(self) -> list[tuple[int, ReportedImage, Any]]:
        """(number, image, thumbnail) in stable order: InstanceNumber, then SOPInstanceUID."""
        thumbs = self.thumbnails or (None,) * len(self.sources)
        items = sorted(
            zip(self.sources, self.assessment.images, thumbs, strict=True),
            key=lambda t: image_order_key(t[0]),
        )
        return [(n, ReportedImage(s, r), t) for n, (s, r, t) in enumerate(items, start=1)]

    @property
    def producer(self) -> str:
        """The name of the head that produced the study result (a covariates-only head is not the
        image network the checkpoint is named after)."""
        return reporting.algorithm_name(self.assessment.study, self.algorithm.name)

    @property
    def image_used(self) -> bool:
        """Whether the study result read the radiograph (else the card draws no analysed regions)."""
        return self.assessment.study.assessed and self.assessment.study.image_used
