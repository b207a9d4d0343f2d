"""The receive path against malformed transport (issue 19 items 10 and 13), in process.

A real StorageSCP on 127.0.0.1 (free port, its own SQLite file and spool under tmp_path); peers
are pynetdicom clients whose raw socket is then fed hand-made bytes: PDUs truncated mid-header
and mid-PDV, a PDV item longer than its PDU, A-ASSOCIATE-RQs with non-ASCII AE titles and huge
user-identity items, an association released in the middle of a C-STORE. Each is refused or
closed cleanly, nothing half-received is acknowledged or left in the spool, and C-ECHO keeps
being answered.
"""

from __future__ import annotations

import hashlib
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from osteogate.gateway.core.config import DicomConfig
from osteogate.gateway.receive.ingest import Ingestor
from osteogate.gateway.receive.scp import StorageSCP
from osteogate.gateway.receive.streaming import ANNOUNCED_PDU_BYTES
from osteogate.gateway.store.db import Database, Instance
from osteogate.gateway.store.spool import Spool
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation, Verification
from sqlalchemy import func, select

from tests.helpers import make_dataset, wait_until

DX = DigitalXRayImageStorageForPresentation
EXPLICIT_LE = "1.2.840.10008.1.2.1"


@pytest.fixture
def scp(tmp_path: Path) -> Iterator[StorageSCP]:
    db = Database(f"sqlite:///{tmp_path / 'gw.db'}")
    db.create_schema()
    config = DicomConfig(port=0, bind="127.0.0.1", network_timeout_seconds=5, handshake_timeout_seconds=3)
    server = StorageSCP(config, Ingestor(db, Spool(tmp_path / "spool")))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _client(max_pdu: int = 16382) -> AE:
    ae = AE(ae_title="MODALITY")
    ae.maximum_pdu_size = max_pdu
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(Verification)
    ae.add_requested_context(DX, EXPLICIT_LE)
    return ae


def echo_ok(port: int) -> bool:
    assoc = _client().associate("127.0.0.1", port, ae_title="OSTEOGATE")
    try:
        return assoc.is_established and getattr(assoc.send_c_echo(), "Status", None) == 0
    finally:
        if assoc.is_established:
            assoc.release()


def stored(scp: StorageSCP) -> int:
    with scp.ingestor.db.session() as session:
        return int(session.execute(select(func.count(Instance.id))).scalar_one())


def leftovers(scp: StorageSCP) -> list[Path]:
    return list(scp.ingestor.spool.incoming_dir.glob("*"))


def _pdata(*pdvs: tuple[int, int, bytes]) -> bytes:
    """A P-DATA-TF PDU holding (context id, control header, data) items."""
    body = b"".join(struct.pack(">LBB", 2 + len(data), cx, control) + data for cx, control, data in pdvs)
    return struct.pack(">BBL", 0x04, 0, len(body)) + body


def _raw_socket_after_associate(port: int) -> tuple[socket.socket, int]:
    """An established association's socket, taken from pynetdicom (which stops reading it)."""
    assoc = _client().associate("127.0.0.1", port, ae_title="OSTEOGATE")
    assert assoc.is_established
    context_id = next(cx.context_id for cx in assoc.accepted_contexts if cx.abstract_syntax == DX)
    sock = assoc.dul.socket.socket
    # Detach: pynetdicom's threads must not read what the server answers, nor close the socket.
    assoc.dul.socket.socket = None
    assoc.dul._kill_thread = True
    assoc._kill = True
    return sock, context_id


def _store_command(message_id: int = 1, sop_uid: str = "1.2.3.4.5") -> bytes:
    primitive = C_STORE()
    primitive.MessageID = message_id
    primitive.AffectedSOPClassUID = DX
    primitive.AffectedSOPInstanceUID = sop_uid
    primitive.Priority = 2
    message = C_STORE_RQ()
    message.primitive_to_message(primitive)
    message.command_set.CommandDataSetType = 0x0001
    encoded = encode(message.command_set, True, True)  # commands are always implicit VR LE
    assert encoded is not None
    return encoded


def _closed_by_peer(sock: socket.socket, seconds: float = 5) -> bool:
    sock.settimeout(seconds)
    try:
        while sock.recv(65536):
            pass  # an A-ABORT or A-RELEASE answer may come first
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


# -- item 10: fewer, bigger PDUs --------------------------------------------------------------------------


def test_gateway_announces_big_pdus_and_stores_them_intact(scp: StorageSCP) -> None:
    """256 KiB PDUs (not pynetdicom's 16382 bytes): each PDU costs Python calls, so fewer is
    cheaper per byte. A 2 MB instance in 256 KiB PDUs arrives byte for byte."""
    ds = make_dataset(size=(1024, 1024), seed=3)
    assoc = _client(max_pdu=ANNOUNCED_PDU_BYTES).associate("127.0.0.1", scp.port, ae_title="OSTEOGATE")
    try:
        assert assoc.acceptor.maximum_length == ANNOUNCED_PDU_BYTES == 262144
        assert assoc.send_c_store(ds).Status == 0
    finally:
        assoc.release()
    with scp.ingestor.db.session() as session:
        path, sha256 = session.execute(select(Instance.path, Instance.sha256)).one()
    spooled = scp.ingestor.spool.absolute(path)
    assert pydicom.dcmread(spooled).PixelData == ds.PixelData
    # The digest is taken while the data set streams in: it must be that of the file on disk.
    assert sha256 == hashlib.sha256(spooled.read_bytes()).hexdigest()
    assert leftovers(scp) == []


# -- item 13: malformed transport ---------------------------------------------------------------------------


@pytest.mark.parametrize("cut", ["mid-header", "mid-pdv"])
def test_pdu_truncated_then_closed_stores_nothing(scp: StorageSCP, cut: str) -> None:
    sock, cx = _raw_socket_after_associate(scp.port)
    command = _pdata((cx, 0x03, _store_command()))
    first_data = _pdata((cx, 0x00, b"\x08\x00\x05\x00CS\x0a\x00ISO_IR 100" + b"\x00" * 4000))
    sock.sendall(command)
    if cut == "mid-header":
        sock.sendall(first_data[:3])  # 3 of the 6 header bytes
    else:
        sock.sendall(first_data[:2000])  # the header says ~4 kB; half of it, then nothing
    sock.close()
    wait_until(lambda: leftovers(scp) == [], 10)
    assert stored(scp) == 0
    assert echo_ok(scp.port)


def test_pdv_longer_than_its_pdu_closes_the_connection(scp: StorageSCP) -> None:
    sock, cx = _raw_socket_after_associate(scp.port)
    sock.sendall(_pdata((cx, 0x03, _store_command())))
    data = b"\x00" * 64
    # The PDV item claims 10,000 bytes inside a PDU of 70: a protocol violation.
    body = struct.pack(">LBB", 10_000, cx, 0x02) + data
    sock.sendall(struct.pack(">BBL", 0x04, 0, len(body)) + body)
    assert _closed_by_peer(sock)
    sock.close()
    wait_until(lambda: leftovers(scp) == [], 10)
    assert stored(scp) == 0
    assert echo_ok(scp.port)


def test_release_in_the_middle_of_a_c_store_keeps_nothing(scp: StorageSCP) -> None:
    sock, cx = _raw_socket_after_associate(scp.port)
    sock.sendall(_pdata((cx, 0x03, _store_command())))
    sock.sendall(_pdata((cx, 0x00, b"\x00" * 8000)))  # data set begun, not finished
    sock.sendall(bytes.fromhex("0500 00000004 00000000"))  # A-RELEASE-RQ
    assert _closed_by_peer(sock)
    sock.close()
    wait_until(lambda: leftovers(scp) == [], 10)
    assert stored(scp) == 0
    assert echo_ok(scp.port)


def _associate_rq(called: bytes, calling: bytes, user_items: bytes = b"") -> bytes:
    def item(kind: int, value: bytes) -> bytes:
        return struct.pack(">BBH", kind, 0, len(value)) + value

    context = item(0x20, bytes([1, 0, 0, 0]) + item(0x30, Verification.encode()) + item(0x40, EXPLICIT_LE.encode()))
    user = item(0x50, item(0x51, struct.pack(">L", 16382)) + user_items)
    body = (struct.pack(">HH", 1, 0) + called.ljust(16)[:16] + calling.ljust(16)[:16] + b"\x00" * 32
            + item(0x10, b"1.2.840.10008.3.1.1.1") + context + user)
    return struct.pack(">BBL", 0x01, 0, len(body)) + body


@pytest.mark.parametrize("case", ["non-ascii calling AE", "non-ascii called AE", "huge user identity",
                                  "non-ascii user identity"])
def test_odd_associate_requests_are_answered_and_the_listener_stays(scp: StorageSCP, case: str) -> None:
    called, calling, user = b"OSTEOGATE", b"MODALITY", b""
    if case == "non-ascii calling AE":
        calling = "MODALITÉ".encode()
    elif case == "non-ascii called AE":
        called = "OSTÉOGATE".encode()
    elif case == "huge user identity":
        name = b"u" * 60_000
        user = struct.pack(">BBHBBH", 0x58, 0, 5 + len(name), 1, 0, len(name)) + name + b"\x00\x00"
    else:
        name = "médecin".encode()
        user = struct.pack(">BBHBBH", 0x58, 0, 5 + len(name), 1, 0, len(name)) + name + b"\x00\x00"
    with socket.create_connection(("127.0.0.1", scp.port), timeout=5) as sock:
        sock.sendall(_associate_rq(called, calling, user))
        sock.settimeout(5)
        answer = sock.recv(1)
        # Accepted (AC, 0x02), rejected (RJ, 0x03), aborted (0x07) or closed: never a hang.
        assert answer in (b"\x02", b"\x03", b"\x07", b""), answer
    assert echo_ok(scp.port)
    assert leftovers(scp) == []


def test_status_dataset_for_stored_instance_is_success(scp: StorageSCP) -> None:
    """Control: the same helpers with a well-formed C-STORE store one instance."""
    ds: Dataset = make_dataset(size=(64, 64), seed=1)
    assoc = _client().associate("127.0.0.1", scp.port, ae_title="OSTEOGATE")
    try:
        assert assoc.send_c_store(ds).Status == 0
    finally:
        assoc.release()
    assert stored(scp) == 1
