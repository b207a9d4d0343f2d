"""DXA exams as the sources report them, and how one is saved: once per patient and day.

Every source (HL7 ORU, CSV, later DICOM) turns what it received into ``DxaResult`` values and
hands them to ``save_results`` inside one transaction, so a message or a file is stored whole or
not at all.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date
from enum import StrEnum

from osteogate.gateway.store.db import utcnow
from osteogate.gateway.store.dxa import DxaExam, DxaSite, exam_key
from osteogate.model.taxonomy import class_from_t_score
from sqlalchemy import select
from sqlalchemy.orm import Session

# T-scores outside this range are a unit or transcription error (BMD in g/cm2, a Z-score typo ...),
# not a measurement: refused rather than stored as ground truth.
T_SCORE_RANGE = (-10.0, 10.0)


@dataclass(frozen=True)
class DxaSiteValue:
    site: str
    t_score: float
    site_code: str | None = None


@dataclass(frozen=True)
class DxaResult:
    """One DXA exam as a source reported it: patient, day and each measured site."""

    patient_id: str
    issuer_of_patient_id: str | None
    dxa_date: date
    source: str  # hl7 | csv | dicom
    source_ref: str
    sites: tuple[DxaSiteValue, ...] = field(default_factory=tuple)

    @property
    def key(self) -> str:
        return exam_key(self.patient_id, self.issuer_of_patient_id, self.dxa_date)

    @property
    def lowest_t_score(self) -> float:
        return min(s.t_score for s in self.sites)

    @property
    def who_category(self) -> str:
        """WHO category from the lowest T-score of the exam (model/taxonomy.py cut-offs)."""
        return class_from_t_score(self.lowest_t_score)


class SaveOutcome(StrEnum):
    NEW = "new"
    UNCHANGED = "unchanged"  # the same exam with the same T-scores was already stored
    UPDATED = "updated"  # the same exam (patient, day) with other T-scores: its sites replaced


def check_t_score(value: float) -> str | None:
    """Why ``value`` cannot be a DXA T-score, or None when it can."""
    if not math.isfinite(value):
        return "is not a finite number"
    low, high = T_SCORE_RANGE
    if not low <= value <= high:
        return f"{value:g} is outside {low:g}..{high:g} (a BMD or a typo, not a T-score)"
    return None


def merge_sites(results: Sequence[DxaResult]) -> list[DxaResult]:
    """Results of the same exam (patient and day: CSV rows, OBR groups) merged into one each."""
    merged: dict[str, DxaResult] = {}
    for result in results:
        earlier = merged.get(result.key)
        if earlier is None:
            merged[result.key] = result
        else:
            merged[result.key] = DxaResult(
                earlier.patient_id, earlier.issuer_of_patient_id, earlier.dxa_date, earlier.source,
                earlier.source_ref, earlier.sites + result.sites)
    return list(merged.values())


def _t_scores(sites: Sequence[DxaSiteValue] | Sequence[DxaSite]) -> list[float]:
    # The values are the ground truth; the names differ by source ("DXA Hip [T-score]" over HL7,
    # "Total hip" in a CSV export), so the same T-scores under other names are the same result.
    return sorted(round(float(s.t_score), 2) for s in sites)


def save_results(session: Session, results: Sequence[DxaResult]) -> list[SaveOutcome]:
    """Store ``results`` in ``session``, the caller's transaction (all of a message or file, or none).

    Parameters
    ----------
    session
        An open session; the caller commits (or rolls back on any error).
    results
        Results as a source reported them; those of the same exam (patient, day) are merged.

    Returns
    -------
    list of SaveOutcome
        One per exam: NEW, UNCHANGED (the same T-scores already stored) or UPDATED (other
        T-scores for the same patient and day: a corrected result replaces the sites).
    """
    outcomes = []
    for result in merge_sites(results):
        exam = session.execute(select(DxaExam).where(DxaExam.exam_key == result.key)).scalar_one_or_none()
        if exam is not None and _t_scores(exam.sites) == _t_scores(result.sites):
            outcomes.append(SaveOutcome.UNCHANGED)
            continue
        if exam is None:
            exam = DxaExam(exam_key=result.key, patient_id=result.patient_id,
                           issuer_of_patient_id=result.issuer_of_patient_id, dxa_date=result.dxa_date)
            session.add(exam)
            outcomes.append(SaveOutcome.NEW)
        else:
            # A corrected result (or a CSV with other values) replaces the sites it reports.
            exam.sites.clear()
            exam.updated_at = utcnow()
            outcomes.append(SaveOutcome.UPDATED)
        exam.source = result.source
        exam.source_ref = result.source_ref[:200]
        exam.lowest_t_score = result.lowest_t_score
        exam.who_category = result.who_category
        exam.sites.extend(DxaSite(site_code=s.site_code, site=s.site[:64], t_score=s.t_score)
                          for s in result.sites)
        session.flush()
    return outcomes
