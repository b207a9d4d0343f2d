"""The case-finding list behind ``osteogate cases``: one row a patient, from the latest screened
study of that patient, with the DXA on record where the ground-truth table exists.

The patient (PatientID + IssuerOfPatientID) is the one ingest recorded on the study; the
accession number (not kept in SQL), and the patient of studies received before ingest recorded
it, are read from the header of the SR the gateway made (kept under the reports directory for
good), else from a spooled image. Only what a
fracture-liaison nurse needs to find the patient and the study is shown: no name, no birth date.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pydicom
from osteogate.gateway.store.db import Database, Study, StudyResult
from sqlalchemy import inspect, select, text
from sqlalchemy.orm import selectinload

REFERRAL = "DXA referral suggested"
BELOW_THRESHOLD = "below the referral threshold"
NOT_ASSESSED = "not assessed"
# Classes at or below osteopenia: the referral side until the explicit decision is stored.
_LOW_CLASSES = ("osteopenia", "osteoporosis")
_HEADER_TAGS = ["PatientID", "IssuerOfPatientID", "AccessionNumber", "StudyDate"]


@dataclass
class CaseRow:
    """One patient of the list (the columns of --csv and --json)."""

    patient_id: str
    issuer_of_patient_id: str
    study_date: str
    accession_number: str
    region: str
    t_score: float | None
    t_score_low: float | None
    t_score_high: float | None
    decision: str
    dxa_on_record: str  # "yes" / "no" / "unknown" (no DXA table in this store yet)
    last_dxa_date: str
    study_key: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def decision_of(result: StudyResult) -> str:
    """The screening decision of a result: the stored one when the store has it, else derived
    from the label (osteopenia or osteoporosis range: referral suggested). Never "normal"."""
    stored = getattr(result, "decision", None)
    if stored:
        return str(stored)
    if not result.assessed:
        return NOT_ASSESSED
    return REFERRAL if (result.label or "").lower() in _LOW_CLASSES else BELOW_THRESHOLD


def _header(path: Path) -> dict[str, str] | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
    except Exception:  # noqa: BLE001 - a missing or unreadable file: try the next source
        return None
    return {tag: str(ds.get(tag, "") or "").strip() for tag in _HEADER_TAGS}


def _identity(study: Study, result: StudyResult, reports_dir: Path, spool_dir: Path) -> dict[str, str] | None:
    """PatientID, issuer, accession and study date of a study: the patient as ingest recorded it
    in SQL, the rest (and the patient, for studies received before that) from our SR, else a
    spooled image."""
    candidates = [reports_dir / o.path for o in result.objects] + ([reports_dir / result.sr_path] if result.sr_path else [])
    candidates += [spool_dir / i.path for i in study.instances if i.purged_at is None][:1]
    found = next((h for h in map(_header, candidates) if h and h["PatientID"]), None)
    if study.patient_id:  # recorded at ingest (gateway/receive): the header adds the accession number
        found = {**(found or {"AccessionNumber": "", "StudyDate": ""}), "PatientID": study.patient_id,
                 "IssuerOfPatientID": study.issuer_of_patient_id or ""}
    return found


def dxa_table_exists(db: Database) -> bool:
    with db.engine.connect() as connection:
        return inspect(connection).has_table("dxa_exams")


def _dxa_dates(db: Database) -> dict[tuple[str, str], list[str]]:
    """(patient, issuer) -> DXA dates (YYYYMMDD) from the ground-truth table ``dxa_exams``."""
    with db.engine.connect() as connection:
        rows = connection.execute(text("SELECT patient_id, issuer_of_patient_id, dxa_date FROM dxa_exams")).all()
    dates: dict[tuple[str, str], list[str]] = {}
    for patient, issuer, when in rows:
        day = str(when).replace("-", "")[:8]
        dates.setdefault((str(patient or ""), str(issuer or "")), []).append(day)
    return dates


def _dxa_for(dates: dict[tuple[str, str], list[str]], patient: str, issuer: str) -> list[str]:
    # An issuer on one side only still matches on PatientID (gateway/groundtruth matching rule).
    exact = dates.get((patient, issuer))
    if exact is not None:
        return exact
    return [d for (p, i), days in dates.items() if p == patient and (not i or not issuer) for d in days]


def _latest_results(db: Database, since: str | None) -> Iterable[tuple[Study, StudyResult]]:
    with db.session() as session:
        query = select(Study).options(selectinload(Study.results).selectinload(StudyResult.objects),
                                      selectinload(Study.instances))
        if since:
            query = query.where(Study.study_date >= since)
        for study in session.execute(query).scalars():
            with_result = [r for r in study.results if r.assessed is not None]
            if with_result:
                yield study, with_result[-1]  # results are ordered by version


def case_rows(db: Database, reports_dir: Path, spool_dir: Path, *, since: str | None = None,
              decision: str | None = None, without_dxa_since: str | None = None) -> tuple[list[CaseRow], int]:
    """The list, lowest estimated T-score first (not assessed last), and how many screened
    studies had no readable patient (their SR and images are gone)."""
    has_dxa = dxa_table_exists(db)
    dates = _dxa_dates(db) if has_dxa else {}
    latest: dict[tuple[str, str], tuple[str, float, CaseRow]] = {}
    unidentified = 0
    for study, result in _latest_results(db, since):
        who = _identity(study, result, reports_dir, spool_dir)
        if who is None:
            unidentified += 1
            continue
        key = (who["PatientID"], who["IssuerOfPatientID"])
        dxa = sorted(_dxa_for(dates, *key)) if has_dxa else []
        row = CaseRow(key[0], key[1], study.study_date or who["StudyDate"], who["AccessionNumber"],
                      result.region or "", result.t_score, result.t_score_low, result.t_score_high,
                      decision_of(result), ("yes" if dxa else "no") if has_dxa else "unknown",
                      dxa[-1] if dxa else "", study.study_key)
        order = (row.study_date, result.created_at.timestamp() if result.created_at else 0.0)
        if key not in latest or order > latest[key][:2]:
            latest[key] = (*order, row)  # type: ignore[assignment]
    rows = [entry[2] for entry in latest.values()]
    if decision == "referral":
        rows = [r for r in rows if r.decision == REFERRAL]
    if without_dxa_since:
        rows = [r for r in rows if not any(d >= without_dxa_since for d in _dxa_for(dates, r.patient_id,
                                                                                   r.issuer_of_patient_id))]
    rows.sort(key=lambda r: (r.t_score is None, r.t_score if r.t_score is not None else 0.0, r.patient_id))
    return rows, unidentified

