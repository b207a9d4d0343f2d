"""The gateway's DICOM listener: Storage SCP (CR/DX/SC stored; every other standard storage SOP
class acknowledged) plus Verification.

Handlers are bound to pynetdicom events; the C-STORE handler returns only after the instance is
on disk and in SQL (see gateway.receive.ingest). Around pynetdicom's threaded server, three things bound
what one peer can cost everyone else:

* **Connections** (``AssociationListener``): a host not on ``dicom.allowed_hosts`` is closed in
  the accept loop, at once, and logged; the TLS handshake runs in the connection's own thread,
  never in the accept loop, and a connection that has not completed it *and* sent its
  A-ASSOCIATE-RQ within ``dicom.handshake_timeout_seconds`` is closed. Connections still waiting
  to associate do not hold association slots (``dicom.max_associations`` counts associations
  that have been requested); they are capped per host instead.
* **Memory** (``StreamingSocket``): PDUs are read with a size limit, and the data set of each
  C-STORE is written to a file in the spool's incoming folder as it arrives, never buffered
  whole; once it passes ``dicom.max_instance_mb`` the rest is read and dropped, and the
  C-STORE is answered 0xA700 with the reason.
* **Time**: every socket read and write has a timeout (``dicom.network_timeout_seconds``).
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import socketserver
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any, BinaryIO

from osteogate.gateway.core.config import DicomConfig
from osteogate.gateway.core.dicomnet import client_tls_context, describe_rejection, server_tls_context
from osteogate.gateway.core.logs import get_logger, hashed
from osteogate.gateway.core.metrics import (
    CONNECTIONS_REFUSED,
    INSTANCES_NOT_STORED,
    INSTANCES_RECEIVED,
    INSTANCES_REFUSED,
    ae_label,
)
from osteogate.gateway.core.uids import is_valid_uid
from osteogate.gateway.receive.ingest import (
    ACCEPTED_SOP_CLASSES,
    CANNOT_UNDERSTAND,
    OUT_OF_RESOURCES,
    OUT_OF_SCOPE_SOP_CLASSES,
    Ingestor,
    RejectedInstance,
)
from osteogate.gateway.store.spool import Spool, SpoolError
from pydicom.dataset import Dataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.dsutils import create_file_meta, decode
from pynetdicom.sop_class import Verification
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

__all__ = ["TRANSFER_SYNTAXES", "StorageSCP", "client_tls_context", "server_tls_context"]

log = get_logger("osteogate.gateway.receive.scp")

TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
]

# We announce pynetdicom's default maximum PDU length (16382 bytes); a peer must not send PDUs
# longer than that. Tolerate up to 1 MiB (some senders round up), and treat anything longer as
# the protocol violation it is: without a limit one PDU header could make us allocate 4 GiB.
MAX_PDU_BYTES = 1 << 20
# A command set is a few hundred bytes; data sets other than a C-STORE's (which we never serve)
# are passed to pynetdicom, so they are capped too.
MAX_COMMAND_BYTES = 1 << 16
MAX_OTHER_DATASET_BYTES = 1 << 20
C_STORE_RQ = 0x0001
NO_DATASET = 0x0101


# -- streaming receive -----------------------------------------------------------------------------------


@dataclass
class Received:
    """The data set of one C-STORE request, as written to the spool's incoming folder."""

    message_id: int | None
    path: Path | None = None
    size: int = 0
    seen: int = 0
    refusal: tuple[int, str] | None = None
    _handle: BinaryIO | None = field(default=None, repr=False)

    def refuse(self, status: int, reason: str) -> None:
        if self.refusal is None:
            self.refusal = (status, reason)
        self.discard()

    def discard(self) -> None:
        if self._handle is not None:
            with contextlib.suppress(OSError):
                self._handle.close()
            self._handle = None
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None

    def finish(self) -> None:
        if self._handle is not None:
            try:
                self._handle.close()
            except OSError as exc:
                self.refuse(OUT_OF_RESOURCES, f"spool write failed: {exc.strerror or exc}")
            self._handle = None


class _Violation(Exception):
    """The peer broke the protocol in a way that ends the connection."""


class StreamingSocket(AssociationSocket):
    """pynetdicom's socket, reading PDUs with limits and streaming C-STORE data sets to disk.

    pynetdicom's DUL reads each PDU as ``recv(6)`` (type and length) then ``recv(length)``. On the
    header call this class reads the whole PDU itself (refusing one over ``MAX_PDU_BYTES``), moves
    the data set fragments of a C-STORE into a file, and hands pynetdicom the same PDU with those
    fragments emptied: pynetdicom never holds the data set, and the C-STORE handler takes the file
    with ``take(message_id)``. (Installed by ``_RequestHandler`` on the socket pynetdicom creates.)
    """

    def setup(self, spool: Spool, max_dataset_bytes: int) -> None:
        self._spool = spool
        self._max_dataset_bytes = max_dataset_bytes
        self._body: bytearray | None = None
        self._command = bytearray()
        self._other_bytes = 0
        self._current: Received | None = None
        self._received: dict[int | None, Received] = {}
        self._lock = threading.Lock()
        self.violation: str | None = None

    # -- the hook into pynetdicom's DUL ---------------------------------------------------------

    def recv(self, nr_bytes: int) -> bytearray:
        if self._body is not None:
            body, self._body = self._body, None
            return body
        data = super().recv(nr_bytes)
        if nr_bytes != 6 or len(data) != 6:
            return data
        pdu_type, reserved, length = struct.unpack(">BBL", bytes(data))
        if length > MAX_PDU_BYTES:
            return self._violate(f"PDU of {length} bytes (at most {MAX_PDU_BYTES} accepted)")
        if pdu_type != 0x04:  # not P-DATA-TF: pynetdicom reads the (bounded) body itself
            return data
        body = super().recv(length)
        if len(body) != length:
            self._body = body  # connection closed mid-PDU: pynetdicom sees the short read
            return data
        try:
            self._body = self._filter(body)
        except _Violation as exc:
            return self._violate(str(exc))
        return bytearray(struct.pack(">BBL", 0x04, reserved, len(self._body)))

    def close(self) -> None:
        with self._lock:
            pending = [r for r in [self._current, *self._received.values()] if r is not None]
            self._current = None
            self._received.clear()
        for item in pending:
            item.discard()
        super().close()

    def take(self, message_id: int | None) -> Received | None:
        """The data set received for C-STORE ``message_id`` (the handler owns it from now on)."""
        with self._lock:
            return self._received.pop(message_id, None)

    # -- PDU contents ---------------------------------------------------------------------------

    def _violate(self, reason: str) -> bytearray:
        self.violation = reason
        log.warning("connection_closed", reason=f"protocol violation: {reason}",
                    peer=hashed(str(self.assoc.requestor.address)))
        with contextlib.suppress(OSError):
            if self.socket is not None:
                self.socket.shutdown(socket.SHUT_RDWR)
        # A short header: pynetdicom treats it as the transport connection closing.
        return bytearray()

    def _filter(self, body: bytearray) -> bytearray:
        """The P-DATA-TF body with C-STORE data set fragments taken out (PS3.8 9.3.5)."""
        out = bytearray()
        pos, end = 0, len(body)
        view = memoryview(body)
        while pos < end:
            if end - pos < 6:
                raise _Violation("truncated presentation data value item")
            (item_length,) = struct.unpack_from(">L", body, pos)
            if item_length < 2 or pos + 4 + item_length > end:
                raise _Violation("presentation data value item length out of range")
            context_id, control = body[pos + 4], body[pos + 5]
            data = view[pos + 6: pos + 4 + item_length]
            pos += 4 + item_length
            if control & 0x01:
                keep: bytes | memoryview = self._on_command(data, last=bool(control & 0x02), context_id=context_id)
            else:
                keep = self._on_dataset(data, last=bool(control & 0x02))
            out += struct.pack(">L", 2 + len(keep)) + bytes((context_id, control)) + keep
        return out

    def _on_command(self, data: memoryview, *, last: bool, context_id: int) -> memoryview:
        self._command += data
        if len(self._command) > MAX_COMMAND_BYTES:
            raise _Violation(f"command set over {MAX_COMMAND_BYTES} bytes")
        if last:
            encoded, self._command = bytes(self._command), bytearray()
            try:
                command = decode(BytesIO(encoded), True, True)
                field_, message_id = int(command.CommandField), int(command.MessageID)
                has_dataset = int(command.CommandDataSetType) != NO_DATASET
            except Exception:  # noqa: BLE001 - pynetdicom will reject the same bytes in its turn
                return data
            if field_ == C_STORE_RQ and has_dataset:
                self._begin(message_id, context_id, command)
        return data

    def _begin(self, message_id: int, context_id: int, command: Dataset) -> None:
        received = Received(message_id)
        self._current = received
        sop_class = str(command.get("AffectedSOPClassUID", "")).strip("\x00 ")
        sop_instance = str(command.get("AffectedSOPInstanceUID", "")).strip("\x00 ")
        syntax = next((cx.transfer_syntax[0] for cx in self.assoc.accepted_contexts
                       if cx.context_id == context_id), None)
        if not (is_valid_uid(sop_class) and is_valid_uid(sop_instance)):
            received.refuse(0xA900, "Affected SOP Class/Instance UID invalid")
            return
        if syntax is None:
            received.refuse(CANNOT_UNDERSTAND, "no accepted presentation context for the data set")
            return
        try:
            handle, path = self._spool.new_incoming()
            received._handle, received.path = handle, path
            handle.write(b"\x00" * 128 + b"DICM")
            write_file_meta_info(handle, create_file_meta(sop_class_uid=sop_class, sop_instance_uid=sop_instance,
                                                          transfer_syntax=syntax))
        except (OSError, SpoolError) as exc:
            received.refuse(OUT_OF_RESOURCES, f"spool write failed: {exc.strerror or exc}")

    def _on_dataset(self, data: memoryview, *, last: bool) -> bytes | memoryview:
        received = self._current
        if received is None:
            # Not a C-STORE (a service we do not offer): pynetdicom answers it; keep it small.
            self._other_bytes = 0 if last else self._other_bytes + len(data)
            if self._other_bytes > MAX_OTHER_DATASET_BYTES:
                raise _Violation("data set of an unsupported request is too large")
            return data
        received.seen += len(data)
        if received.refusal is None:
            if received.size + len(data) > self._max_dataset_bytes:
                received.refuse(OUT_OF_RESOURCES,
                                f"instance larger than dicom.max_instance_mb ({self._max_dataset_bytes // 2**20} MB)")
            else:
                try:
                    assert received._handle is not None
                    received._handle.write(data)
                    received.size += len(data)
                except OSError as exc:
                    received.refuse(OUT_OF_RESOURCES, f"spool write failed: {exc.strerror or exc}")
        if last:
            received.finish()
            with self._lock:
                self._received[received.message_id] = received
                self._current = None
        return b""


# -- connections -------------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Connection:
    host: str
    opened: float = field(default_factory=time.monotonic)
    assoc: Association | None = None
    requested: bool = False
    closed: bool = False

    def alive(self) -> bool:
        if self.closed:
            return False
        if self.assoc is None:
            return True  # TLS handshake or association set-up under way
        return self.assoc.ident is None or self.assoc.is_alive()

    def waiting(self) -> bool:
        """Connected but no A-ASSOCIATE-RQ yet: holds a thread, not an association slot."""
        return not self.requested and self.alive()


class _RateLimited:
    """At most one log line per key and interval; how many were held back is said next time."""

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self._last: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()

    def __call__(self, key: str) -> int | None:
        """None: stay quiet; else the number of suppressed lines since the last one logged."""
        now = time.monotonic()
        with self._lock:
            last, suppressed = self._last.get(key, (0.0, 0))
            if now - last < self.interval:
                self._last[key] = (last, suppressed + 1)
                return None
            self._last[key] = (now, 0)
            if len(self._last) > 4096:  # a scan from many addresses must not grow this forever
                self._last = {k: v for k, v in self._last.items() if now - v[0] < self.interval}
            return suppressed


class _SharedContexts(list):  # type: ignore[type-arg]
    """The supported presentation contexts, shared by every association instead of deep-copied.

    pynetdicom deep-copies them for each new association in case a handler changes them; nothing
    here does, and negotiation only reads them. With 170 storage SOP classes x 13 transfer
    syntaxes the copy costs ~30 ms of CPU per association, which 20 modalities connecting at
    once would pay in the receive path.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> _SharedContexts:
        return self


class _RequestHandler(RequestHandler):
    """pynetdicom's handler, with our socket class and the connection record attached."""

    server: AssociationListener

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        sock = assoc.dul.socket
        # pynetdicom created the socket (and queued its "connection open" event); give it our
        # receive path without creating a second one.
        sock.__class__ = StreamingSocket
        sock.setup(self.server.spool, self.server.max_dataset_bytes)
        conn = self.server.handoff(self.request)
        conn.assoc = assoc
        assoc.osteogate_connection = conn  # type: ignore[attr-defined]
        # What is left of the handshake timeout is what the peer has to send its A-ASSOCIATE-RQ.
        assoc.acse_timeout = max(0.5, self.server.handshake_timeout - (time.monotonic() - conn.opened))
        return assoc


class AssociationListener(ThreadedAssociationServer):
    """pynetdicom's threaded server with a fast accept loop: allow-list and per-host caps are
    checked there; TLS and everything else happen in the connection's thread."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, *args: Any, gate: StorageSCP, tls: ssl.SSLContext | None, **kwargs: Any) -> None:
        self.gate = gate
        self.tls = tls
        self.spool = gate.ingestor.spool
        self.max_dataset_bytes = gate.config.max_instance_mb * 2**20
        self.handshake_timeout = gate.config.handshake_timeout_seconds
        self.network_timeout = gate.config.network_timeout_seconds
        self.slots = gate.config.max_associations
        self.waiting_per_host = max(4, gate.config.max_associations)
        self.waiting_total = max(64, 4 * gate.config.max_associations)
        self._connections: set[_Connection] = set()
        self._handoffs: dict[int, _Connection] = {}
        self._lock = threading.Lock()
        self._quiet = _RateLimited()
        super().__init__(*args, request_handler=_RequestHandler, **kwargs)
        self.contexts = _SharedContexts(self.contexts)

    # -- accept loop (must stay fast: nothing here waits on the peer) ------------------------------

    def verify_request(self, request: Any, client_address: Any) -> bool:
        host = str(client_address[0])
        if not self.gate.host_allowed(host):
            self._refused(host, "host_not_allowed", "source host not on dicom.allowed_hosts")
            return False
        with self._lock:
            self._connections = {c for c in self._connections if c.alive()}
            waiting = [c for c in self._connections if c.waiting()]
            if sum(c.host == host for c in waiting) >= self.waiting_per_host or len(waiting) >= self.waiting_total:
                over = True
            else:
                over = False
                conn = _Connection(host)
                self._connections.add(conn)
                self._handoffs[id(request)] = conn
        if over:
            self._refused(host, "too_many_waiting", "too many connections waiting to associate")
            return False
        return True

    def _refused(self, host: str, kind: str, reason: str) -> None:
        CONNECTIONS_REFUSED.labels(reason=kind).inc()
        suppressed = self._quiet(f"{kind}:{host}")
        if suppressed is not None:
            log.warning("connection_refused", reason=reason, peer=hashed(host),
                        **({"suppressed": suppressed} if suppressed else {}))

    def handoff(self, request: Any) -> _Connection:
        with self._lock:
            conn = self._handoffs.pop(id(request), None)
        return conn or _Connection("unknown")

    # -- connection thread ----------------------------------------------------------------------

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        host = str(client_address[0])
        try:
            request.settimeout(self.handshake_timeout)
            if self.tls is not None:
                request = self._tls_handshake(request, host)
                if request is None:
                    return
            # Every later read and write is bounded too: a peer that stops mid-PDU cannot hold
            # the association thread forever.
            request.settimeout(self.network_timeout)
            self.finish_request(request, client_address)
        except Exception:  # noqa: BLE001 - one bad connection must not touch the listener
            log.warning("connection_failed", peer=hashed(host))
            with self._lock:
                conn = self._handoffs.pop(id(request), None)
            if conn is not None:
                conn.closed = True
            self.shutdown_request(request)

    def _tls_handshake(self, request: socket.socket, host: str) -> ssl.SSLSocket | None:
        assert self.tls is not None
        conn_key = id(request)
        try:
            wrapped = self.tls.wrap_socket(request, server_side=True, do_handshake_on_connect=False)
            wrapped.do_handshake()
        except TimeoutError:
            self._handshake_failed(conn_key, request, host, f"no TLS handshake within {self.handshake_timeout:g} s")
            return None
        except ssl.SSLError as exc:
            self._handshake_failed(conn_key, request, host, f"TLS handshake failed: {exc.reason or type(exc).__name__}")
            return None
        except OSError:
            # What a load balancer's TCP health check does: not worth a warning.
            self._handshake_failed(conn_key, request, host, "connection closed during the TLS handshake",
                                   quiet=True)
            return None
        with self._lock:
            conn = self._handoffs.pop(conn_key, None)
            if conn is not None:
                self._handoffs[id(wrapped)] = conn
        return wrapped

    def _handshake_failed(self, key: int, request: socket.socket, host: str, reason: str,
                          quiet: bool = False) -> None:
        with self._lock:
            conn = self._handoffs.pop(key, None)
        if conn is not None:
            conn.closed = True
        CONNECTIONS_REFUSED.labels(reason="tls_handshake").inc()
        suppressed = self._quiet(f"{reason}:{host}")
        if suppressed is not None:
            (log.debug if quiet else log.warning)("connection_closed", reason=reason, peer=hashed(host),
                        **({"suppressed": suppressed} if suppressed else {}))
        with contextlib.suppress(OSError):
            request.close()

    # -- association slots ----------------------------------------------------------------------

    def claim_slot(self, assoc: Association) -> bool:
        """Called when the A-ASSOCIATE-RQ arrives: True if one of the slots is free for it."""
        conn = getattr(assoc, "osteogate_connection", None)
        with self._lock:
            busy = sum(1 for c in self._connections if c.requested and c.alive() and c is not conn)
            if busy >= self.slots:
                return False
            if conn is not None:
                conn.requested = True
        return True

    def shutdown(self) -> None:
        # Not pynetdicom's: this server was not registered with AE.start_server.
        socketserver.BaseServer.shutdown(self)
        self.server_close()


# -- the SCP ---------------------------------------------------------------------------------------------


def _status(code: int, reason: str | None = None) -> Dataset:
    """A C-STORE response status, with the reason as Error Comment (LO: 64 ASCII characters)."""
    ds = Dataset()
    ds.Status = code
    if reason:
        ds.ErrorComment = reason.encode("ascii", "replace").decode().replace("\\", "/")[:64]
    return ds


class StorageSCP:
    """Listens for associations; one thread per association (pynetdicom's threaded server)."""

    def __init__(
        self,
        config: DicomConfig,
        ingestor: Ingestor,
        *,
        on_stored: Callable[[str], None] | None = None,
        accepting: Callable[[], str | None] | None = None,
    ) -> None:
        self.config = config
        self.ingestor = ingestor
        self.on_stored = on_stored
        # Returns a reason to refuse new associations (e.g. spool disk nearly full) or None.
        self.accepting = accepting or (lambda: None)
        self._server: AssociationListener | None = None
        self._thread: threading.Thread | None = None
        self._networks = [ipaddress.ip_network(net, strict=False) for net in config.allowed_hosts]
        self.ae = self._make_ae()

    def _make_ae(self) -> AE:
        ae = AE(ae_title=self.config.ae_title)
        # Our own slot count (AssociationListener.claim_slot) applies to requested associations;
        # pynetdicom's would count connections still waiting to associate, so keep it out of the way.
        ae.maximum_associations = self.config.max_associations + max(64, 4 * self.config.max_associations) + 1
        ae.network_timeout = self.config.network_timeout_seconds
        ae.dimse_timeout = self.config.network_timeout_seconds
        # ARTIM: how long a connection may stay silent before its A-ASSOCIATE-RQ (PS3.8 9.1.5).
        ae.acse_timeout = self.config.handshake_timeout_seconds
        # Refuse associations addressed to another AE title, and callers not on the allow-list.
        ae.require_called_aet = True
        if self.config.allowed_calling_aets:
            ae.require_calling_aet = list(self.config.allowed_calling_aets)
        for sop_class in [*ACCEPTED_SOP_CLASSES, *OUT_OF_SCOPE_SOP_CLASSES]:
            ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        return ae

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.server_address[1])

    def start(self) -> None:
        # pynetdicom's own per-message log handlers format every DIMSE message (patient data at
        # debug level) and decode data sets we have already taken away: not needed, not wanted.
        _config.LOG_HANDLER_LEVEL = "none"
        handlers = [
            (evt.EVT_REQUESTED, self.handle_requested),
            (evt.EVT_C_STORE, self.handle_store),
            (evt.EVT_C_ECHO, self.handle_echo),
            (evt.EVT_ESTABLISHED, self.handle_established),
            (evt.EVT_REJECTED, self.handle_rejected),
        ]
        tls = server_tls_context(self.config.tls)
        self._server = self.ae.make_server(
            (self.config.bind, self.config.port), evt_handlers=handlers, server_class=AssociationListener,
            gate=self, tls=tls,
        )
        self._thread = threading.Thread(target=self._server.serve_forever, name="osteogate-scp-accept", daemon=True)
        self._thread.start()
        log.info("scp_listening", ae_title=self.config.ae_title, port=self.port, bind=self.config.bind,
                 tls=self.config.tls.enabled)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
            log.info("scp_stopped")

    # -- event handlers ------------------------------------------------------------------------

    def host_allowed(self, address: str) -> bool:
        if not self._networks:
            return True
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self._networks)

    def handle_requested(self, event: evt.Event) -> None:
        """Before negotiation: refuse when the spool is short of space or every slot is busy."""
        assoc = event.assoc
        reason = self.accepting()
        if reason is None and self._server is not None and not self._server.claim_slot(assoc):
            reason = f"local limit exceeded: all {self.config.max_associations} association slots busy"
        if reason is None:
            return
        # Transient "local limit exceeded": the modality keeps its images and retries later.
        assoc.acse.send_reject(0x02, 0x03, 0x02)
        log.warning("association_rejected", reason=f"rejected transiently: {reason}",
                    calling_ae=assoc.requestor.ae_title, peer=hashed(str(assoc.requestor.address)))
        assoc.kill()  # waits until the A-ASSOCIATE-RJ has left, then ends the association

    def handle_established(self, event: evt.Event) -> None:
        log.info(
            "association_established",
            calling_ae=event.assoc.requestor.ae_title,
            peer=hashed(str(event.assoc.requestor.address)),
        )

    def handle_rejected(self, event: evt.Event) -> None:
        """pynetdicom rejected the association (called/calling AE title...): say why."""
        assoc = event.assoc
        log.warning("association_rejected", reason=describe_rejection(assoc.acceptor.primitive),
                    calling_ae=assoc.requestor.ae_title, called_ae=assoc.requestor.primitive.called_ae_title
                    if assoc.requestor.primitive else None, peer=hashed(str(assoc.requestor.address)))

    def handle_echo(self, event: evt.Event) -> int:
        return 0x0000

    def handle_store(self, event: evt.Event) -> Dataset:
        calling_ae = event.assoc.requestor.ae_title
        label = ae_label(calling_ae, self.config.allowed_calling_aets)
        sock = event.assoc.dul.socket
        received = sock.take(event.request.MessageID) if isinstance(sock, StreamingSocket) else None
        try:
            if received is None:
                raise RejectedInstance(CANNOT_UNDERSTAND, "no data set received")
            if received.refusal is not None:
                raise RejectedInstance(*received.refusal)
            refusal = self.accepting()
            if refusal:
                # Out of resources is a transient failure: the modality keeps the image and retries.
                raise RejectedInstance(OUT_OF_RESOURCES, refusal)
            assert received.path is not None
            stored = self.ingestor.store_file(received.path, calling_ae=calling_ae,
                                              context_sop_class=str(event.context.abstract_syntax))
        except RejectedInstance as exc:
            log.warning("instance_refused", status=f"0x{exc.status:04X}", reason=exc.reason, calling_ae=calling_ae,
                        bytes=received.seen if received else None)
            INSTANCES_REFUSED.labels(status=f"0x{exc.status:04X}").inc()
            return _status(exc.status, exc.reason)
        except Exception as exc:  # never let a bug take the listener down
            log.exception("instance_store_failed", error=type(exc).__name__, calling_ae=calling_ae)
            INSTANCES_REFUSED.labels(status=f"0x{OUT_OF_RESOURCES:04X}").inc()
            return _status(OUT_OF_RESOURCES, "internal error")
        finally:
            if received is not None:
                received.discard()  # gone already when the spool adopted it
        if stored.outcome in ("out_of_scope", "own_result"):
            log.info("instance_not_stored", study_key=stored.study_key, instance=hashed(stored.sop_instance_uid),
                     outcome=stored.outcome, reason=stored.note, calling_ae=calling_ae)
            INSTANCES_NOT_STORED.labels(outcome=stored.outcome).inc()
            return _status(0x0000)
        log.info(
            "instance_stored",
            study_key=stored.study_key,
            instance=hashed(stored.sop_instance_uid),
            duplicate=stored.duplicate,
            **({"duplicate_reason": stored.note} if stored.duplicate else {}),
            calling_ae=calling_ae,
        )
        INSTANCES_RECEIVED.labels(calling_ae=label).inc()
        if self.on_stored and stored.stored:
            self.on_stored(stored.study_uid)
        return _status(0x0000)
