"""What the work stage produces and hands on: the outcome of one study's processing (images,
their scores, thumbnails, skip reasons, the model's StudyAssessment) and the objects a publisher
made for it. The report stage implements ``Publisher``; ``operate`` hands one to the worker, so
work never imports report (a later stage).
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from osteogate.gateway.store.db import Instance
from osteogate.model.assessment import Assessment, ImageScore, StudyAssessment
from osteogate.model.covariates import Covariates
from osteogate.model.taxonomy import REGIONS
from pydicom.dataset import Dataset


@dataclass(frozen=True)
class MadeObject:
    """A DICOM object written for a result (before its SQL row exists)."""

    kind: str  # "sr" | "card"
    sop_class_uid: str
    sop_instance_uid: str
    series_uid: str
    path: str  # relative to the reports directory


@dataclass
class ImageOutcome:
    instance: Instance
    header: Dataset
    region: str | None = None
    skip_reason: str | None = None
    decode_ms: float | None = None
    score: ImageScore | None = None  # the image network's output, once scored
    thumbnail: np.ndarray | None = None  # small copy for the result card (decoded images are not kept)
    decoder_peak_kib: int | None = None  # peak memory of the decoder process, when one decoded it


@dataclass
class StudyOutcome:
    images: list[ImageOutcome] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    # What the model reports (None when nothing in the study was in scope); its images are the
    # scored ones, in the order of ``scored``.
    assessment: StudyAssessment | None = None
    # The site gate (gateway/groundtruth/gate.py): deliveries held (shadow mode, closed), and the
    # model's study result when "required" reports it as not assessed (kept for validation).
    held: bool = False
    withheld: Assessment | None = None

    @property
    def scored(self) -> list[ImageOutcome]:
        return [i for i in self.images if i.score is not None]


class Publisher(Protocol):
    """Makes and durably writes the objects of one result (the report stage's ReportPublisher)."""

    def publish(self, study_uid: str, outcome: StudyOutcome, classifier: Any, version: int,
                previous_sr: str | None) -> list[MadeObject]:
        """Build, write and return the result's objects in send order (SR first)."""
        ...


def safe_get(ds: Dataset, keyword: str) -> Any:
    """``ds.get`` that survives values pydicom cannot convert (a malformed IS, DS or date)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ds.get(keyword)
    except Exception:  # noqa: BLE001 - any conversion failure means "not usable"
        return None


def image_order_key(header: Dataset) -> tuple[int, int, str]:
    """Stable image numbering: InstanceNumber (missing or malformed last), then SOPInstanceUID."""
    try:
        number: int | None = int(str(safe_get(header, "InstanceNumber")).strip())
    except (TypeError, ValueError):
        number = None
    return (0 if number is not None else 1, number or 0, str(safe_get(header, "SOPInstanceUID") or ""))


def study_region(items: Sequence[ImageOutcome]) -> str | None:
    """The study's region: the most common among in-scope images (ties: taxonomy order)."""
    counts = Counter(i.region for i in items if i.region)
    if not counts:
        return None
    return max(counts, key=lambda r: (counts[r], -REGIONS.index(r) if r in REGIONS else -len(REGIONS)))


def study_covariates(items: Sequence[ImageOutcome]) -> Covariates:
    """Covariates from the header of the in-scope image that states the most of them.

    Patient attributes are the same in every image of a study as a rule; when one image lacks some
    (a secondary view written by another device), the fullest header is the better source."""
    from osteogate.model.covariates import covariates_from_dataset

    candidates = [covariates_from_dataset(i.header) for i in sorted(items, key=lambda i: image_order_key(i.header))]
    # max() keeps the first of equals: the stable image order decides ties.
    return max(candidates, key=lambda c: len(c.present)) if candidates else Covariates()
