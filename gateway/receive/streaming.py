"""The receive path's socket: PDUs read with a size limit, each C-STORE data set written to a file
in the spool's incoming folder as it arrives, never buffered whole. Once a data set passes
``dicom.max_instance_mb`` the rest is read and dropped, and the C-STORE is answered 0xA700 with
the reason (gateway/receive/scp.py reads ``Received.refusal``).
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import BinaryIO

from osteogate.gateway.core.logs import get_logger, hashed
from osteogate.gateway.core.uids import is_valid_uid
from osteogate.gateway.receive.validation import CANNOT_UNDERSTAND, OUT_OF_RESOURCES
from osteogate.gateway.store.spool import Spool, SpoolError
from pydicom.dataset import Dataset
from pydicom.filewriter import write_file_meta_info
from pynetdicom.dsutils import create_file_meta, decode
from pynetdicom.transport import AssociationSocket

log = get_logger("osteogate.gateway.receive.scp")

# The maximum PDU length we announce. pynetdicom's default (16382 bytes) cuts an 8 MB image into
# 500 PDUs, each costing a trip through pynetdicom's state machine (~0.1 ms of Python): most of the
# receive path's CPU (benchmarks/README.md). 256 KiB costs 16x fewer trips and at most 256 KiB of
# buffer per association. A peer must not send PDUs longer than that; tolerate up to 1 MiB (some
# senders round up), and treat anything longer as the protocol violation it is: without a limit
# one PDU header could make us allocate 4 GiB.
ANNOUNCED_PDU_BYTES = 1 << 18
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
        assert self.socket is not None
        body = recv_exactly(self.socket, length)
        if len(body) != length:
            self._body = body  # connection closed mid-PDU: pynetdicom sees the short read
            return data
        try:
            self._body = self._filter(body)
        except _Violation as exc:
            return self._violate(str(exc))
        return bytearray(struct.pack(">BBL", 0x04, reserved, len(self._body)))

    def close(self) -> None:
        self._discard_pending()
        super().close()

    def _shutdown_socket(self) -> None:
        # What pynetdicom calls when the peer drops or aborts the association (AA-4, AR-5):
        # close() is not called then, and a half-received data set would stay in the spool.
        self._discard_pending()
        super()._shutdown_socket()

    def _discard_pending(self) -> None:
        with self._lock:
            pending = [r for r in [self._current, *self._received.values()] if r is not None]
            self._current = None
            self._received.clear()
        for item in pending:
            item.discard()

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
        syntax = next((cx.transfer_syntax[0] for cx in self.assoc.accepted_contexts
                       if cx.context_id == context_id), None)
        self._current = open_received(self._spool, message_id, command, syntax)

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


def open_received(spool: Spool, message_id: int, command: Dataset, syntax: str | None) -> Received:
    """A new ``Received`` for a C-STORE request: its spool file opened and the File Meta written, or
    the refusal already decided (invalid UIDs, no accepted context, spool not writable)."""
    received = Received(message_id)
    sop_class = str(command.get("AffectedSOPClassUID", "")).strip("\x00 ")
    sop_instance = str(command.get("AffectedSOPInstanceUID", "")).strip("\x00 ")
    if not (is_valid_uid(sop_class) and is_valid_uid(sop_instance)):
        received.refuse(0xA900, "Affected SOP Class/Instance UID invalid")
        return received
    if syntax is None:
        received.refuse(CANNOT_UNDERSTAND, "no accepted presentation context for the data set")
        return received
    try:
        handle, path = spool.new_incoming()
        received._handle, received.path = handle, path
        handle.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(handle, create_file_meta(sop_class_uid=sop_class, sop_instance_uid=sop_instance,
                                                      transfer_syntax=syntax))
    except (OSError, SpoolError) as exc:
        received.refuse(OUT_OF_RESOURCES, f"spool write failed: {exc.strerror or exc}")
    return received


def recv_exactly(sock: socket.socket, length: int) -> bytearray:
    """``length`` bytes, fewer only when the peer closes: one buffer filled in place with large
    reads (pynetdicom's own ``recv`` reads 4 KiB at a time and extends a bytearray)."""
    body = bytearray(length)
    view = memoryview(body)
    got = 0
    while got < length:
        count = sock.recv_into(view[got:], length - got)
        if not count:
            del view
            del body[got:]
            break
        got += count
    return body
