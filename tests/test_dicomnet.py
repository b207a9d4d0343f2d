"""Pure decision logic of the network layer (gateway.core.dicomnet) and of job and delivery claiming:
what a status or a rejection means, how long to wait, when a crashing job is given up; plus the
durability of new spool directories and the log scrubber."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from osteogate.gateway.core.config import Destination, load_settings
from osteogate.gateway.core.dicomnet import (
    AssociationError,
    Outcome,
    backoff_seconds,
    client_ae,
    open_association,
    rejection_outcome,
    rejection_text,
    status_outcome,
    status_text,
)
from osteogate.gateway.core.logs import configure_logging, format_exception, get_logger, scrub
from osteogate.gateway.core.metrics import OTHER, ae_label
from osteogate.gateway.operate.admin import recover_stale_jobs
from osteogate.gateway.report.publisher import ReportPublisher
from osteogate.gateway.store.db import Database, Job, JobStatus, Study, StudyStatus, utcnow
from osteogate.gateway.store.spool import Spool
from osteogate.gateway.work.jobs import worker_id
from osteogate.gateway.work.worker import ClassifierWorker
from pydicom.uid import generate_uid
from pynetdicom.sop_class import Verification

# -- statuses and rejections ---------------------------------------------------------------------------


@pytest.mark.parametrize(("code", "outcome"), [
    (0x0000, Outcome.SUCCESS),
    (0xB000, Outcome.WARNING), (0xB007, Outcome.WARNING), (0x0001, Outcome.WARNING),
    (0xA700, Outcome.TRANSIENT), (0xA7FF, Outcome.TRANSIENT), (None, Outcome.TRANSIENT),
    (0xFE00, Outcome.TRANSIENT),
    (0xA900, Outcome.PERMANENT), (0xC000, Outcome.PERMANENT), (0xC001, Outcome.PERMANENT),
    (0x0122, Outcome.PERMANENT), (0x0111, Outcome.PERMANENT), (0x0211, Outcome.PERMANENT),
    (0xD123, Outcome.PERMANENT),
])
def test_status_outcome(code: int | None, outcome: Outcome) -> None:
    assert status_outcome(code) == outcome
    assert outcome.ok == (outcome in (Outcome.SUCCESS, Outcome.WARNING))


def test_status_words() -> None:
    assert status_text(0x0000) == "0x0000 (Success)"
    assert status_text(0xA701) == "0xA701 (Refused: Out of Resources)"
    assert status_text(0xC001) == "0xC001 (Cannot Understand)"
    assert status_text(0x0122) == "0x0122 (Refused: SOP Class Not Supported)"
    assert status_text(0xD123) == "0xD123 (unknown status)"
    assert "no response" in status_text(None)


def test_rejection_words_as_dcmtk_says_them() -> None:
    assert rejection_text(1, 1, 7) == "rejected permanently by the called AE: called AE title not recognised"
    assert rejection_text(1, 1, 3) == "rejected permanently by the called AE: calling AE title not recognised"
    assert rejection_text(2, 3, 2) == ("rejected transiently by the called AE's DICOM service provider "
                                       "(presentation layer): local limit exceeded")
    assert rejection_text(1, 2, 2).endswith("(ACSE): protocol version not supported")
    assert rejection_text(1, 1, 9) == "rejected permanently by the called AE: reason 9"
    assert rejection_outcome(1) == Outcome.PERMANENT
    assert rejection_outcome(2) == Outcome.TRANSIENT


def test_backoff() -> None:
    assert [backoff_seconds(n, 5, 600) for n in (0, 1, 2, 3, 4)] == [5, 5, 10, 20, 40]
    assert backoff_seconds(8, 5, 600) == 600
    assert backoff_seconds(10_000, 5, 600) == 600  # no overflow however long a PACS is down
    assert backoff_seconds(1, 900, 600) == 600


def test_unresolvable_host_is_a_permanent_error_in_words() -> None:
    ae = client_ae("OSTEOGATE", 3)
    ae.add_requested_context(Verification)
    with pytest.raises(AssociationError) as info:
        open_association(ae, Destination.parse("PACS@no-such-host.invalid:104"))
    assert info.value.outcome == Outcome.PERMANENT and "cannot be resolved" in info.value.detail


def test_nobody_listening_is_transient_in_words() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ae = client_ae("OSTEOGATE", 3)
    ae.add_requested_context(Verification)
    with pytest.raises(AssociationError) as info:
        open_association(ae, Destination.parse(f"PACS@127.0.0.1:{port}"))
    assert info.value.outcome == Outcome.TRANSIENT and "connection refused" in info.value.detail


def test_metric_labels_only_for_allowed_callers() -> None:
    assert ae_label("GOODMOD", ["GOODMOD"]) == "GOODMOD"
    assert ae_label("STRANGER", ["GOODMOD"]) == OTHER
    assert ae_label("GOODMOD", []) == OTHER
    assert ae_label(None, ["GOODMOD"]) == OTHER


# -- jobs that kill their worker -------------------------------------------------------------------------


@pytest.fixture
def db(tmp_path: Path) -> Database:
    database = Database(f"sqlite:///{tmp_path / 'jobs.db'}")
    database.create_schema()
    return database


def _job(db: Database, *, status: JobStatus, attempts: int, worker: str | None = None,
         lease_seconds: float | None = None) -> int:
    with db.session() as session:
        study = Study(study_uid=generate_uid(), study_key="k", version=1,
                      status=StudyStatus.PROCESSING)
        session.add(study)
        session.flush()
        job = Job(study_id=study.id, study_version=1, status=status, attempts=attempts, worker=worker,
                  lease_until=utcnow() + timedelta(seconds=lease_seconds) if lease_seconds is not None else None)
        session.add(job)
        session.flush()
        return job.id


def _dead_worker_id() -> str:
    """A worker id of this host whose process has exited."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host, _, token = worker_id().split(":")
    return f"{host}:{proc.stdout.strip()}:{token}"


def _state(db: Database, job_id: int) -> tuple[JobStatus, str | None, StudyStatus]:
    with db.session() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job.status, job.error, job.study.status


def test_dead_worker_jobs_are_failed_once_attempts_are_spent(db: Database, tmp_path: Path) -> None:
    settings = load_settings(environ={}, overrides={"worker": {"max_attempts": 3},
                                                    "storage": {"data_dir": str(tmp_path)}})
    worker = ClassifierWorker(settings, db, Spool(tmp_path / "spool"), ReportPublisher(settings, Spool(tmp_path / "reports")), lambda _: None)
    dead = _dead_worker_id()
    retry = _job(db, status=JobStatus.RUNNING, attempts=2, worker=dead, lease_seconds=300)
    spent = _job(db, status=JobStatus.RUNNING, attempts=3, worker=dead, lease_seconds=300)
    assert worker.jobs.recover_own_dead_jobs() == 2
    assert _state(db, retry)[0] == JobStatus.PENDING
    status, error, study = _state(db, spent)
    assert status == JobStatus.FAILED and study == StudyStatus.FAILED
    assert error is not None and error.startswith("worker died 3 times")
    # The pending one is claimed (its third attempt); nothing is claimed after it.
    assert worker.jobs.claim() == retry
    assert worker.jobs.claim() is None


def test_spent_jobs_are_never_claimed_and_stale_recovery_fails_them(db: Database, tmp_path: Path) -> None:
    settings = load_settings(environ={}, overrides={"worker": {"max_attempts": 2},
                                                    "storage": {"data_dir": str(tmp_path)}})
    worker = ClassifierWorker(settings, db, Spool(tmp_path / "spool"), ReportPublisher(settings, Spool(tmp_path / "reports")), lambda _: None)
    expired = _job(db, status=JobStatus.RUNNING, attempts=2, worker="otherhost:1:abcd", lease_seconds=-5)
    leftover = _job(db, status=JobStatus.PENDING, attempts=2)  # requeued by an older release
    assert worker.jobs.claim() is None
    assert recover_stale_jobs(db, max_attempts=2) == {"requeued": 0, "failed": 2}
    for job_id in (expired, leftover):
        status, error, study = _state(db, job_id)
        assert status == JobStatus.FAILED and study == StudyStatus.FAILED and "worker died 2 times" in (error or "")


# -- durable directories ----------------------------------------------------------------------------------


def test_new_study_and_series_directories_are_fsynced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file renamed into a new directory survives power loss only if the new directory entries
    (study in spool, series in study) and the file's entry are fsynced."""
    spool = Spool(tmp_path / "spool")
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    spool.write_atomic("1.2.3/4.5.6/7.8.9.dcm", b"data")
    root = str(spool.root)
    assert f"{root}" in synced  # entry of the new study directory
    assert f"{root}/1.2.3" in synced  # entry of the new series directory
    assert f"{root}/1.2.3/4.5.6" in synced  # entry of the file
    assert (spool.root / "1.2.3/4.5.6/7.8.9.dcm").read_bytes() == b"data"


# -- log scrubbing ----------------------------------------------------------------------------------------


def test_scrub_drops_values_keeps_words() -> None:
    text = "Invalid value for VR DA: '19.05.1961'. UID 1.2.840.113619.2.5 date 19610519 at 10:22:33"
    out = scrub(text)
    for value in ("19.05.1961", "1.2.840.113619.2.5", "19610519", "10:22:33"):
        assert value not in out
    assert out.startswith("Invalid value for VR DA:")


def test_exceptions_keep_frames_and_lose_values() -> None:
    value = ".".join(["19", "05", "1961"])  # built at run time: the source line must not hold it
    try:
        raise ValueError(f"Unable to convert {value!r} to 'DA' object")
    except ValueError as exc:
        text = format_exception((type(exc), exc, exc.__traceback__))
    assert "test_dicomnet.py" in text and "ValueError" in text and "19.05.1961" not in text
    stream = io.StringIO()
    configure_logging("json", "info", stream=stream)
    try:
        raise KeyError("PID" + "12345678")
    except KeyError:
        get_logger("t").exception("boom")
    record = json.loads(stream.getvalue().splitlines()[-1])
    assert record["event"] == "boom" and "KeyError" in record["exception"]
    assert "PID12345678" not in stream.getvalue()
