"""The MLLP listener for DXA results (HL7 v2 ORU^R01), run by ``osteogate serve``.

python-hl7's asyncio server (``hl7.mllp.start_hl7_server``) accepts the connections; this module
decides per frame, in its own thread and event loop beside the DICOM listener:

* a source address not on ``groundtruth.allowed_hosts`` is closed before anything is read;
* a frame over ``max_message_bytes`` is read to its end without being held (memory stays bounded)
  and answered AR; the connection stays usable;
* a frame whose first bytes came but whose end did not within ``read_timeout_seconds`` (a
  half-sent message, then silence) closes the connection; an idle connection between messages is
  kept, as interface engines hold theirs open;
* each message is stored in one transaction (``exams.save_results``): all its exams or none, and
  the ACK (AA) goes out only after the commit; any error answers AE/AR and the listener goes on.
"""

from __future__ import annotations

import asyncio
import ipaddress
import ssl
import threading
from collections.abc import Callable

from hl7.mllp import start_hl7_server
from osteogate.gateway.core.groundtruth_config import GroundTruthConfig
from osteogate.gateway.core.logs import get_logger, hashed
from osteogate.gateway.core.metrics import HL7_MESSAGES
from osteogate.gateway.groundtruth.exams import DxaResult, SaveOutcome, save_results
from osteogate.gateway.groundtruth.hl7 import Hl7Rejection, ack, control_id, dxa_results, parse_message
from osteogate.gateway.store.db import Database
from sqlalchemy.exc import IntegrityError

log = get_logger("osteogate.gateway.groundtruth.mllp")

START_BLOCK, END_FRAME = b"\x0b", b"\x1c\r"


class FrameTimeout(Exception):
    """A frame began but did not end within the read timeout."""


class _Oversize:
    """Marker: a frame larger than the limit was read to its end and dropped."""


def tls_context(config: GroundTruthConfig) -> ssl.SSLContext | None:
    """Server TLS from ``tls_cert``/``tls_key`` (TLS 1.2 or later), or None without them."""
    if not (config.tls_cert and config.tls_key):
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(config.tls_cert), str(config.tls_key))
    return context


def host_allowed(host: str, allowed: list[str]) -> bool:
    if not allowed:
        return True
    try:
        address = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return False
    return any(address in ipaddress.ip_network(item, strict=False) for item in allowed)


async def read_frame(reader: asyncio.StreamReader, read_timeout: float) -> bytes | _Oversize | None:
    """The next MLLP frame's content (between <VT> and <FS><CR>); None at a clean end of stream.

    Raises FrameTimeout for a frame begun but not ended within ``read_timeout`` seconds and
    asyncio.IncompleteReadError when the peer closes mid-frame.
    """
    loop = asyncio.get_running_loop()
    poll = min(1.0, read_timeout / 4)
    started: float | None = None
    oversize = False
    while True:
        try:
            chunk = await asyncio.wait_for(reader.readuntil(END_FRAME), poll)
        except TimeoutError:
            # python-hl7's own reader inspects _buffer the same way: bytes waiting = a frame begun.
            if reader._buffer or oversize:  # type: ignore[attr-defined]
                started = started if started is not None else loop.time()
                if loop.time() - started > read_timeout:
                    raise FrameTimeout from None
            continue
        except asyncio.LimitOverrunError as exc:
            # Drop what is buffered (up to, not including, a separator found past the limit).
            await reader.readexactly(exc.consumed)
            oversize = True
            started = started if started is not None else loop.time()
            continue
        except asyncio.IncompleteReadError as exc:
            if not exc.partial.strip() and not oversize:
                return None
            raise
        if oversize:
            return _Oversize()
        return chunk[: -len(END_FRAME)]


class MllpListener:
    """HL7 v2 over MLLP on ``groundtruth.bind``:``mllp_port``; ``start`` returns once it listens.

    ``port`` overrides ``mllp_port`` (0: any free port, for tests).
    """

    def __init__(self, config: GroundTruthConfig, db: Database, *,
                 on_stored: Callable[[], None] | None = None, port: int | None = None) -> None:
        self.config = config
        self.db = db
        self.on_stored = on_stored
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.port: int = config.mllp_port if port is None else port

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="osteogate-mllp", daemon=True)
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise self._error
        log.info("mllp_listening", bind=self.config.bind, port=self.port, tls=bool(self.config.tls_cert),
                 allowed_hosts=self.config.allowed_hosts or "any")
        if not self.config.allowed_hosts:
            log.warning("mllp_any_host", bind=self.config.bind, port=self.port,
                        message="ANY HOST MAY SEND DXA RESULTS: groundtruth.allowed_hosts is empty; "
                                "list the interface engine's address")

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop = None

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            self._server = loop.run_until_complete(start_hl7_server(
                self._client, self.config.bind, self.port,
                limit=self.config.max_message_bytes, ssl=tls_context(self.config),
                ssl_handshake_timeout=self.config.read_timeout_seconds if self.config.tls_cert else None))
            self.port = self._server.sockets[0].getsockname()[1]
        except BaseException as exc:  # bind failure, bad certificate: reported by start()
            self._error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            self._server.close()
            for task in asyncio.all_tasks(loop):
                task.cancel()
            loop.run_until_complete(asyncio.sleep(0))
            loop.close()

    # -- one connection ----------------------------------------------------------------------------

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername") or ("?", 0)
        host = str(peer[0])
        if not host_allowed(host, self.config.allowed_hosts):
            log.warning("mllp_refused", host=host, reason="not in groundtruth.allowed_hosts")
            HL7_MESSAGES.labels(outcome="host_not_allowed").inc()
            writer.close()
            return
        try:
            while True:
                frame = await read_frame(reader, self.config.read_timeout_seconds)
                if frame is None:
                    break
                if isinstance(frame, _Oversize):
                    reply = ack(None, "AR", f"message larger than groundtruth.max_message_bytes "
                                            f"({self.config.max_message_bytes} bytes): not read")
                    log.warning("hl7_refused", host=host, code="AR", reason="message too large")
                else:
                    reply = await asyncio.to_thread(self.handle, frame, host)
                HL7_MESSAGES.labels(outcome=_ack_code(reply)).inc()
                writer.write(START_BLOCK + reply.encode("utf-8") + END_FRAME)
                await writer.drain()
        except FrameTimeout:
            HL7_MESSAGES.labels(outcome="timeout").inc()
            log.warning("mllp_read_timeout", host=host, seconds=self.config.read_timeout_seconds,
                        message="a message began but did not end in time: connection closed, nothing stored")
        except asyncio.IncompleteReadError:
            log.warning("mllp_closed_mid_message", host=host, message="connection closed mid-message: nothing stored")
        except (ConnectionError, ssl.SSLError, OSError) as exc:
            log.warning("mllp_connection_error", host=host, error=type(exc).__name__)
        finally:
            writer.close()

    def handle(self, frame: bytes, host: str = "") -> str:
        """Process one frame: parse, check, store in one transaction, answer.

        Parameters
        ----------
        frame
            The bytes between the start of the frame and its ``<FS><CR>`` (``<VT>`` included).
        host
            The sender's address, for the logs.

        Returns
        -------
        str
            The ACK: AA once stored; AE or AR with the reason otherwise. Never raises: any
            error becomes an AE, so the listener keeps answering.
        """
        if not frame.startswith(START_BLOCK):
            return ack(None, "AR", "frame does not begin with <VT> (0x0B): not MLLP")
        message = None
        try:
            text = _decode(frame[1:])
            message = parse_message(text)
            results = dxa_results(message, self.config.loinc_codes)
            outcomes = self._save(results)
        except Hl7Rejection as exc:
            log.warning("hl7_refused", host=host, code=exc.code, reason=exc.reason,
                        control_id=hashed(control_id(message)) if message is not None else None)
            return ack(message, exc.code, exc.reason)
        except Exception as exc:  # the database, most likely: the sender should retry
            log.error("hl7_store_failed", host=host, error=type(exc).__name__)
            return ack(message, "AE", f"not stored ({type(exc).__name__}): send again later")
        log.info("dxa_received", host=host, source="hl7", exams=len(outcomes),
                 outcomes=[str(o) for o in outcomes], control_id=hashed(control_id(message)))
        if self.on_stored:
            self.on_stored()
        return ack(message, "AA")

    def _save(self, results: list[DxaResult]) -> list[SaveOutcome]:
        # Two connections may deliver the same exam at once; on PostgreSQL the second insert then
        # hits the unique exam key. Once more finds the row the first one committed.
        for attempt in (1, 2):
            try:
                with self.db.session(write=True) as session:
                    return save_results(session, results)
            except IntegrityError:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")


def _ack_code(reply: str) -> str:
    """MSA-1 of an ACK this module made (for the metrics label)."""
    for segment in reply.split("\r"):
        if segment.startswith("MSA|"):
            return segment[4:6]
    return "other"


def _decode(data: bytes) -> str:
    # HL7 v2 defaults to ASCII; sites send UTF-8 or Latin-1 (MSH-18). Names are not read here,
    # so a wrong guess cannot change a stored value.
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")
