"""The MLLP listener over 127.0.0.1: real ORU^R01 messages, good and malformed, each answered
(AA, AE or AR with a reason) or timed out; nothing half-stored; the listener keeps answering."""

from __future__ import annotations

import shutil
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from osteogate.gateway.core.groundtruth_config import GroundTruthConfig
from osteogate.gateway.core.metrics import REGISTRY
from osteogate.gateway.groundtruth.mllp import MllpListener
from osteogate.gateway.store.db import Database
from osteogate.gateway.store.dxa import DxaExam, DxaSite
from sqlalchemy import func, select

from tests.helpers.mllp_client import MllpClient, oru_message

SPINE, FEMUR, HIP = ("38267-1", "DXA Lumbar spine [T-score]"), ("38263-0", "DXA Femur [T-score]"), \
    ("38264-8", "DXA Hip [T-score]")


def good(control_id: str = "MSG1", patient: str = "PAT001", day: str = "20250601") -> str:
    return oru_message(patient, day, [(*SPINE, "-2.7"), (*FEMUR, "-1.9"), ("24966-4", "DXA L-spine BMD", "0.81")],
                       control_id=control_id)


@pytest.fixture
def db(tmp_path: Path) -> Database:
    database = Database(f"sqlite:///{tmp_path / 'g.db'}")
    database.migrate()
    return database


def _listener(db: Database, **config: object) -> MllpListener:
    listener = MllpListener(GroundTruthConfig(bind="127.0.0.1", **config), db, port=0)  # type: ignore[arg-type]
    listener.start()
    return listener


@pytest.fixture
def listener(db: Database) -> Iterator[MllpListener]:
    listener = _listener(db, read_timeout_seconds=1.0)
    yield listener
    listener.stop()


def counts(db: Database) -> tuple[int, int]:
    with db.session() as session:
        return (session.execute(select(func.count()).select_from(DxaExam)).scalar_one(),
                session.execute(select(func.count()).select_from(DxaSite)).scalar_one())


def answered(outcome: str) -> float:
    return REGISTRY.get_sample_value("osteogate_hl7_messages_total", {"outcome": outcome}) or 0.0


def test_well_formed_oru_is_stored_and_acknowledged_once(listener: MllpListener, db: Database) -> None:
    before = answered("AA")
    with MllpClient(listener.port) as client:
        ack = client.send(good())
        assert (ack.code, ack.control_id) == ("AA", "MSG1")
        assert client.send(good("MSG1-resent")).code == "AA"  # the same exam again: no second row
    assert counts(db) == (1, 2)
    assert answered("AA") == before + 2  # Prometheus: /metrics osteogate_hl7_messages_total
    with db.session() as session:
        exam = session.execute(select(DxaExam)).scalar_one()
        assert (exam.patient_id, exam.issuer_of_patient_id, str(exam.dxa_date)) == ("PAT001", "HOSP_A", "2025-06-01")
        assert (exam.lowest_t_score, exam.who_category, exam.source) == (-2.7, "osteoporosis", "hl7")
        assert sorted(s.site_code for s in exam.sites) == ["38263-0", "38267-1"]  # the BMD OBX is not a T-score


@pytest.mark.parametrize(("message", "code", "reason"), [
    (oru_message(None, "20250601", [(*SPINE, "-2.7")]), "AE", "PID-3"),
    (oru_message("PAT002", "20250601", [(*SPINE, "-2.7"), (*HIP, "low")]), "AE", "OBX 2 (38264-8): OBX-5 'low' is not a number"),
    (oru_message("PAT002", "20250601", [(*SPINE, "-27")]), "AE", "outside"),
    (oru_message("PAT002", "20250601", [("24966-4", "DXA L-spine BMD", "0.81"), ("9999-9", "x", "1")]), "AE",
     "no DXA T-score OBX (OBX-3 codes seen: 24966-4, 9999-9"),
    (oru_message("PAT002", "20250601", [(*SPINE, "-2.7")], message_type="ADT^A01"), "AR", "ADT^A01 is not accepted"),
    (oru_message("PAT002", "2025XX01", [(*SPINE, "-2.7")]), "AE", "OBR-7 '2025XX01093000' is not an HL7 date"),
    ("this is not HL7", "AR", "not an HL7 v2 message"),
], ids=["missing-pid3", "non-numeric-obx5", "impossible-t-score", "unknown-codes", "unknown-type", "bad-date",
        "not-hl7"])
def test_bad_message_gets_a_clear_nak_and_nothing_is_stored(listener: MllpListener, db: Database, message: str,
                                                            code: str, reason: str) -> None:
    with MllpClient(listener.port) as client:
        ack = client.send(message)
        assert ack.code == code and reason in ack.text, ack
        assert counts(db) == (0, 0)  # a message with one good T-score before the bad one: still nothing
        assert client.send(good()).code == "AA"  # the same connection keeps answering
    assert counts(db) == (1, 2)


def test_ten_megabyte_message_is_refused_without_closing(listener: MllpListener, db: Database) -> None:
    huge = good().replace("TEST^PATIENT", "X" * (10 * 2**20))
    with MllpClient(listener.port, timeout=30) as client:
        ack = client.send(huge)
        assert ack.code == "AR" and "max_message_bytes (1048576 bytes)" in ack.text
        assert client.send(good()).code == "AA"
    assert counts(db) == (1, 2)


def test_half_sent_frame_then_silence_times_out(listener: MllpListener, db: Database) -> None:
    frame = b"\x0b" + good().encode() + b"\x1c\r"
    with MllpClient(listener.port, timeout=10) as client:
        client.send_raw(frame[: len(frame) // 2])
        started = time.monotonic()
        assert client.closed_by_peer()  # no ACK: the connection is closed
        assert 0.9 <= time.monotonic() - started < 6
    assert counts(db) == (0, 0) and answered("timeout") >= 1
    with MllpClient(listener.port) as client:  # the listener is still there
        assert client.send(good()).code == "AA"


def test_idle_connection_is_kept_between_messages(listener: MllpListener) -> None:
    with MllpClient(listener.port) as client:
        assert client.send(good("A")).code == "AA"
        time.sleep(1.6)  # longer than the read timeout, with no frame begun: not a half-sent message
        assert client.send(good("B", patient="PAT009")).code == "AA"


def test_frame_not_starting_with_vt_and_peer_closing_mid_frame(listener: MllpListener, db: Database) -> None:
    with MllpClient(listener.port) as client:
        client.send_raw(good().encode() + b"\x1c\r")
        assert client.read_ack().code == "AR"
    with MllpClient(listener.port) as client:
        client.send_raw(b"\x0b" + good().encode()[:100])
    with MllpClient(listener.port) as client:
        assert client.send(good()).code == "AA"
    assert counts(db) == (1, 2)


def test_host_not_on_allow_list_is_closed_unanswered(db: Database) -> None:
    listener = _listener(db, allowed_hosts=["10.99.99.0/24"])
    try:
        with MllpClient(listener.port) as client:
            client.send_raw(b"\x0b" + good().encode() + b"\x1c\r")
            assert client.closed_by_peer()
        assert counts(db) == (0, 0)
    finally:
        listener.stop()
    listener = _listener(db, allowed_hosts=["127.0.0.0/8"])
    try:
        with MllpClient(listener.port) as client:
            assert client.send(good()).code == "AA"
    finally:
        listener.stop()


def test_tls(db: Database, tmp_path: Path) -> None:
    if not shutil.which("openssl"):
        pytest.skip("openssl not installed")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "key.pem", "-out",
                    "cert.pem", "-days", "2", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1"],
                   cwd=tmp_path, check=True, capture_output=True, timeout=60)
    listener = _listener(db, tls_cert=str(tmp_path / "cert.pem"), tls_key=str(tmp_path / "key.pem"))
    try:
        context = ssl.create_default_context(cafile=str(tmp_path / "cert.pem"))
        with MllpClient(listener.port, tls=context) as client:
            assert client.send(good()).code == "AA"
        with MllpClient(listener.port) as plain:  # no TLS: no ACK, nothing stored twice
            plain.send_raw(b"\x0b" + good("PLAIN", patient="PAT7").encode() + b"\x1c\r")
            assert plain.closed_by_peer()
    finally:
        listener.stop()
    assert counts(db) == (1, 2)


def test_serve_checks_the_mllp_port_before_starting(tmp_path: Path) -> None:
    import socket

    from osteogate.gateway.core.config import load_settings
    from osteogate.gateway.core.errors import TemporaryFailure
    from osteogate.gateway.operate.preflight import check_ports

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        settings = load_settings(environ={}, overrides={
            "dicom": {"port": 0}, "groundtruth": {"mllp_port": port, "bind": "127.0.0.1"}})
        with pytest.raises(TemporaryFailure, match=f"cannot listen on 127.0.0.1:{port}.*groundtruth.mllp_port"):
            check_ports(settings)
