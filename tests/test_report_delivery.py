"""Delivery of a result's objects (SR, then result card) over one association, all or retry, to real
pynetdicom peers on loopback."""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest
from osteogate.gateway.core.config import load_settings
from osteogate.gateway.deliver.delivery import DeliveryManager, result_files
from osteogate.gateway.report.card import build_result_card
from osteogate.gateway.report.sr import build_result_sr
from osteogate.gateway.store.db import (
    Database,
    Delivery,
    DeliveryStatus,
    Job,
    ResultObject,
    Study,
    StudyResult,
    utcnow,
)
from osteogate.gateway.store.spool import Spool
from pynetdicom import AE, evt
from pynetdicom.sop_class import Comprehensive3DSRStorage, SecondaryCaptureImageStorage

from tests.helpers import free_port
from tests.report_data import knee_report, uid


class Peer:
    """A pynetdicom Storage SCP; ``fail_card`` answers the first N card C-STOREs with 0xA700."""

    def __init__(self, sop_classes: tuple[str, ...], fail_card: int = 0) -> None:
        self.received: list[pydicom.Dataset] = []
        self.fail_card = fail_card
        self.port = free_port()
        self._lock = threading.Lock()
        ae = AE(ae_title="PEER")
        for sop_class in sop_classes:
            ae.add_supported_context(sop_class)
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._store)])

    def _store(self, event: evt.Event) -> int:
        with self._lock:
            if event.dataset.SOPClassUID == SecondaryCaptureImageStorage and self.fail_card > 0:
                self.fail_card -= 1
                return 0xA700
            self.received.append(event.dataset)
        return 0

    @property
    def kinds(self) -> list[str]:
        return [str(ds.Modality) for ds in self.received]

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture
def result(tmp_path: Path) -> tuple[Database, Spool, int]:
    """A store holding one result with its SR and card written, and nothing delivered yet."""
    db = Database(f"sqlite:///{tmp_path / 'gw.db'}")
    db.migrate()
    reports = Spool(tmp_path / "reports")
    report = knee_report()
    study_uid = str(report.sources[0].StudyInstanceUID)
    made = []
    for position, (kind, ds) in enumerate([
        ("sr", build_result_sr(report, series_instance_uid=uid("s1"), sop_instance_uid=uid("sr"), instance_number=1)),
        ("card", build_result_card(report, series_instance_uid=uid("s2"), sop_instance_uid=uid("card"),
                                   instance_number=1)),
    ]):
        relative = reports.report_path(study_uid, str(ds.SOPInstanceUID)).as_posix()
        path = reports.absolute(relative)
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        made.append(ResultObject(position=position, kind=kind, sop_class_uid=ds.SOPClassUID,
                                 sop_instance_uid=ds.SOPInstanceUID, series_uid=ds.SeriesInstanceUID, path=relative))
    with db.session() as session:
        study = Study(study_uid=study_uid, study_key="k")
        session.add(study)
        session.flush()
        job = Job(study_id=study.id, study_version=1)
        session.add(job)
        session.flush()
        row = StudyResult(study_id=study.id, job_id=job.id, version=1, status="done", model_name="m",
                          model_version="1", model_sha256="x", backend="onnx", timings={},
                          sr_sop_instance_uid=uid("sr"), sr_series_uid=uid("s1"), sr_path=made[0].path, objects=made)
        session.add(row)
        session.flush()
        result_id = row.id
    return db, reports, result_id


def _deliver(db: Database, reports: Spool, result_id: int, peer: Peer) -> Delivery:
    settings = load_settings(environ={}, overrides={"delivery": {"timeout_seconds": 5, "retry_base_seconds": 60}})
    manager = DeliveryManager(settings, db, reports)
    with db.session() as session:
        session.add(Delivery(result_id=result_id, destination=f"PEER@127.0.0.1:{peer.port}"))
    manager.run_due()
    with db.session() as session:
        return session.execute(Delivery.__table__.select()).one()  # type: ignore[return-value]


def test_objects_in_order(result: tuple[Database, Spool, int]) -> None:
    db, _, result_id = result
    with db.session() as session:
        row = session.get(StudyResult, result_id)
        assert row is not None
        assert [Path(p).name for p in result_files(row)] == [f"{uid('sr')}.dcm", f"{uid('card')}.dcm"]


def test_sr_and_card_over_one_association(result: tuple[Database, Spool, int]) -> None:
    peer = Peer((Comprehensive3DSRStorage, SecondaryCaptureImageStorage))
    try:
        delivery = _deliver(*result, peer)
    finally:
        peer.stop()
    assert delivery.status == DeliveryStatus.SENT
    assert peer.kinds == ["SR", "OT"]


def test_failed_card_means_the_whole_set_again(result: tuple[Database, Spool, int]) -> None:
    db, reports, result_id = result
    peer = Peer((Comprehensive3DSRStorage, SecondaryCaptureImageStorage), fail_card=1)
    try:
        first = _deliver(db, reports, result_id, peer)
        assert first.status == DeliveryStatus.PENDING and "0xA700" in first.last_error
        with db.session() as session:
            session.execute(Delivery.__table__.update().values(next_attempt_at=utcnow() - timedelta(seconds=1)))
        settings = load_settings(environ={}, overrides={"delivery": {"timeout_seconds": 5}})
        DeliveryManager(settings, db, reports).run_due()
    finally:
        peer.stop()
    with db.session() as session:
        delivery = session.execute(Delivery.__table__.select()).one()
    assert delivery.status == DeliveryStatus.SENT and delivery.attempts == 2
    # The retry sent both objects again: the peer holds the SR (twice, same UID) and the card.
    assert peer.kinds == ["SR", "SR", "OT"]


def test_sr_only_peer_gets_the_sr(result: tuple[Database, Spool, int]) -> None:
    peer = Peer((Comprehensive3DSRStorage,))
    try:
        delivery = _deliver(*result, peer)
    finally:
        peer.stop()
    assert delivery.status == DeliveryStatus.SENT and peer.kinds == ["SR"]


def test_peer_refusing_the_sr_gets_nothing(result: tuple[Database, Spool, int]) -> None:
    peer = Peer((SecondaryCaptureImageStorage,))
    try:
        delivery = _deliver(*result, peer)
    finally:
        peer.stop()
    assert delivery.status == DeliveryStatus.REJECTED and peer.kinds == []
    assert "Comprehensive 3D SR" in delivery.last_error and "nothing sent" in delivery.last_error


def test_orthanc_shows_the_card_and_dates_the_sr(result: tuple[Database, Spool, int], orthanc_pacs) -> None:
    """What a user of Orthanc Explorer sees: the card's preview is the card (Orthanc renders the
    SC itself), and the SR series has a date (it was filed under "?" without SeriesDate)."""
    import io

    from PIL import Image

    db, reports, result_id = result
    settings = load_settings(environ={}, overrides={"delivery": {"timeout_seconds": 10}})
    with db.session() as session:
        session.add(Delivery(result_id=result_id, destination=f"ORTHANC@127.0.0.1:{orthanc_pacs.port}"))
    assert DeliveryManager(settings, db, reports).run_due() == 1
    found = orthanc_pacs.wait_for_instances(2)
    by_modality = {orthanc_pacs.instance_tags(i["ID"])["Modality"]: i for i in found}
    assert set(by_modality) == {"SR", "OT"}
    preview = Image.open(io.BytesIO(orthanc_pacs.get_bytes(f"/instances/{by_modality['OT']['ID']}/preview")))
    assert preview.size == (1600, 1200)
    card_file = pydicom.dcmread(io.BytesIO(orthanc_pacs.instance_file(by_modality["OT"]["ID"])))
    assert preview.convert("RGB").getpixel((8, 8)) == tuple(card_file.pixel_array[8, 8])
    series = orthanc_pacs.get(f"/series/{by_modality['SR']['ParentSeries']}")
    assert series["MainDicomTags"].get("SeriesDate"), series["MainDicomTags"]
