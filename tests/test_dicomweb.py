"""DICOMweb STOW-RS delivery (gateway/deliver/stow.py) against a real Orthanc with its DICOMweb plugin.

Orthanc runs as a process on loopback ports with the Debian orthanc-dicomweb plugin; requests go
over real HTTP(S). The decision rules (which HTTP answers are permanent) and the destination
configuration also get plain unit tests. Two peers that Orthanc cannot play are small real HTTP
servers on loopback: one that accepts a connection and never answers (a hung server: timeout),
one that answers 503/429 as a proxy in front of a PACS under maintenance does.
"""

from __future__ import annotations

import http.server
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
from osteogate.gateway.core.config import ConfigError, Destination, load_settings
from osteogate.gateway.deliver.delivery import DeliveryManager
from osteogate.gateway.deliver.stow import (
    base_url,
    check_stow,
    failure_is_transient,
    failure_reason_text,
    http_status_is_permanent,
    make_client,
    send_files,
    store,
)
from osteogate.gateway.operate.preflight import ClassifierCache
from osteogate.gateway.receive.ingest import Ingestor
from osteogate.gateway.receive.tracker import StudyTracker
from osteogate.gateway.report.publisher import ReportPublisher
from osteogate.gateway.store.db import Database, Delivery, DeliveryStatus, Job, JobStatus, Study
from osteogate.gateway.store.spool import Spool
from osteogate.gateway.work.worker import ClassifierWorker
from sqlalchemy import select

from tests.gateway_harness import GatewayProcess
from tests.helpers import (
    OrthancServer,
    dicomweb_plugin,
    free_port,
    orthanc_binary,
    sample_file,
    storescu,
    wait_until,
)
from tests.helpers.tls_proxy import TlsProxy

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "deploy" / "osteogate.example.toml"
SR_MODALITY = "SR"

_skip_without_orthanc_dicomweb = pytest.mark.skipif(
    orthanc_binary() is None or dicomweb_plugin() is None,
    reason="Orthanc with the DICOMweb plugin (Debian packages orthanc, orthanc-dicomweb) not installed",
)


def needs_orthanc_dicomweb(test: Callable[..., None]) -> Callable[..., None]:
    """Marks a test that talks to a real Orthanc with its DICOMweb plugin."""
    return pytest.mark.orthanc(_skip_without_orthanc_dicomweb(test))


# -- decision rules (pure) ----------------------------------------------------------------------


@pytest.mark.parametrize(("status", "permanent"), [
    (400, True), (401, True), (403, True), (404, True), (409, True), (413, True), (415, True),
    (408, False), (429, False), (500, False), (502, False), (503, False), (504, False),
    (301, True),  # a redirect that was not followed: the URL is wrong
])
def test_http_status_classification(status: int, permanent: bool) -> None:
    assert http_status_is_permanent(status) is permanent


def test_failure_reasons_read_as_c_store_statuses() -> None:
    assert failure_reason_text(0xA700).startswith("0xA700 (")
    assert "Out of Resources" in failure_reason_text(0xA7FE)
    assert "Processing Failure" in failure_reason_text(0x0110)
    assert failure_reason_text(0x0122).startswith("0x0122 (")
    assert failure_is_transient(0xA700) and failure_is_transient(0xA7FE)
    assert not failure_is_transient(0x0110) and not failure_is_transient(0xC000)
    assert not failure_is_transient(0xA900)


# -- destination configuration --------------------------------------------------------------------


def test_destination_url_form_and_string_form_side_by_side() -> None:
    settings = load_settings(environ={
        "OSTEOGATE_DELIVERY_DESTINATIONS": "PACS@10.0.0.5:104,https://pacs.example.org/dicom-web/studies/",
    })
    dimse, web = settings.delivery.destinations
    assert (dimse.kind, str(dimse), dimse.name) == ("dimse", "PACS@10.0.0.5:104", "PACS")
    assert (web.kind, str(web)) == ("dicomweb", "https://pacs.example.org/dicom-web/studies")
    assert web.tls_verify is True  # verification is on unless switched off
    assert base_url(web) == "https://pacs.example.org/dicom-web"
    assert Destination.parse("PACS@h:104+tls").tls
    # JSON in the environment takes tables too.
    settings = load_settings(environ={
        "OSTEOGATE_DELIVERY_DESTINATIONS": '[{"url": "http://h:8042/dicom-web/studies", "token": "t0k"}, "A@b:1"]'})
    assert [d.kind for d in settings.delivery.destinations] == ["dicomweb", "dimse"]


def test_destination_tables_in_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "pacs-password"
    secret.write_text("s3cret\n")
    monkeypatch.setenv("PACS_TOKEN", "tok")
    config = tmp_path / "osteogate.toml"
    config.write_text(f"""
[[delivery.destinations]]
ae_title = "PACS"
host = "10.0.0.5"
port = 104

[[delivery.destinations]]
url = "https://pacs.example.org/dicom-web/studies"
username = "osteogate"
password_file = "{secret}"
ca_file = "{secret}"

[[delivery.destinations]]
url = "http://archive:8080/dcm4chee-arc/aets/DCM4CHEE/rs/studies"
token_env = "PACS_TOKEN"
tls_verify = false
""")
    settings = load_settings(config, environ={})
    dimse, basic, bearer = settings.delivery.destinations
    assert str(dimse) == "PACS@10.0.0.5:104"
    assert basic.username == "osteogate" and basic.password_file == secret
    assert bearer.token_env == "PACS_TOKEN" and bearer.tls_verify is False
    # A delivery row holds str(destination): resolving it finds the configured credentials again.
    assert settings.delivery.resolve(str(basic)) is basic
    assert settings.delivery.resolve("http://elsewhere/dicom-web/studies").username is None
    assert settings.delivery.resolve("PACS@10.0.0.5:104") is dimse


@pytest.mark.parametrize(("entry", "message"), [
    ({"url": "ftp://h/x"}, "http:// or https://"),
    ({"url": "http://user:pw@h/dicom-web/studies"}, "must not contain credentials"),
    ({"url": "http://h/dicom-web/studies?x=1"}, "query"),
    ({"url": "http://h/" + "x" * 130}, "longer than 128"),
    ({"url": "http://h/studies", "ae_title": "PACS"}, "takes no ae_title"),
    ({"ae_title": "PACS", "host": "h", "port": 104, "token": "t"}, "takes no token"),
    ({"ae_title": "PACS", "host": "h"}, "needs either url"),
    ({"url": "http://h/studies", "username": "u"}, "go together"),
    ({"url": "http://h/studies", "password": "p"}, "go together"),
    ({"url": "http://h/studies", "username": "u", "password": "p", "password_env": "HOME"}, "give one of"),
    ({"url": "http://h/studies", "username": "u", "password": "p", "token": "t"}, "exclude each other"),
    ({"url": "http://h/studies", "token_file": "/nonexistent/token"}, "does not exist"),
    ({"url": "http://h/studies", "ca_file": "/nonexistent/ca.pem"}, "does not exist"),
    ({"url": "http://h/studies", "token_env": "OSTEOGATE_TEST_UNSET_VARIABLE"}, "is not set"),
    ({"url": "http://h/studies", "token_env": "NOT-A-NAME"}, "not an environment variable name"),
])
def test_bad_destinations_are_named(entry: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(environ={}, overrides={"delivery": {"destinations": [entry]}})
    text = str(info.value)
    assert "delivery.destinations.0" in text and message in text, text


def test_secrets_never_in_strings_logs_or_errors() -> None:
    destination = Destination(url="http://h/dicom-web/studies", username="u", password="hunter2")
    assert "hunter2" not in str(destination) and "hunter2" not in repr(destination)
    assert "hunter2" not in destination.name
    with pytest.raises(ConfigError) as info:  # the rejected entry is echoed, masked
        load_settings(environ={}, overrides={"delivery": {"destinations": [
            {"url": "http://h/studies", "password": "hunter2", "token": "tok3n"}]}})
    assert "hunter2" not in str(info.value) and "tok3n" not in str(info.value)


def test_example_config_documents_every_destination_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    missing = [key for key in Destination.model_fields if not re.search(rf"^#.*\b{key} = ", text, re.M)]
    assert not missing, f"destination keys not shown in {EXAMPLE.name}: {missing}"
    # Each commented [[delivery.destinations]] example is itself a valid destination (with the
    # files it names made to exist, and the variable it names set).
    blocks = text.split("# [[delivery.destinations]]\n")[1:]
    assert len(blocks) == 3
    existing = tmp_path / "secret"
    existing.write_text("x")
    monkeypatch.setenv("PACS_TOKEN", "x")
    kinds = []
    for block in blocks:
        lines = re.findall(r"^# ([a-z_]+ = .+)$", block.split("\n\n", 1)[0], re.M)
        table = tomllib.loads("\n".join(lines))
        table = {k: str(existing) if k.endswith("_file") else v for k, v in table.items()}
        kinds.append(Destination(**table).kind)
    assert kinds == ["dimse", "dicomweb", "dicomweb"]


# -- fixtures -----------------------------------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def https_pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A throwaway CA and a server certificate for 127.0.0.1 (server.crt, server.key)."""
    if not shutil.which("openssl"):
        pytest.skip("openssl not installed")
    d = tmp_path_factory.mktemp("https-pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=OsteoGate DICOMweb Test CA", cwd=d)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
             "-subj", "/CN=localhost", cwd=d)
    (d / "server.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "server.crt", "-days", "2", "-extfile", "server.ext", cwd=d)
    return d


BEARER_LUA = """
-- Orthanc has no bearer tokens of its own: this filter plays an identity-aware proxy in front
-- of the DICOMweb service (the test's own REST calls elsewhere need no token).
function IncomingHttpRequestFilter(method, uri, ip, username, httpHeaders)
   if string.sub(uri, 1, 11) == '/dicom-web/' then
      return httpHeaders['authorization'] == 'Bearer {token}'
   end
   return true
end
"""


def _orthanc(tmp_path: Path, name: str, **options: object) -> Iterator[OrthancServer]:
    if orthanc_binary() is None or dicomweb_plugin() is None:
        pytest.skip("Orthanc with the DICOMweb plugin not installed")
    server = OrthancServer(tmp_path / name, dicomweb=True, **options)  # type: ignore[arg-type]
    server.start()
    try:
        yield server
    finally:
        server.stop()


# One Orthanc per kind for the whole module (a start and stop cost seconds): the tests use
# different studies and check what they sent by its own UIDs.
@pytest.fixture(scope="module")
def web_pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    """Orthanc with DICOMweb, no authentication."""
    yield from _orthanc(tmp_path_factory.mktemp("web"), "orthanc-web")


@pytest.fixture(scope="module")
def auth_pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    """Orthanc with DICOMweb and HTTP basic authentication (user osteogate)."""
    yield from _orthanc(tmp_path_factory.mktemp("auth"), "orthanc-auth", users={"osteogate": "c0rrect-horse"})


def _stored(pacs: OrthancServer, path: Path) -> bool:
    """Whether the PACS holds the instance in this file."""
    sop_uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
    return bool(pacs.post("/tools/lookup", sop_uid.encode()))


# -- the sender against a real Orthanc -----------------------------------------------------------------


@needs_orthanc_dicomweb
def test_stow_without_auth_stores_the_files_in_their_study(web_pacs: OrthancServer) -> None:
    files = [sample_file("knee_dx.dcm"), sample_file("knee_dx_2.dcm")]
    study_uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    assert {str(pydicom.dcmread(f).StudyInstanceUID) for f in files} == {study_uid}
    outcome = send_files(files, Destination(url=web_pacs.dicomweb_url), timeout=10)
    assert outcome.ok, outcome
    assert outcome.detail == "STOW-RS stored 2 of 2 objects"
    stored = {i["MainDicomTags"]["SOPInstanceUID"] for i in web_pacs.study_instances(study_uid)}
    assert stored == {str(pydicom.dcmread(f).SOPInstanceUID) for f in files}
    # Storing again is harmless (a retry after a lost answer): still ok, nothing duplicated.
    assert send_files(files, Destination(url=web_pacs.dicomweb_url), timeout=10).ok
    assert len(web_pacs.study_instances(study_uid)) == 2


@needs_orthanc_dicomweb
def test_stow_basic_auth(tmp_path: Path, auth_pacs: OrthancServer, monkeypatch: pytest.MonkeyPatch) -> None:
    files = [sample_file("spine_cr.dcm")]
    url = auth_pacs.dicomweb_url
    password_file = tmp_path / "password"
    password_file.write_text("c0rrect-horse\n")  # an editor's newline is not part of the secret
    good = send_files(files, Destination(url=url, username="osteogate", password_file=password_file), 10)
    assert good.ok, good
    monkeypatch.setenv("OSTEOGATE_TEST_STOW_PASSWORD", "c0rrect-horse")
    assert send_files(files, Destination(url=url, username="osteogate", password_env="OSTEOGATE_TEST_STOW_PASSWORD"),
                      10).ok
    # Wrong or missing credentials: 401, permanent (retrying cannot fix a configuration).
    for destination in (Destination(url=url, username="osteogate", password="wrong"), Destination(url=url)):
        outcome = send_files(files, destination, 10)
        assert not outcome.ok and outcome.permanent, outcome
        assert outcome.detail.startswith("STOW-RS HTTP 401"), outcome.detail
    # A secret that vanished after start: permanent, with the reason, and no request made.
    monkeypatch.delenv("OSTEOGATE_TEST_STOW_PASSWORD")
    destination = Destination.model_construct(url=url, username="osteogate", password_env="OSTEOGATE_TEST_STOW_PASSWORD",
                                              tls_verify=True, password=None, password_file=None, token=None,
                                              token_file=None, token_env=None, ca_file=None)
    outcome = send_files(files, destination, 10)
    assert (outcome.ok, outcome.permanent) == (False, True)
    assert "OSTEOGATE_TEST_STOW_PASSWORD is not set" in outcome.detail


@needs_orthanc_dicomweb
def test_stow_bearer_token(tmp_path: Path) -> None:
    lua = tmp_path / "bearer.lua"
    lua.write_text(BEARER_LUA.format(token="t0ken-42"))
    token_file = tmp_path / "token"
    token_file.write_text("t0ken-42")
    for pacs in _orthanc(tmp_path, "orthanc-bearer", lua_scripts=[lua]):
        files = [sample_file("knee_dx.dcm")]
        assert send_files(files, Destination(url=pacs.dicomweb_url, token_file=token_file), 10).ok
        denied = send_files(files, Destination(url=pacs.dicomweb_url, token="wrong"), 10)
        assert not denied.ok and denied.permanent and denied.detail.startswith("STOW-RS HTTP 403"), denied


@needs_orthanc_dicomweb
def test_stow_4xx_is_permanent(web_pacs: OrthancServer) -> None:
    files = [sample_file("knee_dx.dcm")]
    wrong_path = Destination(url=web_pacs.http_url + "/no-such-dicomweb/studies")
    outcome = send_files(files, wrong_path, 10)
    assert (outcome.ok, outcome.permanent) == (False, True)
    assert outcome.detail.startswith("STOW-RS HTTP 404"), outcome.detail
    assert "Unknown resource" in outcome.detail  # Orthanc's own message is read out


@needs_orthanc_dicomweb
def test_stow_failed_sop_sequence_reason_is_read_out(web_pacs: OrthancServer) -> None:
    """The server refuses an instance (here: it is not of the study in the URL): HTTP 409 with a
    FailedSOPSequence; the outcome names the object and the failure reason, not the UID."""
    files = [sample_file("knee_dx.dcm")]
    datasets = [pydicom.dcmread(f) for f in files]
    client = make_client(Destination(url=web_pacs.dicomweb_url), timeout=10)
    outcome = store(client, datasets, study_uid="1.2.826.0.1.3680043.8.498.1")
    assert (outcome.ok, outcome.permanent) == (False, True), outcome
    assert outcome.detail.startswith("STOW-RS HTTP 409"), outcome.detail
    assert "object 1 (Digital X-Ray Image Storage - For Presentation)" in outcome.detail
    assert "0x0110 (Processing Failure)" in outcome.detail
    assert str(datasets[0].SOPInstanceUID) not in outcome.detail


def test_stow_server_down_is_transient() -> None:
    outcome = send_files([sample_file("knee_dx.dcm")], Destination(url=f"http://127.0.0.1:{free_port()}/dicom-web/studies"),
                         timeout=5)
    assert (outcome.ok, outcome.permanent) == (False, False)
    assert outcome.detail.startswith("STOW-RS connection error"), outcome.detail


class _SilentServer:
    """Accepts TCP connections and never answers: a hung server behind a load balancer."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]

    def close(self) -> None:
        self.sock.close()


def test_stow_timeout_is_transient() -> None:
    server = _SilentServer()
    try:
        started = time.monotonic()
        outcome = send_files([sample_file("knee_dx.dcm")],
                             Destination(url=f"http://127.0.0.1:{server.port}/dicom-web/studies"), timeout=1)
        assert time.monotonic() - started < 10
    finally:
        server.close()
    assert (outcome.ok, outcome.permanent) == (False, False)
    assert outcome.detail.startswith("STOW-RS timeout"), outcome.detail


class _MaintenanceProxy(http.server.ThreadingHTTPServer):
    """Answers every request with one fixed status, as a reverse proxy in front of a PACS under
    maintenance (503) or rate limiting (429) does. Counts the requests it got."""

    def __init__(self, status: int) -> None:
        self.status = status
        self.requests = 0
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                self.rfile.read(length)
                proxy.requests += 1
                self.send_response(proxy.status)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Retry-After", "1")
                self.end_headers()
                self.wfile.write(b"PACS under maintenance")

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.shutdown()
        self.server_close()


@pytest.mark.parametrize("status", [503, 429, 408, 500])
def test_stow_5xx_408_429_are_transient_and_not_retried_inside_the_call(status: int) -> None:
    proxy = _MaintenanceProxy(status)
    try:
        outcome = send_files([sample_file("knee_dx.dcm")],
                             Destination(url=f"http://127.0.0.1:{proxy.server_address[1]}/dicom-web/studies"), 5)
    finally:
        proxy.close()
    assert (outcome.ok, outcome.permanent) == (False, False), outcome
    assert outcome.detail.startswith(f"STOW-RS HTTP {status}"), outcome.detail
    assert "PACS under maintenance" in outcome.detail
    # One request: backoff between attempts belongs to the delivery queue (it survives restarts).
    assert proxy.requests == 1


@needs_orthanc_dicomweb
def test_stow_https_verifies_the_server(https_pki: Path, web_pacs: OrthancServer) -> None:
    files = [sample_file("knee_mono1.dcm")]
    with TlsProxy(web_pacs.http_port, https_pki / "server.crt", https_pki / "server.key") as proxy:
        url = f"{proxy.url}/dicom-web/studies"
        # Verification is on by default: a certificate from an unknown CA is a (transient) TLS error.
        unknown_ca = send_files(files, Destination(url=url), 10)
        assert (unknown_ca.ok, unknown_ca.permanent) == (False, False)
        assert unknown_ca.detail.startswith("STOW-RS TLS error"), unknown_ca.detail
        assert "certificate verify failed" in unknown_ca.detail
        wait_until(lambda: proxy.handshake_failures == 1, 5)  # the proxy's thread sees it a little later
        assert not _stored(web_pacs, files[0])
        trusted = send_files(files, Destination(url=url, ca_file=https_pki / "ca.pem"), 10)
        assert trusted.ok, trusted
        assert _stored(web_pacs, files[0])
        assert send_files(files, Destination(url=url, tls_verify=False), 10).ok


# -- through the delivery queue (worker -> SR -> DeliveryManager -> STOW) -------------------------------


class _Store:
    """An in-process gateway store: ingest, classify with the tiny model, run deliveries."""

    def __init__(self, root: Path, model: Path) -> None:
        self.root = root
        self.data_dir = root / "gw"
        self.data_dir.mkdir(parents=True)
        self.db = Database(f"sqlite:///{self.data_dir / 'osteogate.db'}")
        self.db.migrate()
        self.spool = Spool(self.data_dir / "spool")
        self.reports = Spool(self.data_dir / "reports")
        self.model = model

    def settings(self, destinations: list[object]):  # noqa: ANN201
        return load_settings(environ={}, overrides={
            "storage": {"data_dir": str(self.data_dir), "min_free_mb": 0},
            "model": {"path": str(self.model)},
            "delivery": {"destinations": destinations, "timeout_seconds": 5, "retry_base_seconds": 60},
        })

    def classify(self, files: list[Path], destinations: list[object]) -> str:
        ingestor = Ingestor(self.db, self.spool)
        for path in files:
            ingestor.store(path.read_bytes(), calling_ae="TEST")
        study_uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
        StudyTracker(self.db, 0).queue_stable_studies()
        with self.db.session() as session:
            job_id = session.execute(select(Job.id).join(Study).where(
                Study.study_uid == study_uid, Job.status == JobStatus.PENDING)).scalar_one()
        settings = self.settings(destinations)
        worker = ClassifierWorker(settings, self.db, self.spool, ReportPublisher(settings, self.reports), ClassifierCache(settings))
        assert worker.run_once(only=[job_id])
        return study_uid

    def deliveries(self) -> list[tuple[str, DeliveryStatus, int, str | None]]:
        with self.db.session() as session:
            return [(d.destination, d.status, d.attempts, d.last_error)
                    for d in session.scalars(select(Delivery).order_by(Delivery.id))]


@needs_orthanc_dicomweb
def test_delivery_queue_sends_the_sr_by_stow_with_auth(tmp_path: Path, auth_pacs: OrthancServer,
                                                       tiny_model: Path) -> None:
    password_file = tmp_path / "pacs-password"
    password_file.write_text("c0rrect-horse")
    good = {"url": auth_pacs.dicomweb_url, "username": "osteogate", "password_file": str(password_file)}
    store = _Store(tmp_path, tiny_model)
    source = sample_file("knee_dx.dcm")
    auth_pacs.upload(source)  # the PACS already holds the images, as it would
    study_uid = store.classify([source], [good])
    settings = store.settings([good])
    assert DeliveryManager(settings, store.db, store.reports).run_due() == 1
    [(destination, status, attempts, error)] = store.deliveries()
    assert (destination, status, attempts, error) == (auth_pacs.dicomweb_url, DeliveryStatus.SENT, 1, None)
    instances = auth_pacs.study_instances(study_uid)
    # The image series, and ours in the same study (the result card, once made, travels along).
    assert len({i["ParentSeries"] for i in instances}) >= 2
    [sr] = [i for i in instances if auth_pacs.instance_tags(i["ID"]).get("Modality") == SR_MODALITY]
    tags = auth_pacs.instance_tags(sr["ID"])
    assert tags["StudyInstanceUID"] == study_uid
    assert tags["SOPClassUID"] == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR


@needs_orthanc_dicomweb
def test_delivery_queue_marks_a_4xx_rejected_and_retries_a_down_server(tmp_path: Path, auth_pacs: OrthancServer,
                                                                       tiny_model: Path) -> None:
    down_url = f"http://127.0.0.1:{free_port()}/dicom-web/studies"
    wrong = {"url": auth_pacs.dicomweb_url, "username": "osteogate", "password": "wrong"}
    store = _Store(tmp_path, tiny_model)
    study_uid = store.classify([sample_file("knee_j2k.dcm")], [wrong, down_url])
    settings = store.settings([wrong, down_url])
    assert DeliveryManager(settings, store.db, store.reports).run_due() == 0
    rejected, pending = store.deliveries()
    assert rejected[:3] == (auth_pacs.dicomweb_url, DeliveryStatus.REJECTED, 1)
    assert rejected[3] is not None and rejected[3].startswith("STOW-RS HTTP 401")
    assert pending[:3] == (down_url, DeliveryStatus.PENDING, 1)  # due again after the backoff
    assert pending[3] is not None and pending[3].startswith("STOW-RS connection error")
    assert auth_pacs.study_instances(study_uid) == []


@needs_orthanc_dicomweb
def test_serve_delivers_by_dicomweb_after_the_pacs_comes_up(tmp_path: Path, tiny_model: Path) -> None:
    """`osteogate serve` with a [[delivery.destinations]] table (url, username, password_env):
    the PACS is down when the SR is ready (transient: retried with backoff), then comes up; the SR
    lands in the study the PACS already holds."""
    pacs = OrthancServer(tmp_path / "orthanc", dicomweb=True, users={"osteogate": "c0rrect-horse"})
    config = tmp_path / "osteogate.toml"
    config.write_text(f"""
[[delivery.destinations]]
url = "{pacs.dicomweb_url}"
username = "osteogate"
password_env = "PACS_PASSWORD"
""")
    source = sample_file("knee_dx.dcm")
    study_uid = str(pydicom.dcmread(source).StudyInstanceUID)
    env = {"OSTEOGATE_CONFIG": str(config), "PACS_PASSWORD": "c0rrect-horse"}
    with GatewayProcess(tmp_path / "gw", model=tiny_model, env=env) as gw:
        assert storescu([source], "127.0.0.1", gw.port, gw.ae_title).returncode == 0
        wait_until(lambda: any(e.get("event") == "sr_delivery_retry" for e in gw.events()), 90, interval=0.5)
        retry = next(e for e in gw.events() if e.get("event") == "sr_delivery_retry")
        assert retry["destination"] == pacs.dicomweb_url.split("://", 1)[1]
        assert "connection error" in retry["detail"]
        pacs.start()
        try:
            pacs.upload(source)
            wait_until(lambda: any(e.get("event") == "sr_delivered" for e in gw.events()), 90, interval=0.5)
            instances = pacs.study_instances(study_uid)
            tags = [pacs.instance_tags(i["ID"]) for i in instances]
            assert [t["Modality"] for t in tags].count("DX") == 1  # the image the PACS holds
            [sr] = [t for t in tags if t["Modality"] == SR_MODALITY]
            assert sr["Manufacturer"] == "OsteoGate" and sr["StudyInstanceUID"] == study_uid
            assert "c0rrect-horse" not in gw.log()
        finally:
            pacs.stop()


@needs_orthanc_dicomweb
def test_selfcheck_asks_a_dicomweb_destination(tmp_path: Path, auth_pacs: OrthancServer) -> None:
    from osteogate.gateway.operate.selfcheck import run_selfcheck

    good = {"url": auth_pacs.dicomweb_url, "username": "osteogate", "password": "c0rrect-horse"}
    wrong = {"url": auth_pacs.dicomweb_url, "username": "osteogate", "password": "wrong"}
    down = f"http://127.0.0.1:{free_port()}/dicom-web/studies"
    settings = load_settings(environ={}, overrides={
        "storage": {"data_dir": str(tmp_path / "gw"), "min_free_mb": 0},
        "delivery": {"destinations": [good, down], "timeout_seconds": 3},
    })
    settings.storage.data_dir.mkdir(parents=True)
    db = Database(settings.storage.resolved_database_url())
    db.migrate()
    findings = {f.check: f for f in run_selfcheck(settings, db)}
    ok = findings[f"dicomweb {auth_pacs.dicomweb_url}"]
    assert ok.ok and ok.detail == "DICOMweb service answers (QIDO-RS)", ok
    unreachable = findings[f"dicomweb {down}"]
    assert not unreachable.ok and unreachable.detail.startswith("unreachable"), unreachable
    settings = load_settings(environ={}, overrides={
        "storage": {"data_dir": str(tmp_path / "gw"), "min_free_mb": 0},
        "delivery": {"destinations": [wrong], "timeout_seconds": 3},
    })
    [denied] = [f for f in run_selfcheck(settings, db) if f.check.startswith("dicomweb")]
    assert not denied.ok and denied.detail == "HTTP 401 on QIDO-RS search (check credentials)", denied


def _osteogate(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OSTEOGATE_")}
    env |= {"OMP_NUM_THREADS": "1", "OSTEOGATE_STORAGE_MIN_FREE_MB": "0"}
    return subprocess.run([sys.executable, "-m", "osteogate.gateway.operate.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


@needs_orthanc_dicomweb
def test_resend_to_a_url_from_the_command_line(tmp_path: Path, web_pacs: OrthancServer, tiny_model: Path) -> None:
    store = _Store(tmp_path, tiny_model)
    study_uid = store.classify([sample_file("spine_cr.dcm")], [])  # no destination configured
    result = _osteogate("resend", study_uid, "--to", web_pacs.dicomweb_url, "--data-dir", str(store.data_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"-> {web_pacs.dicomweb_url}: sent" in result.stdout
    modalities = sorted(web_pacs.instance_tags(i["ID"])["Modality"] for i in web_pacs.study_instances(study_uid))
    assert modalities == sorted([SR_MODALITY, "OT"])  # the SR and the result card (Secondary Capture)


def test_dimse_only_commands_refuse_a_url() -> None:
    result = _osteogate("echo", "http://127.0.0.1:8042/dicom-web/studies")
    assert result.returncode == 64  # EX_USAGE
    assert "this command needs AET@HOST:PORT (a DICOM peer), not a URL" in result.stderr
    assert "Traceback" not in result.stderr


# -- hostile DICOMweb destinations: redirects, HTML error pages, endless answers -------------------


class _HostileServer(http.server.ThreadingHTTPServer):
    """A STOW-RS endpoint that misbehaves one way: ``redirect`` (307 to ``location``), ``html``
    (a proxy's 502 page), ``endless`` (200, a chunked body that never ends, a little at a time),
    ``huge`` (200, 64 MB of JSON-looking bytes as fast as the socket takes them). Counts requests."""

    daemon_threads = True

    def __init__(self, mode: str, location: str = "") -> None:
        self.mode, self.location, self.requests = mode, location, 0
        self.stop = threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                server.requests += 1
                getattr(self, f"_{server.mode}")()

            do_GET = do_POST  # the self-check's QIDO-RS search meets the same server

            def _redirect(self) -> None:
                self.send_response(307)
                self.send_header("Location", server.location)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def _html(self) -> None:
                page = (b"<!DOCTYPE html>\n<html><head><style>body{color:red}</style>\n<title>502 Bad Gateway"
                        b"</title></head>\n<body><h1>Bad Gateway</h1>\n<p>The proxy server received an invalid"
                        b"\nresponse from an upstream server.</p>" + b"<p>padding</p>\n" * 500 + b"</body></html>")
                self.send_response(502)
                self.send_header("Content-Type", "text/html; charset=iso-8859-1")
                self.send_header("Content-Length", str(len(page)))
                self.end_headers()
                self.wfile.write(page)

            def _endless(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                while not server.stop.is_set():
                    try:
                        self.wfile.write(b"1\r\n \r\n")
                        self.wfile.flush()
                    except OSError:
                        return
                    server.stop.wait(0.2)

            def _huge(self) -> None:
                size = 64 * 2**20
                self.send_response(200)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(size))
                self.end_headers()
                block = b" " * 2**16
                try:
                    for _ in range(size // len(block)):
                        self.wfile.write(block)
                except OSError:
                    return

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}/dicom-web/studies"
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.stop.set()
        self.shutdown()
        self.server_close()


def _send_to(server: _HostileServer, timeout: float = 5) -> tuple[object, float]:
    started = time.monotonic()
    outcome = send_files([sample_file("knee_dx.dcm")], Destination(url=server.url), timeout)
    return outcome, time.monotonic() - started


def test_stow_redirect_is_never_followed_and_is_reported() -> None:
    """A 307 re-POSTs the body (patient data, and the credentials) wherever it points: the
    gateway follows no redirect, names only the host it pointed to, and an admin fixes the URL."""
    elsewhere = _HostileServer("html")
    redirecting = _HostileServer("redirect", location=elsewhere.url.replace("127.0.0.1", "localhost")
                                 + "/1.2.826.0.1.3680043.2.1125.1")
    try:
        outcome, _ = _send_to(redirecting)
    finally:
        redirecting.close()
        elsewhere.close()
    assert (outcome.ok, outcome.permanent) == (False, True), outcome  # type: ignore[attr-defined]
    detail = outcome.detail  # type: ignore[attr-defined]
    assert detail.startswith("STOW-RS HTTP 307") and "redirect to http://localhost not followed" in detail, detail
    assert "1.2.826" not in detail and elsewhere.requests == 0 and redirecting.requests == 1


def test_selfcheck_of_a_redirecting_destination_follows_nothing_and_says_qido() -> None:
    elsewhere = _HostileServer("html")
    redirecting = _HostileServer("redirect", location=elsewhere.url.replace("127.0.0.1", "localhost"))
    try:
        ok, detail = check_stow(Destination(url=redirecting.url), 5)
    finally:
        redirecting.close()
        elsewhere.close()
    assert not ok and elsewhere.requests == 0 and redirecting.requests == 1
    assert detail.startswith("QIDO-RS search: HTTP 307") and "not followed" in detail, detail


def test_stow_html_error_page_is_one_line() -> None:
    server = _HostileServer("html")
    try:
        outcome, _ = _send_to(server)
    finally:
        server.close()
    assert (outcome.ok, outcome.permanent) == (False, False), outcome  # type: ignore[attr-defined]
    assert outcome.detail == "STOW-RS HTTP 502 Bad Gateway: 502 Bad Gateway", outcome  # type: ignore[attr-defined]


@pytest.mark.parametrize("mode", ["endless", "huge"])
def test_stow_endless_or_huge_answer_is_cut_by_time_and_size(mode: str) -> None:
    server = _HostileServer(mode)
    try:
        outcome, took = _send_to(server, timeout=2)
    finally:
        server.close()
    assert (outcome.ok, outcome.permanent) == (False, False), outcome  # type: ignore[attr-defined]
    assert "cut off" in outcome.detail and took < 15, (outcome, took)  # type: ignore[attr-defined]
    assert ("within 2 s" if mode == "endless" else "larger than 4 MB") in outcome.detail  # type: ignore[attr-defined]
