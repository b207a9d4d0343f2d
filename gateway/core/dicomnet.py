"""DICOM networking shared by the listener and every client: TLS contexts, client associations
with timeouts, and what a status or a rejection means, in words.

One place decides whether a peer's answer is worth retrying, so delivery, the self-check and the
``send``/``echo`` commands all read a status the same way:

* a DIMSE status is read with pynetdicom's own tables (``pynetdicom.status``): success, warning,
  or failure; a failure is *transient* when it is "out of resources" (0xA7xx: the peer may have
  room later) and *permanent* otherwise (the same dataset would be refused again);
* an A-ASSOCIATE-RJ is transient when the peer says "rejected-transient" and permanent when it
  says "rejected-permanent" (PS3.8 7.1.1.8), and its result/source/reason read as dcmtk prints them.

Nothing here touches SQL or the spool: it is pure network and pure decision logic.
"""

from __future__ import annotations

import enum
import errno
import logging
import socket
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from osteogate.gateway.core.config import Destination, TlsConfig
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.status import GENERAL_STATUS, STORAGE_SERVICE_CLASS_STATUS, code_to_category


class Outcome(enum.StrEnum):
    SUCCESS = "success"
    WARNING = "warning"  # stored, with a remark (coercion, element discarded...): counts as sent
    TRANSIENT = "transient"  # worth retrying later
    PERMANENT = "permanent"  # will fail the same way again: an administrator has to act

    @property
    def ok(self) -> bool:
        return self in (Outcome.SUCCESS, Outcome.WARNING)


# -- TLS ---------------------------------------------------------------------------------------------


def server_tls_context(config: TlsConfig) -> ssl.SSLContext | None:
    """TLS for the listener; with a CA file, clients must present a certificate it signed."""
    if not config.enabled:
        return None
    if not (config.cert_file and config.key_file):
        raise ValueError("dicom.tls.enabled needs dicom.tls.cert_file and dicom.tls.key_file")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(config.cert_file), str(config.key_file))
    if config.ca_file:
        context.load_verify_locations(cafile=str(config.ca_file))
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_tls_context(config: TlsConfig | None) -> ssl.SSLContext:
    """TLS for sending: the peer's certificate is always verified (against ca_file or system CAs)."""
    config = config or TlsConfig()
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                         cafile=str(config.ca_file) if config.ca_file else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if config.cert_file and config.key_file:
        context.load_cert_chain(str(config.cert_file), str(config.key_file))
    return context


# -- statuses ------------------------------------------------------------------------------------------


def status_outcome(code: int | None) -> Outcome:
    """What a C-STORE/C-ECHO response status means for the sender. ``None``: no response at all
    (timeout, abort), which is worth retrying."""
    if code is None:
        return Outcome.TRANSIENT
    category = code_to_category(code)
    if category == "Success":
        return Outcome.SUCCESS
    if category == "Warning":
        return Outcome.WARNING
    if category == "Failure" and (code & 0xFF00) == 0xA700:
        return Outcome.TRANSIENT  # out of resources: the peer may have room later
    if category in ("Cancel", "Pending"):
        return Outcome.TRANSIENT
    # Every other failure (0xA9xx, 0xCxxx, 0x0122 SOP class not supported, ...) and codes no
    # table knows: sending the same dataset again would meet the same answer.
    return Outcome.PERMANENT


def status_text(code: int | None) -> str:
    """``0xA700 (Refused: Out of Resources)``: the code and its meaning in the standard's words."""
    if code is None:
        return "no response (timeout or association aborted)"
    meaning = STORAGE_SERVICE_CLASS_STATUS.get(code) or GENERAL_STATUS.get(code)
    return f"0x{code:04X} ({meaning[1] or meaning[0]})" if meaning else f"0x{code:04X} (unknown status)"


def response_status(response: Dataset | None) -> int | None:
    """The Status of a DIMSE response dataset, or None when pynetdicom got no response."""
    if response is None or "Status" not in response:
        return None
    return int(response.Status)


def response_text(response: Dataset | None) -> str:
    """Status in words plus the peer's Error Comment (0000,0902), when it sent one."""
    text = status_text(response_status(response))
    comment = response.get("ErrorComment") if response is not None else None
    return f"{text}: {comment}" if comment else text


# -- association rejections --------------------------------------------------------------------------

_RESULTS = {0x01: "rejected permanently", 0x02: "rejected transiently"}
_SOURCES = {
    0x01: "the called AE",
    0x02: "the called AE's DICOM service provider (ACSE)",
    0x03: "the called AE's DICOM service provider (presentation layer)",
}
# PS3.8 Table 9-21, in the words pynetdicom's A_ASSOCIATE.reason_str and dcmtk use.
_REASONS = {
    (0x01, 0x01): "no reason given",
    (0x01, 0x02): "application context name not supported",
    (0x01, 0x03): "calling AE title not recognised",
    (0x01, 0x07): "called AE title not recognised",
    (0x02, 0x01): "no reason given",
    (0x02, 0x02): "protocol version not supported",
    (0x03, 0x01): "temporary congestion",
    (0x03, 0x02): "local limit exceeded",
}


def rejection_text(result: int | None, source: int | None, diagnostic: int | None) -> str:
    """``rejected permanently by the called AE: called AE title not recognised``."""
    verdict = _RESULTS.get(result or 0, f"rejected (result {result})")
    by = _SOURCES.get(source or 0, f"source {source}")
    reason = _REASONS.get((source or 0, diagnostic or 0), f"reason {diagnostic}")
    return f"{verdict} by {by}: {reason}"


def rejection_outcome(result: int | None) -> Outcome:
    """PS3.8 7.1.1.8: 1 = rejected-permanent, 2 = rejected-transient (anything else: retry)."""
    return Outcome.PERMANENT if result == 0x01 else Outcome.TRANSIENT


def describe_rejection(primitive: Any) -> str:
    """Words for the A-ASSOCIATE-RJ primitive pynetdicom keeps (``assoc.acceptor.primitive``)."""
    return rejection_text(getattr(primitive, "result", None), getattr(primitive, "result_source", None),
                          getattr(primitive, "diagnostic", None))


# -- retries --------------------------------------------------------------------------------------------


def backoff_seconds(attempts: int, base: float, maximum: float) -> float:
    """Wait before retry number ``attempts`` (1, 2, ...): base, 2 base, 4 base, ... capped at maximum."""
    if attempts <= 1:
        return min(base, maximum)
    # Cap the exponent before computing: 2 ** 10_000 would overflow a float.
    exponent = min(attempts - 1, 64)
    return float(min(base * 2**exponent, maximum))


# -- client associations ----------------------------------------------------------------------------------


class AssociationError(Exception):
    """No association: ``detail`` says why in words, ``outcome`` whether retrying can help."""

    def __init__(self, detail: str, outcome: Outcome) -> None:
        super().__init__(detail)
        self.detail = detail
        self.outcome = outcome


@dataclass(frozen=True)
class Peer:
    """Who to call: called AE title, host, port, TLS or not (a ``Destination`` fits)."""

    ae_title: str
    host: str
    port: int
    tls: bool = False

    @classmethod
    def of(cls, destination: Destination) -> Peer:
        return cls(destination.ae_title, destination.host, destination.port, destination.tls)

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}" + ("+tls" if self.tls else "")


def client_ae(calling_aet: str, timeout: float) -> AE:
    """An AE for one outgoing association, every wait bounded by ``timeout`` seconds."""
    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    return ae


def open_association(ae: AE, peer: Peer | Destination, tls: TlsConfig | None = None) -> Association:
    """Associate with ``peer`` using the contexts already requested on ``ae``; raise
    AssociationError with the reason in words when no association results."""
    if isinstance(peer, Destination):
        peer = Peer.of(peer)
    try:
        socket.getaddrinfo(peer.host, peer.port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        # A typo in a host name is a configuration problem, not a network outage.
        raise AssociationError(f"host name {peer.host!r} cannot be resolved ({exc.strerror or exc})",
                               Outcome.PERMANENT) from None
    try:
        tls_args = (client_tls_context(tls), peer.host) if peer.tls else None
    except (OSError, ssl.SSLError) as exc:
        raise AssociationError(f"TLS client settings unusable: {exc}", Outcome.PERMANENT) from None
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, tls_args=tls_args)
    if assoc.is_established:
        return assoc
    if assoc.is_rejected:
        primitive = assoc.acceptor.primitive
        raise AssociationError(f"association {describe_rejection(primitive)}",
                               rejection_outcome(getattr(primitive, "result", None)))
    # pynetdicom reports a refused connection, a failed TLS handshake and an A-ABORT alike (and
    # logs two ERROR lines, dropped by _QuietConnectFailures): find out which it was.
    raise AssociationError(f"no association with {peer}: {_connect_failure(peer, ae.connection_timeout)}",
                           Outcome.TRANSIENT)


def _connect_failure(peer: Peer, timeout: float) -> str:
    """Why an association attempt ended without one, in words: a plain TCP connect tells a
    refused or unreachable port (known at once) from a peer that accepts and then aborts, or
    whose TLS handshake fails."""
    try:
        with socket.create_connection((peer.host, peer.port), timeout=min(timeout, 5.0)):
            pass
    except TimeoutError:
        return f"no answer from {peer.host}:{peer.port} within {min(timeout, 5.0):g} s (firewall, or host down?)"
    except OSError as exc:
        cause = exc.strerror or type(exc).__name__
        if exc.errno == errno.ECONNREFUSED:
            return f"connection refused by {peer.host}:{peer.port} (nothing listens there: is the peer up, the port right?)"
        return f"cannot connect to {peer.host}:{peer.port}: {cause}"
    if peer.tls:
        return "the port accepts connections but the TLS handshake or association failed (is TLS on at the peer, the CA right?)"
    return (f"the peer accepted the connection but aborted or did not answer the association request within "
            f"{timeout:g} s (is it a DICOM port, and does it speak TLS only?)")


class _QuietConnectFailures(logging.Filter):
    """pynetdicom logs a failed outgoing connect as two ERROR lines per attempt; the gateway
    reports each failed attempt itself, once, at warning (sr_delivery_retry), with the cause."""

    _DROPPED = ("Association request failed: unable to connect to remote", "TCP Initialisation Error:")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not message.startswith(self._DROPPED)


logging.getLogger("pynetdicom.transport").addFilter(_QuietConnectFailures())


@contextmanager
def association(ae: AE, peer: Peer | Destination, tls: TlsConfig | None = None) -> Iterator[Association]:
    """``with association(ae, peer) as assoc:`` released (or aborted) on the way out."""
    assoc = open_association(ae, peer, tls)
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()
