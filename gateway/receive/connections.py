"""The connection gate around pynetdicom's threaded server (``AssociationListener``): a host not on
``dicom.allowed_hosts`` is closed in the accept loop, at once, and logged; the TLS handshake runs in
the connection's own thread, never in the accept loop, and a connection that has not completed it
*and* sent its A-ASSOCIATE-RQ within ``dicom.handshake_timeout_seconds`` is closed. Connections
still waiting to associate do not hold association slots (``dicom.max_associations`` counts
associations that have been requested); they are capped per host instead. Verification-only
associations (a monitoring C-ECHO) have ``ECHO_SLOTS`` of their own beyond those, so an echo is
answered while every storage slot is busy.
"""

from __future__ import annotations

import contextlib
import socket
import socketserver
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from osteogate.gateway.core.config import DicomConfig
from osteogate.gateway.core.logs import get_logger, hashed
from osteogate.gateway.core.metrics import CONNECTIONS_REFUSED
from osteogate.gateway.receive.ingest import Ingestor
from osteogate.gateway.receive.streaming import StreamingSocket
from pynetdicom.association import Association
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

log = get_logger("osteogate.gateway.receive.scp")

# Associations that propose only the Verification SOP Class are short and cost no spool, so a
# few may run beyond dicom.max_associations: the PACS's or the monitoring's C-ECHO keeps its answer
# under a storage swarm. Few, so a flood of echoes cannot hold many threads either.
ECHO_SLOTS = 4


class Gate(Protocol):
    """What the listener asks of the SCP that owns it (gateway/receive/scp.py StorageSCP)."""

    config: DicomConfig
    ingestor: Ingestor

    def host_allowed(self, address: str) -> bool: ...


# -- connections -------------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Connection:
    host: str
    opened: float = field(default_factory=time.monotonic)
    assoc: Association | None = None
    requested: bool = False
    echo_only: bool = False  # holds one of the ECHO_SLOTS, not a storage slot
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
    # listen() backlog: socketserver's 5 is kept on purpose. A burst of peers beyond it waits for
    # its SYN retransmit, which spreads the burst out; with 256 all of a 200-peer swarm got in at
    # once and C-ECHO latency during the swarm doubled (benchmarks/hostile_load.py, 2 cores).

    def __init__(self, *args: Any, gate: Gate, tls: ssl.SSLContext | None, **kwargs: Any) -> None:
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

    def claim_slot(self, assoc: Association, *, echo_only: bool = False) -> bool:
        """Called when the A-ASSOCIATE-RQ arrives: True if one of the slots is free for it.

        A Verification-only association takes one of the ECHO_SLOTS, else a storage slot.
        """
        conn = getattr(assoc, "osteogate_connection", None)
        with self._lock:
            holding = [c for c in self._connections if c.requested and c.alive() and c is not conn]
            echoes = sum(1 for c in holding if c.echo_only)
            reserve = echo_only and echoes < ECHO_SLOTS
            if not reserve and len(holding) - echoes >= self.slots:
                return False
            if conn is not None:
                conn.requested, conn.echo_only = True, reserve
        return True

    def shutdown(self) -> None:
        # Not pynetdicom's: this server was not registered with AE.start_server.
        socketserver.BaseServer.shutdown(self)
        self.server_close()
