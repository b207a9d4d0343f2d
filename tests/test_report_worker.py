"""The worker's report path in process, on a real SQLite store and real ONNX forward passes: the image
path alone when the header has no covariates, the card switch, and a card failure that must not
withhold the SR."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from osteogate.gateway.core.config import load_settings
from osteogate.gateway.operate.preflight import ClassifierCache
from osteogate.gateway.receive.ingest import Ingestor
from osteogate.gateway.receive.tracker import StudyTracker
from osteogate.gateway.report.publisher import ReportPublisher
from osteogate.gateway.report.sr import read_result
from osteogate.gateway.store.db import Database, ResultObject, Study, StudyResult, StudyStatus
from osteogate.gateway.store.spool import Spool
from osteogate.gateway.work.worker import ClassifierWorker
from sqlalchemy import select

from tests.helpers import make_dataset, write_dataset
from tests.report_data import GOOD_AUC, fused_checkpoint

NO_DEMOGRAPHICS = {"PatientAge": None, "PatientSex": "", "PatientWeight": None, "PatientSize": None,
                   "PatientBirthDate": ""}


@pytest.fixture(scope="module")
def image_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A card whose image-only situation shows discrimination (so the image path may speak)."""
    return fused_checkpoint(tmp_path_factory.mktemp("image") / "image.safetensors", image_auc=GOOD_AUC)


def run(tmp_path: Path, model: Path, report: dict | None = None, **overrides: object) -> tuple[Database, Spool]:
    db = Database(f"sqlite:///{tmp_path / 'gw.db'}")
    db.migrate()
    spool, reports = Spool(tmp_path / "spool"), Spool(tmp_path / "reports")
    data = write_dataset(make_dataset(**overrides), tmp_path / "in.dcm").read_bytes()
    Ingestor(db, spool).store(data, calling_ae="TEST")
    StudyTracker(db, 0).queue_stable_studies()
    settings = load_settings(environ={}, overrides={"storage": {"data_dir": str(tmp_path), "min_free_mb": 0},
                                                    "model": {"path": str(model)}, "report": report or {}})
    worker = ClassifierWorker(settings, db, spool, ReportPublisher(settings, reports), ClassifierCache(settings))
    assert worker.run_once()
    return db, reports


def objects(db: Database) -> list[ResultObject]:
    with db.session() as session:
        return list(session.execute(select(ResultObject).order_by(ResultObject.position)).scalars())


def test_no_covariates_still_classified_by_the_image(tmp_path: Path, image_model: Path) -> None:
    db, reports = run(tmp_path, image_model, **NO_DEMOGRAPHICS)
    with db.session() as session:
        result = session.execute(select(StudyResult)).scalar_one()
        assert result.assessed is True and result.label is not None
        assert result.inputs_used == ["image"] and result.inputs_missing == ["age", "sex", "weight", "height"]
    [sr, card] = objects(db)
    reading = read_result(pydicom.dcmread(reports.absolute(sr.path)))
    assert reading.groups[0].assessed and reading.groups[0].inputs == {}
    assert "Inputs used: image; missing: age, sex, weight, height" in reading.groups[0].comments
    assert "missing: age, sex, weight, height" in reading.summary
    assert card.kind == "card"
    db.dispose()


def test_result_card_can_be_switched_off(tmp_path: Path, image_model: Path) -> None:
    db, _ = run(tmp_path, image_model, report={"result_card": False})
    assert [o.kind for o in objects(db)] == ["sr"]
    db.dispose()


def test_card_failure_does_not_withhold_the_sr(tmp_path: Path, image_model: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("drawing failed")

    monkeypatch.setattr(ReportPublisher, "build_card", broken)
    db, _ = run(tmp_path, image_model)
    assert [o.kind for o in objects(db)] == ["sr"]
    with db.session() as session:
        assert session.execute(select(Study.status)).scalar_one() == StudyStatus.DONE
    db.dispose()


def test_a_study_beyond_max_images_is_read_up_to_the_cap_and_the_sr_says_so(tmp_path: Path,
                                                                           image_model: Path) -> None:
    """A study of thousands of instances costs what `model.max_images_per_study` images cost: the
    first ones received are scored and itemized, the rest are listed in one SR comment with the reason."""
    db = Database(f"sqlite:///{tmp_path / 'gw.db'}")
    db.migrate()
    spool, reports = Spool(tmp_path / "spool"), Spool(tmp_path / "reports")
    base = make_dataset(size=(64, 64))
    study_uid = str(base.StudyInstanceUID)
    ingestor = Ingestor(db, spool)
    for number in range(1, 8):
        ds = make_dataset(study_uid=study_uid, size=(64, 64), seed=number)
        ds.InstanceNumber = number
        ingestor.store(write_dataset(ds, tmp_path / f"{number}.dcm").read_bytes(), calling_ae="TEST")
    StudyTracker(db, 0).queue_stable_studies()
    settings = load_settings(environ={}, overrides={"storage": {"data_dir": str(tmp_path), "min_free_mb": 0},
                                                    "model": {"path": str(image_model), "max_images_per_study": 3}})
    worker = ClassifierWorker(settings, db, spool, ReportPublisher(settings, reports), ClassifierCache(settings))
    assert worker.run_once()
    sr = next(o for o in objects(db) if o.kind == "sr")
    reading = read_result(pydicom.dcmread(reports.absolute(sr.path)))
    image_groups = [g for g in reading.groups if g.identifier.startswith("image")]
    assert len(image_groups) == 3, [g.identifier for g in reading.groups]
    assert ("Image not classified: not read: the study has 7 images, more than model.max_images_per_study (3); "
            "the first 3 received were read (4 images)") in reading.notes
    with db.session() as session:
        assert session.execute(select(Study.status)).scalar_one() == StudyStatus.DONE
    db.dispose()
