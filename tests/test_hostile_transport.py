"""Hostile peers at the transport level (issue 19, items 12 and 13), against a real `osteogate serve`.

Each attack is made of raw bytes on a socket (or a swarm of real dcmtk processes): PDUs cut off
mid-header and mid-PDV, a PDV longer than its PDU, A-ASSOCIATE-RQs with non-ASCII AE titles and
oversized user-identity items, the most presentation contexts a request can carry, an association
released in the middle of a C-STORE, a data set sent as fast as the socket takes it. After each
one the gateway must still answer C-ECHO, nothing half-received may count as stored, and every
instance it acknowledged must be on disk and in SQL.
"""

from __future__ import annotations

import shutil
import socket
import struct
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO
from pathlib import Path

import pytest
from pydicom.filewriter import dcmwrite
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation, Verification

from tests.gateway_harness import GatewayProcess
from tests.helpers import free_port, make_dataset

DX = str(DigitalXRayImageStorageForPresentation)
APPLICATION_CONTEXT = b"1.2.840.10008.3.1.1.1"
RELEASE_RQ = bytes([0x05, 0]) + struct.pack(">I", 4) + bytes(4)


# -- PDU building ----------------------------------------------------------------------------------


def _item(kind: int, data: bytes) -> bytes:
    return bytes([kind, 0]) + struct.pack(">H", len(data)) + data


def _context(context_id: int, abstract: str, syntaxes: tuple[str, ...]) -> bytes:
    body = bytes([context_id, 0, 0, 0]) + _item(0x30, abstract.encode())
    return _item(0x20, body + b"".join(_item(0x40, s.encode()) for s in syntaxes))


def associate_rq(*, called: bytes = b"OSTEOGATE", calling: bytes = b"HOSTILE",
                 contexts: list[bytes] | None = None, user_extra: bytes = b"") -> bytes:
    """An A-ASSOCIATE-RQ PDU (PS3.8 9.3.2), fields as given, not checked."""
    if contexts is None:
        contexts = [_context(1, str(Verification), (str(ImplicitVRLittleEndian),))]
    user = _item(0x50, _item(0x51, struct.pack(">I", 16384)) + _item(0x52, b"1.2.826.0.1.3680043.9.7433") + user_extra)
    body = (struct.pack(">HH", 1, 0) + called.ljust(16, b" ")[:16] + calling.ljust(16, b" ")[:16] + bytes(32)
            + _item(0x10, APPLICATION_CONTEXT) + b"".join(contexts) + user)
    return bytes([0x01, 0]) + struct.pack(">I", len(body)) + body


def user_identity(primary: bytes, secondary: bytes = b"") -> bytes:
    """User Identity Negotiation sub-item (PS3.7 D.3.3.7): type 2 = username and passcode."""
    body = bytes([2 if secondary else 1, 0]) + struct.pack(">H", len(primary)) + primary
    return _item(0x58, body + struct.pack(">H", len(secondary)) + secondary)


def recv_pdu(sock: socket.socket, timeout: float = 10) -> tuple[int, bytes] | None:
    """The next PDU the gateway sends, as (type, body): 2 AC, 3 RJ, 4 P-DATA, 6 RELEASE-RP, 7 ABORT;
    None once the connection is closed."""
    sock.settimeout(timeout)
    try:
        head = b""
        while len(head) < 6:
            chunk = sock.recv(6 - len(head))
            if not chunk:
                return None
            head += chunk
    except ConnectionResetError:
        return None
    body = b""
    length = struct.unpack(">I", head[2:6])[0]
    while len(body) < length:
        chunk = sock.recv(min(length - len(body), 65536))
        if not chunk:
            break
        body += chunk
    return head[0], body


def command_status(p_data_body: bytes) -> int | None:
    """Status (0000,0900) of a DIMSE response in a P-DATA-TF body (Implicit VR Little Endian command)."""
    tag = b"\x00\x00\x00\x09\x02\x00\x00\x00"
    at = p_data_body.find(tag)
    return struct.unpack("<H", p_data_body[at + 8: at + 10])[0] if at >= 0 else None


def recv_pdu_type(sock: socket.socket, timeout: float = 10) -> int | None:
    """The type of the next PDU the gateway sends (2 AC, 3 RJ, 6 RELEASE-RP, 7 ABORT), None if closed."""
    sock.settimeout(timeout)
    try:
        head = sock.recv(6)
    except ConnectionResetError:
        return None
    if len(head) == 0:
        return None
    length = struct.unpack(">I", head[2:6])[0] if len(head) == 6 else 0
    remaining = length
    while remaining > 0:
        chunk = sock.recv(min(remaining, 65536))
        if not chunk:
            break
        remaining -= len(chunk)
    return head[0]


def closed_or_answered(sock: socket.socket, timeout: float = 15) -> int | None:
    """Drain until the gateway closes the socket; the last PDU type seen (None: closed with none)."""
    last = None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        kind = recv_pdu_type(sock, max(0.1, deadline - time.monotonic()))
        if kind is None:
            return last
        last = kind
        if kind in (3, 6, 7):
            return kind
    raise AssertionError("the gateway neither answered nor closed the connection")


def store_pdus(ds_bytes: bytes, sop_instance_uid: str, max_pdu: int = 16384) -> list[bytes]:
    """The P-DATA-TF PDUs of one C-STORE-RQ (command, then data set fragments), context 1."""
    primitive = C_STORE()
    primitive.MessageID = 1
    primitive.AffectedSOPClassUID = DX
    primitive.AffectedSOPInstanceUID = sop_instance_uid
    primitive.Priority = 2
    primitive.DataSet = BytesIO(ds_bytes)
    message = C_STORE_RQ()
    message.primitive_to_message(primitive)
    pdus = []
    for primitive_pdata in message.encode_msg(1, max_pdu):
        pdu = P_DATA_TF()
        pdu.from_primitive(primitive_pdata)
        pdus.append(pdu.encode())
    return pdus


def dataset_bytes(size: tuple[int, int] = (64, 64)) -> tuple[bytes, str]:
    """A DX instance encoded as the body a C-STORE carries (Explicit VR Little Endian, no file meta)."""
    ds = make_dataset(size=size)
    buffer = BytesIO()
    dcmwrite(buffer, ds, little_endian=True, implicit_vr=False)
    return buffer.getvalue(), str(ds.SOPInstanceUID)


def storage_association(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(associate_rq(contexts=[_context(1, DX, (str(ExplicitVRLittleEndian),))]))
    assert recv_pdu_type(sock) == 0x02, "storage association not accepted"
    return sock


def echo_ok(port: int) -> tuple[bool, float]:
    ae = AE(ae_title="PROBE")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    started = time.monotonic()
    assoc = ae.associate("127.0.0.1", port, ae_title="OSTEOGATE")
    ok = False
    if assoc.is_established:
        status = assoc.send_c_echo()
        ok = bool(status) and status.Status == 0
        assoc.release()
    return ok, time.monotonic() - started


def stored_sop_uids(gw: GatewayProcess) -> set[str]:
    """SOP Instance UIDs the gateway recorded as stored (its SQLite file, read directly)."""
    from sqlalchemy import create_engine, text

    engine = create_engine(f"sqlite:///{gw.data_dir / 'osteogate.db'}")
    with engine.connect() as connection:
        uids = {row[0] for row in connection.execute(text("SELECT sop_instance_uid FROM instances"))}
    engine.dispose()
    return uids


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[GatewayProcess]:
    root = tmp_path_factory.mktemp("hostile")
    env = {"OSTEOGATE_DICOM_HANDSHAKE_TIMEOUT_SECONDS": "3", "OSTEOGATE_DICOM_NETWORK_TIMEOUT_SECONDS": "3",
           "OSTEOGATE_HTTP_ENABLED": "true", "OSTEOGATE_HTTP_PORT": str(free_port()),
           "OSTEOGATE_DICOM_MAX_ASSOCIATIONS": "16", "OSTEOGATE_STUDY_STABLE_SECONDS": "600"}
    with GatewayProcess(root / "gw", model=tiny_model, env=env, stable_seconds=600) as gw:
        gw.http_port = int(env["OSTEOGATE_HTTP_PORT"])  # type: ignore[attr-defined]
        yield gw
        assert gw.proc is not None and gw.proc.poll() is None, "the gateway died:\n" + gw.log()[-3000:]


# -- malformed transport (item 13) -------------------------------------------------------------------


@pytest.mark.parametrize("cut", ["header", "body"])
def test_associate_rq_cut_off_then_silence_or_close(gateway: GatewayProcess, cut: str) -> None:
    pdu = associate_rq()
    for close in (True, False):
        sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=10)
        sock.sendall(pdu[:3] if cut == "header" else pdu[: len(pdu) // 2])
        if close:
            sock.close()
        else:  # silence: the handshake deadline (3 s) closes it
            assert closed_or_answered(sock, 15) in (None, 7)
            sock.close()
    assert echo_ok(gateway.port)[0]


@pytest.mark.parametrize("called,calling", [
    (bytes(range(0x80, 0x90)), b"HOSTILE"),          # non-ASCII called AE
    (b"OSTEOGATE", "Ä\u00e9\u4e2d".encode()),        # UTF-8 in the calling AE
    (b"OSTEOGATE", b"\x00\x01\x02\x1b[31m"),         # control characters, an escape sequence
    (b"X" * 16, b"Y" * 16),                          # full-width titles, unknown called AE
])
def test_odd_ae_titles_are_refused_or_served_never_crash(gateway: GatewayProcess, called: bytes,
                                                        calling: bytes) -> None:
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
        sock.sendall(associate_rq(called=called, calling=calling))
        kind = recv_pdu_type(sock)
        assert kind in (None, 0x02, 0x03, 0x07), kind
        if kind == 0x02:
            sock.sendall(RELEASE_RQ)
            assert closed_or_answered(sock) in (None, 6, 7)
    assert echo_ok(gateway.port)[0]
    assert "\x1b[31m" not in gateway.log()  # no terminal escape reaches the operator's log


def test_oversized_user_identity_and_unknown_items(gateway: GatewayProcess) -> None:
    for extra in (user_identity(b"u" * 60000, b"p" * 4000),      # 64 kB of credentials
                  user_identity("名前".encode() * 100, b"\xff" * 10),
                  _item(0x5F, b"\x00" * 20000),                  # an item type nobody defined
                  _item(0x58, b"\x02")):                          # user identity too short to parse
        with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
            sock.sendall(associate_rq(user_extra=extra))
            kind = closed_or_answered(sock)
            assert kind in (None, 0x02, 0x03, 0x07), kind
    assert echo_ok(gateway.port)[0]


def test_pdu_length_lies_are_cut_off(gateway: GatewayProcess) -> None:
    good = associate_rq()
    # Claims 4 GB: the gateway must not wait for (or allocate) it.
    lie = good[:2] + struct.pack(">I", 0xFFFFFFF0) + good[6:]
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
        sock.sendall(lie)
        assert closed_or_answered(sock, 20) in (None, 0x03, 0x07)
    # An unknown PDU type.
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
        sock.sendall(bytes([0x42, 0]) + struct.pack(">I", 8) + bytes(8))
        assert closed_or_answered(sock, 20) in (None, 0x07)
    assert echo_ok(gateway.port)[0]


def test_pdv_longer_than_its_pdu_and_cut_mid_pdv(gateway: GatewayProcess, tmp_path: Path) -> None:
    body, uid = dataset_bytes()
    pdus = store_pdus(body, uid)
    # A PDV item whose length runs past the end of its P-DATA-TF.
    first = bytearray(pdus[0])
    struct.pack_into(">I", first, 6, struct.unpack(">I", first[6:10])[0] + 5000)
    sock = storage_association(gateway.port)
    sock.sendall(bytes(first))
    assert closed_or_answered(sock) in (None, 0x07)
    sock.close()
    # Cut in the middle of a data set PDV, then the peer goes away.
    sock = storage_association(gateway.port)
    sock.sendall(b"".join(pdus[:-1]) + pdus[-1][: len(pdus[-1]) // 2])
    sock.close()
    assert echo_ok(gateway.port)[0]
    assert uid not in stored_sop_uids(gateway), "a half-received instance was stored"


def test_release_in_the_middle_of_a_c_store_stores_nothing(gateway: GatewayProcess, tmp_path: Path) -> None:
    body, uid = dataset_bytes((256, 256))
    pdus = store_pdus(body, uid, max_pdu=4096)
    assert len(pdus) > 4
    sock = storage_association(gateway.port)
    sock.sendall(b"".join(pdus[: len(pdus) // 2]) + RELEASE_RQ)
    assert closed_or_answered(sock) in (None, 0x06, 0x07)
    sock.close()
    assert echo_ok(gateway.port)[0]
    assert uid not in stored_sop_uids(gateway)


def test_a_data_set_as_fast_as_the_socket_takes_it(gateway: GatewayProcess, tmp_path: Path) -> None:
    """40 MB pushed without pause: streamed to the spool (memory stays bounded), stored whole."""
    body, uid = dataset_bytes((4600, 4600))
    assert len(body) > 30_000_000
    pdus = store_pdus(body, uid, max_pdu=16384)
    sock = storage_association(gateway.port)
    sock.sendall(b"".join(pdus))
    response = recv_pdu(sock, 60)  # the C-STORE-RSP
    assert response is not None and response[0] == 0x04, response
    status = command_status(response[1])
    assert status == 0x0000, f"C-STORE answered 0x{status:04X}" if status is not None else "no status"
    sock.sendall(RELEASE_RQ)
    closed_or_answered(sock)
    sock.close()
    assert uid in stored_sop_uids(gateway)
    assert gateway.proc is not None
    status = Path(f"/proc/{gateway.proc.pid}/status").read_text()
    peak_kib = int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1])
    assert peak_kib < 600 * 1024, f"peak RSS {peak_kib // 1024} MB while streaming a 40 MB data set"


# -- load (item 12, scaled to a test) ----------------------------------------------------------------


def test_maximum_presentation_contexts(gateway: GatewayProcess) -> None:
    contexts = [_context(2 * i + 1, DX if i % 2 else str(Verification),
                         (str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian)))
                for i in range(128)]
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
        sock.sendall(associate_rq(contexts=contexts))
        kind = recv_pdu_type(sock)
        assert kind in (0x02, 0x03), kind
        if kind == 0x02:
            sock.sendall(RELEASE_RQ)
            closed_or_answered(sock)
    assert echo_ok(gateway.port)[0]


def test_many_concurrent_associations_and_echo_stays_answered(gateway: GatewayProcess, tmp_path: Path) -> None:
    """60 echoscu processes at once (the benchmark uses 200): each answered or refused cleanly,
    and a C-ECHO of ours answered within seconds throughout."""
    echoscu = shutil.which("echoscu")
    assert echoscu, "dcmtk echoscu is needed"
    procs = [subprocess.Popen([echoscu, "-aec", "OSTEOGATE", "-to", "20", "-ta", "20", "127.0.0.1", str(gateway.port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(60)]
    try:
        latencies = [echo_ok(gateway.port)[1] for _ in range(3)]
    finally:
        codes = [p.wait(60) for p in procs]
    assert max(latencies) < 10, latencies
    assert codes.count(0) >= 16, codes  # at least max_associations of them served; the rest refused cleanly
    assert echo_ok(gateway.port)[0]


def test_rapid_health_and_metrics_requests(gateway: GatewayProcess) -> None:
    port = gateway.http_port  # type: ignore[attr-defined]

    def get(path: str) -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
                response.read()
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)

    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(get, ["/metrics", "/healthz"] * 150))
    assert set(codes) <= {200, 503} and codes.count(200) > 150
    assert echo_ok(gateway.port)[0]


def test_every_acknowledged_instance_survives_the_attacks(gateway: GatewayProcess, tmp_path: Path) -> None:
    """Run last in this module: the instances the gateway said it stored are all in SQL and on disk."""
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(DX, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", gateway.port, ae_title="OSTEOGATE")
    assert assoc.is_established
    sent = []
    for index in range(5):
        ds = make_dataset(InstanceNumber=index + 1)
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        status = assoc.send_c_store(ds)
        assert status.Status == 0
        sent.append(str(ds.SOPInstanceUID))
    assoc.release()
    stored = stored_sop_uids(gateway)
    assert set(sent) <= stored
    files = {p.stem for p in (gateway.data_dir / "spool").rglob("*.dcm")}
    assert stored <= files, "an acknowledged instance has no spooled file"
