"""Matching DXA exams to screened studies: windows, issuers, latest result version, probabilities."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import pytest
from osteogate.gateway.groundtruth.exams import DxaResult, DxaSiteValue, SaveOutcome, save_results
from osteogate.gateway.groundtruth.matching import (
    load_pairs,
    low_bmd_probability,
    osteoporosis_probability,
)
from osteogate.gateway.store.db import Database, Job, JobStatus, Study, StudyResult, StudyStatus


@pytest.fixture
def db(tmp_path: Path) -> Database:
    database = Database(f"sqlite:///{tmp_path / 'g.db'}")
    database.migrate()
    return database


def add_study(db: Database, uid: str, patient: str | None, study_date: str | None, *, issuer: str | None = None,
              versions: tuple[dict, ...] = ({},)) -> None:
    with db.session() as session:
        study = Study(study_uid=uid, study_key=uid[-16:], status=StudyStatus.DONE, study_date=study_date,
                      patient_id=patient, issuer_of_patient_id=issuer, patient_sex="F", patient_age=70.0,
                      manufacturer="ACME")
        session.add(study)
        session.flush()
        for number, extra in enumerate(versions, start=1):
            job = Job(study_id=study.id, study_version=number, status=JobStatus.DONE)
            session.add(job)
            session.flush()
            values = {"region": "knee", "assessed": True, "label": "osteopenia",
                      "probabilities": {"normal": 0.2, "osteopenia": 0.5, "osteoporosis": 0.3},
                      "t_score": -1.8, "t_score_low": -2.9, "t_score_high": -0.7,
                      "model_name": "m", "model_version": f"v{number}", **extra}
            session.add(StudyResult(study_id=study.id, job_id=job.id, version=number, status=StudyStatus.DONE,
                                    model_sha256="0" * 64, backend="onnx", **values))


def add_dxa(db: Database, patient: str, day: date, *t_scores: float, issuer: str | None = None) -> SaveOutcome:
    sites = tuple(DxaSiteValue(f"site{i}", t) for i, t in enumerate(t_scores))
    with db.session(write=True) as session:
        return save_results(session, [DxaResult(patient, issuer, day, "csv", "test", sites)])[0]


def test_window_is_inclusive_both_sides_and_nearest_exam_wins(db: Database) -> None:
    add_study(db, "1.2.3.100", "P1", "20250601")
    add_dxa(db, "P1", date(2026, 6, 1), -2.0)  # 365 days after: inside
    add_dxa(db, "P1", date(2025, 3, 1), -3.0)  # 92 days before: nearer, wins
    add_study(db, "1.2.3.200", "P2", "20250601")
    add_dxa(db, "P2", date(2026, 6, 2), -2.0)  # 366 days after: outside
    pairs = load_pairs(db, match_days=365)
    assert [(p.study_key, p.dxa_date, p.days_apart, p.dxa_category) for p in pairs] == [
        ("1.2.3.100", date(2025, 3, 1), 92, "osteoporosis")]
    assert load_pairs(db, match_days=30) == []
    assert {p.study_key for p in load_pairs(db, match_days=366)} == {"1.2.3.100", "1.2.3.200"}


def test_issuer_must_agree_only_when_both_sides_have_one(db: Database) -> None:
    add_study(db, "1.2.3.1", "P1", "20250601", issuer="HOSP_A")
    add_study(db, "1.2.3.2", "P2", "20250601", issuer="HOSP_A")
    add_study(db, "1.2.3.3", "P3", "20250601")
    add_dxa(db, "P1", date(2025, 6, 10), -1.5, issuer="HOSP_B")  # another hospital's P1: no pair
    add_dxa(db, "P2", date(2025, 6, 10), -1.5)  # no issuer on the DXA side: PatientID decides
    add_dxa(db, "P3", date(2025, 6, 10), -1.5, issuer="HOSP_A")  # no issuer on the study side
    assert [p.study_key for p in load_pairs(db)] == ["1.2.3.2", "1.2.3.3"]


def test_latest_result_version_is_paired_and_fields_filled(db: Database) -> None:
    add_study(db, "1.2.3.9", "P9", "20250601", versions=(
        {}, {"label": "normal", "probabilities": {"normal": 0.7, "osteopenia": 0.2, "osteoporosis": 0.1}}))
    assert add_dxa(db, "P9", date(2025, 5, 1), -0.5, -2.6) == SaveOutcome.NEW
    [pair] = load_pairs(db)
    assert pair.model_version == "v2" and pair.referral is False
    assert pair.p_low == pytest.approx(0.3) and pair.p_osteoporosis == pytest.approx(0.1)
    assert pair.dxa_t_score == -2.6 and pair.dxa_category == "osteoporosis"
    assert pair.study_date == date(2025, 6, 1) and pair.days_apart == 31
    assert (pair.sex, pair.age, pair.manufacturer, pair.region) == ("F", 70.0, "ACME", "knee")
    assert "P9" not in pair.patient_hash and len(pair.patient_hash) == 12


def test_filters_and_studies_without_patient_or_result(db: Database) -> None:
    add_study(db, "1.2.3.5", "P5", "20250101")
    add_study(db, "1.2.3.6", "P5", "20250901")
    add_study(db, "1.2.3.7", None, "20250901")
    add_study(db, "1.2.3.8", "P5", "20250901", versions=())  # no result yet
    add_study(db, "1.2.3.4", "P5", "20250901", versions=({"assessed": False, "label": None, "reason": "x"},))
    add_dxa(db, "P5", date(2025, 6, 1), -1.2)
    assert [p.study_key for p in load_pairs(db)] == ["1.2.3.5", "1.2.3.4", "1.2.3.6"]
    assert [p.study_key for p in load_pairs(db, since=date(2025, 6, 1))] == ["1.2.3.4", "1.2.3.6"]
    assert load_pairs(db, region="spine") == []
    unassessed = next(p for p in load_pairs(db) if p.study_key == "1.2.3.4")
    assert not unassessed.assessed and unassessed.p_low is None and unassessed.referral is None


def test_probabilities_read_defensively() -> None:
    assert low_bmd_probability({"normal": 0.1, "osteopenia": 0.6, "osteoporosis": 0.3}) == pytest.approx(0.9)
    assert low_bmd_probability({"low_bmd": 0.42, "osteopenia": 0.6}) == 0.42
    assert low_bmd_probability({"normal": 1.0}) is None and low_bmd_probability(None) is None
    assert osteoporosis_probability({"p_osteoporosis": 0.2, "osteoporosis": 0.5}) == 0.2
    assert osteoporosis_probability({"osteoporosis": 0.5}) == 0.5


def test_who_category_from_lowest_t_score_and_resend_is_idempotent(db: Database) -> None:
    assert add_dxa(db, "P1", date(2025, 1, 1), -0.5, -1.0) == SaveOutcome.NEW
    assert add_dxa(db, "P1", date(2025, 1, 1), -0.5, -1.0) == SaveOutcome.UNCHANGED
    assert add_dxa(db, "P1", date(2025, 1, 1), -0.5, -1.1) == SaveOutcome.UPDATED
    assert add_dxa(db, "P2", date(2025, 1, 1), -1.0) == SaveOutcome.NEW
    from osteogate.gateway.store.dxa import DxaExam
    from sqlalchemy import select

    with db.session() as session:
        exams = {e.patient_id: e for e in session.execute(select(DxaExam)).scalars()}
        assert exams["P1"].who_category == "osteopenia" and len(exams["P1"].sites) == 2
        assert exams["P2"].who_category == "normal"  # -1.0 is not below -1.0


def test_ingest_records_who_and_what_was_imaged(tmp_path: Path, db: Database) -> None:
    from io import BytesIO

    from osteogate.gateway.receive.ingest import Ingestor
    from osteogate.gateway.store.spool import Spool
    from sqlalchemy import select

    from tests.helpers import make_dataset

    ingestor = Ingestor(db, Spool(tmp_path / "spool"))
    for overrides in ({"PatientID": "P77", "IssuerOfPatientID": "HOSP_A", "PatientSex": "F", "PatientAge": "071Y",
                       "Manufacturer": "ACME", "StudyDate": "20250601"},
                      {"PatientID": "", "PatientSex": "", "PatientAge": None, "PatientBirthDate": ""}):
        buffer = BytesIO()
        make_dataset(seed=3, **overrides).save_as(buffer, enforce_file_format=True)
        ingestor.store(buffer.getvalue())
    with db.session() as session:
        studies = list(session.execute(select(Study).order_by(Study.id)).scalars())
    assert [(s.patient_id, s.issuer_of_patient_id, s.patient_sex, s.patient_age, s.manufacturer)
            for s in studies][0] == ("P77", "HOSP_A", "F", 71.0, "ACME")
    assert (studies[1].patient_id, studies[1].patient_sex, studies[1].patient_age) == (None, None, None)


def test_stored_decision_is_the_referral_where_present(db: Database) -> None:
    # The estimand's decision compares P(T < -1.0) with the card's threshold; the category (label)
    # may still say osteopenia below that threshold. Results without a decision use their label.
    add_study(db, "1.2.3.21", "P21", "20250601", versions=(
        {"label": "osteopenia", "decision": "below the referral threshold", "referral_threshold": 0.84},))
    add_study(db, "1.2.3.22", "P22", "20250601", versions=(
        {"label": "normal", "decision": "DXA referral suggested", "referral_threshold": 0.4},))
    add_study(db, "1.2.3.23", "P23", "20250601")  # no decision stored: label osteopenia
    for patient in ("P21", "P22", "P23"):
        add_dxa(db, patient, date(2025, 6, 2), -1.5)
    assert {p.study_key: p.referral for p in load_pairs(db)} == {
        "1.2.3.21": False, "1.2.3.22": True, "1.2.3.23": True}
