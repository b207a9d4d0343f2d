"""Who may talk to the gateway, and over what: AE titles, source hosts, disk headroom, TLS."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    Comprehensive3DSRStorage,
    DigitalXRayImageStorageForPresentation,
    Verification,
)

from tests.gateway_harness import GatewayProcess
from tests.helpers import free_port, make_dataset, wait_until, write_dataset


def _echo(port: int, calling: str = "MODALITY", called: str = "OSTEOGATE",
          tls: ssl.SSLContext | None = None) -> tuple[bool, object]:
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title=called, tls_args=(tls, "localhost") if tls else None)
    if not assoc.is_established:
        return False, assoc.acceptor.primitive
    status = assoc.send_c_echo()
    assoc.release()
    return int(status.Status) == 0, None


def test_calling_ae_allow_list(tmp_path: Path, tiny_model: Path) -> None:
    with GatewayProcess(tmp_path / "gw", model=tiny_model,
                        env={"OSTEOGATE_DICOM_ALLOWED_CALLING_AETS": "GOODMOD"}) as gw:
        assert _echo(gw.port, calling="GOODMOD")[0]
        ok, rejection = _echo(gw.port, calling="STRANGER")
        assert not ok and rejection.result == 0x01 and rejection.diagnostic == 0x03  # calling AE not recognised


def test_source_host_allow_list(tmp_path: Path, tiny_model: Path) -> None:
    with GatewayProcess(tmp_path / "gw", model=tiny_model,
                        env={"OSTEOGATE_DICOM_ALLOWED_HOSTS": "10.99.0.0/16"}) as gw:
        # Closed in the accept loop, before a single byte is read: no association, no rejection.
        ok, rejection = _echo(gw.port)
        assert not ok and rejection is None
        refused = wait_until(lambda: [e for e in gw.events() if e.get("event") == "connection_refused"], 10)
        assert refused[0]["reason"] == "source host not on dicom.allowed_hosts"
        assert "127.0.0.1" not in str(refused)  # the peer is logged hashed
    with GatewayProcess(tmp_path / "gw2", model=tiny_model,
                        env={"OSTEOGATE_DICOM_ALLOWED_HOSTS": "127.0.0.0/8"}) as gw:
        assert _echo(gw.port)[0]


def test_low_disk_refuses_associations_transiently(tmp_path: Path, tiny_model: Path) -> None:
    huge = str(shutil.disk_usage(tmp_path).free // 2**20 + 10_000_000)
    with GatewayProcess(tmp_path / "gw", model=tiny_model, env={"OSTEOGATE_STORAGE_MIN_FREE_MB": huge}) as gw:
        ok, rejection = _echo(gw.port)
        assert not ok and rejection.result == 0x02  # transient: the modality keeps the images and retries
        assert not list((tmp_path / "gw" / "spool").rglob("*.dcm"))


# -- TLS ---------------------------------------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A throwaway CA with a server certificate (localhost / 127.0.0.1) and a client certificate."""
    if not shutil.which("openssl"):
        pytest.skip("openssl not installed")
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=OsteoGate Test CA", cwd=d)
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={'localhost' if name == 'server' else 'modality'}", cwd=d)
        (d / f"{name}.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=d)
    return d


def _client_context(pki: Path, with_cert: bool = True) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki / "ca.pem"))
    if with_cert:
        context.load_cert_chain(str(pki / "client.pem"), str(pki / "client.key"))
    return context


class TlsPACS:
    """A pynetdicom PACS that only speaks TLS and requires a client certificate from our CA."""

    def __init__(self, pki: Path) -> None:
        self.received: list[pydicom.Dataset] = []
        self.port = free_port()
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(str(pki / "server.pem"), str(pki / "server.key"))
        context.load_verify_locations(cafile=str(pki / "ca.pem"))
        context.verify_mode = ssl.CERT_REQUIRED
        ae = AE(ae_title="TLSPACS")
        ae.add_supported_context(Comprehensive3DSRStorage)
        self._lock = threading.Lock()
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, ssl_context=context,
                                      evt_handlers=[(evt.EVT_C_STORE, self._store)])

    def _store(self, event: evt.Event) -> int:
        with self._lock:
            self.received.append(event.dataset)
        return 0


def test_tls_receive_and_send(tmp_path: Path, tiny_model: Path, pki: Path) -> None:
    pacs = TlsPACS(pki)
    config = tmp_path / "gw.toml"
    config.write_text(
        "[dicom.tls]\nenabled = true\n"
        f'cert_file = "{pki / "server.pem"}"\nkey_file = "{pki / "server.key"}"\nca_file = "{pki / "ca.pem"}"\n'
        "[delivery.tls]\n"
        f'ca_file = "{pki / "ca.pem"}"\ncert_file = "{pki / "client.pem"}"\nkey_file = "{pki / "client.key"}"\n'
    )
    env = {"OSTEOGATE_CONFIG": str(config)}
    gw = GatewayProcess(tmp_path / "gw", model=tiny_model, destinations=[f"TLSPACS@127.0.0.1:{pacs.port}+tls"],
                        env=env)
    try:
        with gw:
            # Without TLS, or without a client certificate, nothing gets through.
            assert not _echo(gw.port)[0]
            try:
                ok = _echo(gw.port, tls=_client_context(pki, with_cert=False))[0]
            except (ssl.SSLError, OSError):
                ok = False
            assert not ok
            assert _echo(gw.port, tls=_client_context(pki))[0]

            path = write_dataset(make_dataset(), tmp_path / "knee.dcm")
            ae = AE(ae_title="MODALITY")
            ae.add_requested_context(DigitalXRayImageStorageForPresentation)
            assoc = ae.associate("127.0.0.1", gw.port, ae_title="OSTEOGATE", tls_args=(_client_context(pki), "localhost"))
            assert assoc.is_established
            assert int(assoc.send_c_store(path).Status) == 0
            assoc.release()
            wait_until(lambda: pacs.received, 120)
            assert pacs.received[0].StudyInstanceUID == pydicom.dcmread(path).StudyInstanceUID
    finally:
        pacs.server.shutdown()


def test_max_instance_size_and_association_limit(tmp_path: Path, tiny_model: Path) -> None:
    big = write_dataset(make_dataset(size=(1024, 1024)), tmp_path / "big.dcm")  # 2 MB of pixels
    small = write_dataset(make_dataset(), tmp_path / "small.dcm")
    # A short network timeout frees the slot that the harness's readiness probe (a bare TCP
    # connect, which pynetdicom holds until its ARTIM timer expires) occupies.
    env = {"OSTEOGATE_DICOM_MAX_INSTANCE_MB": "1", "OSTEOGATE_DICOM_MAX_ASSOCIATIONS": "1",
           "OSTEOGATE_DICOM_NETWORK_TIMEOUT_SECONDS": "2"}
    with GatewayProcess(tmp_path / "gw", model=tiny_model, env=env) as gw:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(DigitalXRayImageStorageForPresentation)
        first = wait_until(lambda: (a := ae.associate("127.0.0.1", gw.port, ae_title="OSTEOGATE")).is_established
                           and a, 30, interval=0.5)
        try:
            # Over the instance size limit: out of resources, nothing stored.
            assert int(first.send_c_store(big).Status) == 0xA700
            assert int(first.send_c_store(small).Status) == 0x0000
            # The one allowed association is busy: a second is rejected, transiently.
            second = ae.associate("127.0.0.1", gw.port, ae_title="OSTEOGATE")
            assert second.is_rejected and second.acceptor.primitive.result == 0x02
            # A monitoring C-ECHO is still answered: Verification-only associations have a few
            # slots of their own (four), held open here at once; a fifth needs a storage slot.
            echo_ae = AE(ae_title="MONITOR")
            echo_ae.add_requested_context(Verification)
            echoes = [echo_ae.associate("127.0.0.1", gw.port, ae_title="OSTEOGATE") for _ in range(5)]
            try:
                assert [a.is_established for a in echoes] == [True] * 4 + [False]
                assert all(int(a.send_c_echo().Status) == 0 for a in echoes[:4])
            finally:
                for a in echoes:
                    if a.is_established:
                        a.release()
            # An association proposing storage *and* Verification is a storage association.
            mixed_ae = AE(ae_title="MODALITY")
            mixed_ae.add_requested_context(Verification)
            mixed_ae.add_requested_context(DigitalXRayImageStorageForPresentation)
            assert mixed_ae.associate("127.0.0.1", gw.port, ae_title="OSTEOGATE").is_rejected
        finally:
            first.release()
    assert len(list((tmp_path / "gw" / "spool").rglob("*.dcm"))) == 1


# -- slow and idle peers ---------------------------------------------------------------------------------


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    """True if the peer closes ``sock`` (EOF or reset) within ``seconds``."""
    sock.settimeout(seconds)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_idle_connections_hold_no_slots_and_are_cut_off(tmp_path: Path, tiny_model: Path) -> None:
    env = {"OSTEOGATE_DICOM_MAX_ASSOCIATIONS": "2", "OSTEOGATE_DICOM_HANDSHAKE_TIMEOUT_SECONDS": "2"}
    with GatewayProcess(tmp_path / "gw", model=tiny_model, env=env) as gw:
        idle = [socket.create_connection(("127.0.0.1", gw.port), timeout=5) for _ in range(8)]
        try:
            # More than max(4, max_associations) waiting from one host: the extra ones go at once.
            closed_at_once = sum(_closed_within(s, 0.5) for s in idle)
            assert closed_at_once >= 3, closed_at_once
            # The ones still open hold no association slot: both slots serve modalities right now.
            started = time.monotonic()
            ok = [_echo(gw.port)[0], _echo(gw.port)[0]]
            assert ok == [True, True] and time.monotonic() - started < 2
            # ... and they are closed once the handshake timeout (2 s) has passed.
            assert all(_closed_within(s, 4) for s in idle)
        finally:
            for s in idle:
                s.close()
        events = gw.events()
    assert any(e.get("event") == "connection_refused" and "waiting" in e["reason"] for e in events)


def test_hosts_off_the_allow_list_are_closed_at_once(tmp_path: Path, tiny_model: Path) -> None:
    """16 connections from a host not on the list (127.0.0.2) hold nothing, not even a thread."""
    env = {"OSTEOGATE_DICOM_ALLOWED_HOSTS": "127.0.0.1/32", "OSTEOGATE_DICOM_MAX_ASSOCIATIONS": "2"}
    with GatewayProcess(tmp_path / "gw", model=tiny_model, env=env) as gw:
        strangers = []
        for _ in range(16):
            s = socket.socket()
            s.bind(("127.0.0.2", 0))
            s.connect(("127.0.0.1", gw.port))
            strangers.append(s)
        try:
            assert all(_closed_within(s, 1) for s in strangers)
            assert _echo(gw.port)[0] and _echo(gw.port)[0]
        finally:
            for s in strangers:
                s.close()
        refused = [e for e in gw.events() if e.get("event") == "connection_refused"]
    # Logged, hashed, and rate-limited (one line, then a count of what was held back).
    assert refused and all("127.0.0.2" not in str(e) for e in refused)
    assert len(refused) < 16


def test_rejections_are_logged_and_reported_in_words(tmp_path: Path, tiny_model: Path) -> None:
    with GatewayProcess(tmp_path / "gw", model=tiny_model,
                        env={"OSTEOGATE_DICOM_ALLOWED_CALLING_AETS": "GOODMOD"}) as gw:
        result = subprocess.run([sys.executable, "-m", "osteogate.gateway.operate.cli", "echo", f"WRONG@127.0.0.1:{gw.port}",
                                 "--calling-aet", "GOODMOD"], capture_output=True, text=True, timeout=60)
        assert result.returncode == 69  # EX_UNAVAILABLE
        assert "rejected permanently by the called AE: called AE title not recognised" in result.stderr
        result = subprocess.run([sys.executable, "-m", "osteogate.gateway.operate.cli", "echo", f"OSTEOGATE@127.0.0.1:{gw.port}",
                                 "--calling-aet", "STRANGER"], capture_output=True, text=True, timeout=60)
        assert "calling AE title not recognised" in result.stderr
        reasons = wait_until(lambda: [e["reason"] for e in gw.events() if e.get("event") == "association_rejected"]
                             if len([e for e in gw.events() if e.get("event") == "association_rejected"]) >= 2
                             else [], 10)
    assert reasons == ["rejected permanently by the called AE: called AE title not recognised",
                       "rejected permanently by the called AE: calling AE title not recognised"]
    unresolvable = subprocess.run([sys.executable, "-m", "osteogate.gateway.operate.cli", "echo", "PACS@no-such-host.invalid:104"],
                                  capture_output=True, text=True, timeout=60)
    assert unresolvable.returncode == 69 and "cannot be resolved" in unresolvable.stderr
    assert "Traceback" not in unresolvable.stderr


def test_idle_socket_does_not_block_the_tls_listener(tmp_path: Path, tiny_model: Path, pki: Path) -> None:
    """The TLS handshake runs in the connection's thread: a socket that never starts it delays
    nobody (it used to block the accept loop, for every host, for minutes) and is closed after
    dicom.handshake_timeout_seconds (default 5)."""
    config = tmp_path / "gw.toml"
    config.write_text(
        "[dicom.tls]\nenabled = true\n"
        f'cert_file = "{pki / "server.pem"}"\nkey_file = "{pki / "server.key"}"\nca_file = "{pki / "ca.pem"}"\n')
    with GatewayProcess(tmp_path / "gw", model=tiny_model, env={"OSTEOGATE_CONFIG": str(config)}) as gw:
        idle = [socket.create_connection(("127.0.0.1", gw.port), timeout=10) for _ in range(3)]
        try:
            opened = time.monotonic()
            started = time.monotonic()
            assert _echo(gw.port, tls=_client_context(pki))[0]
            echo_seconds = time.monotonic() - started
            assert all(_closed_within(s, 9) for s in idle)
            closed_after = time.monotonic() - opened
        finally:
            for s in idle:
                s.close()
        events = gw.events()
    print(f"TLS echo with 3 idle sockets open: {echo_seconds:.2f} s; idle sockets closed after {closed_after:.1f} s")
    assert echo_seconds < 2
    assert 4 <= closed_after <= 9
    assert any(e.get("event") == "connection_closed" and "no TLS handshake within 5 s" in e["reason"] for e in events)
