"""Gateway building blocks on their own: config, UIDs, region, spool, ingest, logs."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pydicom
import pytest
from osteogate.gateway.core.config import ConfigError, Destination, load_settings
from osteogate.gateway.core.logs import configure_logging, get_logger, study_key
from osteogate.gateway.core.uids import InvalidUIDError, is_valid_uid, require_uid
from osteogate.gateway.receive.ingest import Ingestor
from osteogate.gateway.receive.tracker import StudyTracker
from osteogate.gateway.receive.validation import (
    CANNOT_UNDERSTAND,
    DATASET_DOES_NOT_MATCH_SOP_CLASS,
    OUT_OF_RESOURCES,
    RejectedInstance,
)
from osteogate.gateway.store.db import Database, Instance, Study, StudyStatus
from osteogate.gateway.store.spool import Spool, SpoolError
from osteogate.gateway.work.region import detect_region
from pydicom.uid import generate_uid

from tests.helpers import make_dataset


def encode(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


# -- config ----------------------------------------------------------------------------------------


def test_config_file_env_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "gw.toml"
    path.write_text('[dicom]\nae_title = "FROMFILE"\nport = 2000\n[study]\nstable_seconds = 5\n'
                    '[delivery]\ndestinations = ["PACS@10.1.2.3:104"]\n')
    settings = load_settings(path, environ={"OSTEOGATE_DICOM_PORT": "3000"}, overrides={"study": {"stable_seconds": 2}})
    assert settings.dicom.ae_title == "FROMFILE"
    assert settings.dicom.port == 3000  # env beats file
    assert settings.study.stable_seconds == 2  # flags beat env and file
    assert settings.delivery.destinations == [Destination(ae_title="PACS", host="10.1.2.3", port=104)]


def test_config_reports_every_bad_key_by_name(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[dicom]\nport = 70000\nae_title = "THIS AE TITLE IS TOO LONG"\n[model]\nbackend = "tpu"\n'
                    '[nonsense]\nx = 1\n')
    with pytest.raises(ConfigError) as info:
        load_settings(path, environ={"OSTEOGATE_WORKER_LEASE_SECONDZ": "3"})
    text = str(info.value)
    for key in ("dicom.port", "dicom.ae_title", "model.backend", "nonsense", "OSTEOGATE_WORKER_LEASE_SECONDZ"):
        assert key in text


def test_config_missing_file_is_clear(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml", environ={})


def test_example_config_is_valid() -> None:
    example = Path(__file__).resolve().parent.parent / "deploy" / "osteogate.example.toml"
    if not example.exists():
        pytest.skip("deploy/osteogate.example.toml not written yet")
    load_settings(example, environ={})


# -- UIDs and spool paths ------------------------------------------------------------------------------


@pytest.mark.parametrize("uid", ["1.2.840.10008.1.2", "2.25.1234567890", "1.0.3"])
def test_valid_uids(uid: str) -> None:
    assert is_valid_uid(uid)


@pytest.mark.parametrize("uid", ["", "1", "1.2.03", "../etc/passwd", "1.2.3/../4", "1.2 .3", "1..2", "1." + "1" * 70,
                                 "1.2.a"])
def test_invalid_uids(uid: str) -> None:
    assert not is_valid_uid(uid)
    with pytest.raises(InvalidUIDError):
        require_uid(uid, "SOPInstanceUID")


def test_uid_padding_is_stripped() -> None:
    # UI values are padded to even length with NUL; some devices pad with a space.
    assert require_uid("1.2.3\x00", "X") == "1.2.3"
    assert require_uid("1.2.3 ", "X") == "1.2.3"


def test_spool_write_is_atomic_and_contained(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    rel = spool.instance_path("1.2.3", "1.2.3.4", "1.2.3.4.5")
    digest = spool.write_atomic(rel, b"hello")
    assert (tmp_path / "spool" / "1.2.3" / "1.2.3.4" / "1.2.3.4.5.dcm").read_bytes() == b"hello"
    assert len(digest) == 64
    assert not [p for p in (tmp_path / "spool").rglob("*.tmp")]
    with pytest.raises(InvalidUIDError):
        spool.instance_path("1.2.3", "../..", "1.2")
    with pytest.raises(SpoolError):
        spool.absolute("../outside.dcm")


def test_spool_write_failure_leaves_no_temp_file(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    rel = spool.instance_path("1.2.3", "1.2.3.4", "1.2.3.4.5")
    (tmp_path / "spool" / "1.2.3").mkdir(parents=True)
    (tmp_path / "spool" / "1.2.3" / "1.2.3.4").write_text("a file where a directory should be")
    with pytest.raises(SpoolError):
        spool.write_atomic(rel, b"data")


# -- region --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("attrs", "expected"), [
    ({"BodyPartExamined": "KNEE"}, "knee"),
    ({"BodyPartExamined": "LSPINE"}, "spine"),
    ({"BodyPartExamined": "CHEST", "StudyDescription": "knee"}, None),  # explicit body part wins
    ({"StudyDescription": "XR LUMBAR SPINE 2 VIEWS"}, "spine"),
    ({"SeriesDescription": "Knie links a.p."}, "knee"),
    ({"StudyDescription": "XR HAND"}, None),
    ({}, None),
])
def test_region_from_header(attrs: dict[str, str], expected: str | None) -> None:
    ds = pydicom.Dataset()
    for key, value in attrs.items():
        setattr(ds, key, value)
    assert detect_region(ds).region == expected


# -- ingest --------------------------------------------------------------------------------------------


@pytest.fixture
def ingestor(tmp_path: Path) -> Ingestor:
    db = Database(f"sqlite:///{tmp_path / 'test.db'}")
    db.create_schema()
    return Ingestor(db, Spool(tmp_path / "spool"))


def test_ingest_records_and_is_idempotent(ingestor: Ingestor) -> None:
    ds = make_dataset()
    data = encode(ds)
    first = ingestor.store(data, calling_ae="MOD")
    again = ingestor.store(data, calling_ae="MOD")
    assert not first.duplicate and again.duplicate
    with ingestor.db.session() as session:
        assert session.query(Instance).count() == 1
        study = session.query(Study).one()
        assert study.instance_count == 1 and study.version == 1 and study.status == StudyStatus.RECEIVING
        path = ingestor.spool.absolute(session.query(Instance).one().path)
    assert path.read_bytes() == data


def test_ingest_after_processing_bumps_version(ingestor: Ingestor) -> None:
    study_uid = generate_uid()
    ingestor.store(encode(make_dataset(study_uid=study_uid)))
    tracker = StudyTracker(ingestor.db, stable_seconds=0)
    assert tracker.queue_stable_studies() == 1
    ingestor.store(encode(make_dataset(study_uid=study_uid)))
    with ingestor.db.session() as session:
        study = session.query(Study).one()
        assert study.version == 2 and study.status == StudyStatus.RECEIVING and study.instance_count == 2


def test_tracker_waits_for_quiet(ingestor: Ingestor) -> None:
    ingestor.store(encode(make_dataset()))
    assert StudyTracker(ingestor.db, stable_seconds=3600).queue_stable_studies() == 0
    assert StudyTracker(ingestor.db, stable_seconds=0).queue_stable_studies() == 1
    assert StudyTracker(ingestor.db, stable_seconds=0).queue_stable_studies() == 0


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI:UserWarning")  # the test writes hostile UIDs
def test_ingest_refusals(ingestor: Ingestor) -> None:
    good = encode(make_dataset())
    with pytest.raises(RejectedInstance) as info:
        ingestor.store(good[:-500])
    assert info.value.status in (CANNOT_UNDERSTAND, DATASET_DOES_NOT_MATCH_SOP_CLASS)

    no_pixels = make_dataset()
    del no_pixels.PixelData
    with pytest.raises(RejectedInstance) as info:
        ingestor.store(encode(no_pixels))
    assert info.value.status == DATASET_DOES_NOT_MATCH_SOP_CLASS

    bad_uid = make_dataset()
    bad_uid.StudyInstanceUID = "1.2.3/../../x"
    with pytest.raises(RejectedInstance) as info:
        ingestor.store(encode(bad_uid))
    assert info.value.status == DATASET_DOES_NOT_MATCH_SOP_CLASS

    with pytest.raises(RejectedInstance) as info:
        ingestor.store(b"not dicom at all" * 10)
    assert info.value.status == CANNOT_UNDERSTAND
    with ingestor.db.session() as session:
        assert session.query(Instance).count() == 0
    assert not list(ingestor.spool.root.rglob("*.dcm"))


def test_ingest_disk_failure_is_out_of_resources(ingestor: Ingestor) -> None:
    if os.geteuid() == 0:
        # root ignores directory permissions: simulate a broken spool with a file in the way.
        ds = make_dataset()
        (ingestor.spool.root / str(ds.StudyInstanceUID)).write_text("blocked")
    else:
        ds = make_dataset()
        ingestor.spool.root.chmod(0o500)
    with pytest.raises(RejectedInstance) as info:
        ingestor.store(encode(ds))
    assert info.value.status == OUT_OF_RESOURCES
    with ingestor.db.session() as session:
        assert session.query(Instance).count() == 0  # nothing recorded that is not on disk


# -- logs ----------------------------------------------------------------------------------------------


def test_logs_are_json_and_carry_no_identifiers() -> None:
    stream = io.StringIO()
    configure_logging("json", "info", stream=stream)
    key = study_key("1.2.3.4")
    get_logger("t").info("study_queued", study_key=key)
    record = json.loads(stream.getvalue().splitlines()[-1])
    assert record["event"] == "study_queued" and record["study_key"] == key
    assert "1.2.3.4" not in stream.getvalue()
    assert study_key("1.2.3.4") != study_key("1.2.3.5") and len(key) == 16


def test_concurrent_scanners_queue_a_study_once(ingestor: Ingestor) -> None:
    import threading

    from osteogate.gateway.store.db import Job

    for _ in range(5):
        ingestor.store(encode(make_dataset()))
    trackers = [StudyTracker(ingestor.db, stable_seconds=0) for _ in range(4)]
    start = threading.Barrier(len(trackers))
    counts: list[int] = []

    def scan(tracker: StudyTracker) -> None:
        start.wait()
        counts.append(tracker.queue_stable_studies())

    threads = [threading.Thread(target=scan, args=(t,)) for t in trackers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sum(counts) == 5
    with ingestor.db.session() as session:
        assert session.query(Job).count() == 5


def test_malloc_arenas_capped_for_the_service_unless_the_operator_chose(monkeypatch) -> None:
    """serve and worker cap glibc's arenas (memory kept per thread); MALLOC_ARENA_MAX wins."""
    import platform

    from osteogate.gateway.operate.cli.serving import limit_malloc_arenas

    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert limit_malloc_arenas() is False
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    assert limit_malloc_arenas() is (platform.libc_ver()[0] == "glibc")
