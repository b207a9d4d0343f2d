"""DXA exams paired with the screened studies of the same patient.

The rule (issue 17): a study pairs with a DXA exam of the same patient, PatientID plus
IssuerOfPatientID where both sides have an issuer, PatientID alone where either lacks one, done
within ``match_days`` either side of the study. A study near several DXA exams pairs with the
nearest one (the earlier on a tie), so no study counts twice in a validation; one DXA exam may
pair with several studies (both knees on different days). The latest result version of a study
is the one paired (a replay with a new model replaces the earlier result).

Patient identifiers are read from SQL and leave this module only as salted hashes.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import date, datetime

from osteogate.gateway.core.logs import hashed
from osteogate.gateway.store.db import Database, Study, StudyResult, as_utc
from osteogate.gateway.store.dxa import DxaExam
from osteogate.model.taxonomy import LOW_BMD_CLASSES
from sqlalchemy import func, select


@dataclass(frozen=True)
class MatchedPair:
    """One screened study and the DXA exam that tells whether its result was right."""

    patient_hash: str
    study_key: str
    study_date: date | None  # StudyDate; None when the header had none (then received date matched)
    dxa_date: date
    days_apart: int  # |study day - DXA day|
    region: str | None
    manufacturer: str | None
    sex: str | None
    age: float | None
    assessed: bool  # the result has figures to validate (assessed, or withheld by the site gate)
    p_low: float | None  # P(T-score <= -1.0): low bone density
    p_osteoporosis: float | None  # P(T-score <= -2.5)
    t_score_estimate: float | None
    t_score_low: float | None  # 80 % prediction interval
    t_score_high: float | None
    referral: bool | None  # the result suggested DXA referral (low BMD flagged); None if not assessed
    dxa_t_score: float  # lowest T-score of the DXA exam
    dxa_category: str  # its WHO category (model.taxonomy.CLASSES)
    model_name: str | None
    model_version: str | None


def patient_hash(patient_id: str, issuer: str | None) -> str:
    """Salted hash of a patient (issuer included when known): the id logs and reports carry."""
    return hashed(f"{patient_id}^{issuer or ''}")


def parse_da(text: str | None) -> date | None:
    """A DICOM DA (YYYYMMDD) as a date; None when absent or not a date."""
    if not text or len(text.strip()) < 8:
        return None
    try:
        return datetime.strptime(text.strip()[:8], "%Y%m%d").date()
    except ValueError:
        return None


# Names the probabilities may carry for the two thresholds, besides the class names. The
# estimand is being extended to report P(T <= -1) and P(T <= -2.5) directly; older results
# have class probabilities only.
_LOW_KEYS = ("low_bmd", "p_low_bmd", "p_low", "t_le_-1", "t<=-1", "t_score_le_-1.0", "t_score_le_-1")
_OSTEOPOROSIS_KEYS = ("p_osteoporosis", "t_le_-2.5", "t<=-2.5", "t_score_le_-2.5", "osteoporosis")


def _first(probabilities: Mapping[str, float], keys: Iterable[str]) -> float | None:
    for key in keys:
        value = probabilities.get(key)
        if isinstance(value, int | float):
            return float(value)
    return None


def low_bmd_probability(probabilities: Mapping[str, float] | None) -> float | None:
    """P(T <= -1.0) from a stored result: an explicit key, else osteopenia + osteoporosis."""
    if not probabilities:
        return None
    explicit = _first(probabilities, _LOW_KEYS)
    if explicit is not None:
        return explicit
    parts = [probabilities.get(name) for name in LOW_BMD_CLASSES]
    if any(not isinstance(p, int | float) for p in parts):
        return None
    return float(sum(parts))  # type: ignore[arg-type]


def osteoporosis_probability(probabilities: Mapping[str, float] | None) -> float | None:
    """P(T <= -2.5) from a stored result (the osteoporosis class where no explicit key)."""
    return _first(probabilities, _OSTEOPOROSIS_KEYS) if probabilities else None


# model.estimand.REFERRAL: the decision text a result carries when it suggests DXA referral.
REFERRAL_DECISION = "DXA referral suggested"


def referral(result: StudyResult) -> bool | None:
    """Whether the result suggested DXA referral; None when not assessed.

    The stored decision where the result has one (the estimand's P(T < -1.0) against the card's
    referral threshold); earlier results carried the decision in their label (low-BMD classes
    only when P(low) reached the operating threshold).
    """
    if not result.assessed:
        return None
    if result.decision:
        return result.decision == REFERRAL_DECISION
    return result.label in LOW_BMD_CLASSES


def same_patient(study_issuer: str | None, exam_issuer: str | None) -> bool:
    """Issuers agree, or one side lacks one (then PatientID alone decides; caller matched it)."""
    return not study_issuer or not exam_issuer or study_issuer == exam_issuer


def nearest_exam(day: date, exams: Iterable[DxaExam], issuer: str | None, match_days: int) -> DxaExam | None:
    """The DXA exam of the same patient nearest ``day`` within ``match_days`` (earlier on a tie)."""
    candidates = [e for e in exams if same_patient(issuer, e.issuer_of_patient_id)
                  and abs((e.dxa_date - day).days) <= match_days]
    if not candidates:
        return None
    return min(candidates, key=lambda e: (abs((e.dxa_date - day).days), e.dxa_date))


def _figures(result: StudyResult) -> tuple[bool, dict[str, object]]:
    """Whether the result has figures to validate, and them: the reported ones, or those the site
    gate withheld ("required" mode reports "not assessed" but keeps the model's figures)."""
    if result.assessed:
        return True, {"probabilities": result.probabilities, "t_score": result.t_score,
                      "t_score_low": result.t_score_low, "t_score_high": result.t_score_high}
    withheld = getattr(result, "withheld", None)
    if withheld and withheld.get("probabilities"):
        return True, withheld
    return False, {}


def _pair(study: Study, result: StudyResult, exam: DxaExam, day: date, study_day: date | None) -> MatchedPair:
    assessed, figures = _figures(result)
    probabilities = figures.get("probabilities") or None
    decision = figures.get("decision") if not result.assessed else None
    return MatchedPair(
        patient_hash=patient_hash(study.patient_id or "", study.issuer_of_patient_id or exam.issuer_of_patient_id),
        study_key=study.study_key, study_date=study_day, dxa_date=exam.dxa_date,
        days_apart=abs((exam.dxa_date - day).days), region=result.region, manufacturer=study.manufacturer,
        sex=study.patient_sex, age=study.patient_age, assessed=assessed,
        p_low=low_bmd_probability(probabilities) if assessed else None,  # type: ignore[arg-type]
        p_osteoporosis=osteoporosis_probability(probabilities) if assessed else None,  # type: ignore[arg-type]
        t_score_estimate=figures.get("t_score"), t_score_low=figures.get("t_score_low"),  # type: ignore[arg-type]
        t_score_high=figures.get("t_score_high"),  # type: ignore[arg-type]
        referral=(decision == REFERRAL_DECISION) if decision else referral(result),
        dxa_t_score=exam.lowest_t_score, dxa_category=exam.who_category,
        model_name=result.model_name, model_version=result.model_version,
    )


def load_pairs(db: Database, *, match_days: int = 365, since: date | None = None,
               region: str | None = None) -> list[MatchedPair]:
    """Every screened study paired with its DXA exam, newest result version of each study.

    Parameters
    ----------
    db
        The gateway's database.
    match_days
        Largest gap between study day and DXA day, either side (``groundtruth.match_days``).
    since
        Only studies on or after this day (study date, else the day it was received).
    region
        Only results of this region ("knee", "spine").

    Returns
    -------
    list of MatchedPair
        Ordered by study day, then study key. Studies without a patient id, without a result or
        with no DXA exam in the window are not in it.
    """
    latest = (select(StudyResult.study_id, func.max(StudyResult.version).label("version"))
              .group_by(StudyResult.study_id).subquery())
    query = (select(Study, StudyResult)
             .join(latest, latest.c.study_id == Study.id)
             .join(StudyResult, (StudyResult.study_id == Study.id) & (StudyResult.version == latest.c.version))
             .where(Study.patient_id.is_not(None), Study.patient_id != ""))
    if region is not None:
        query = query.where(StudyResult.region == region)
    pairs: list[MatchedPair] = []
    with db.session() as session:
        rows = session.execute(query).all()
        patients = {study.patient_id for study, _ in rows}
        exams: dict[str, list[DxaExam]] = defaultdict(list)
        if patients:
            for exam in session.execute(select(DxaExam).where(DxaExam.patient_id.in_(patients))).scalars():
                exams[exam.patient_id].append(exam)
        for study, result in rows:
            study_day = parse_da(study.study_date)
            day = study_day or as_utc(study.first_received_at).date()
            if since is not None and day < since:
                continue
            exam = nearest_exam(day, exams.get(study.patient_id or "", ()), study.issuer_of_patient_id, match_days)
            if exam is not None:
                pairs.append(_pair(study, result, exam, day, study_day))
    pairs.sort(key=lambda p: (p.study_date or p.dxa_date, p.study_key))
    return pairs
