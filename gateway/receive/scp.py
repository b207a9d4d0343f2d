"""The gateway's DICOM listener: Storage SCP (CR/DX/SC stored; every other standard storage SOP
class acknowledged) plus Verification.

Handlers are bound to pynetdicom events; the C-STORE handler returns only after the instance is
on disk and in SQL (see gateway.receive.ingest). Around pynetdicom's threaded server, three things bound
what one peer can cost everyone else:

* **Connections** (``AssociationListener``, gateway/receive/connections.py): a host not on
  ``dicom.allowed_hosts`` is closed in the accept loop, at once, and logged; the TLS handshake runs in the connection's own thread,
  never in the accept loop, and a connection that has not completed it *and* sent its
  A-ASSOCIATE-RQ within ``dicom.handshake_timeout_seconds`` is closed. Connections still waiting
  to associate do not hold association slots (``dicom.max_associations`` counts associations
  that have been requested); they are capped per host instead.
* **Memory** (``StreamingSocket``, gateway/receive/streaming.py): PDUs are read with a size
  limit, and the data set of each C-STORE is written to a file in the spool's incoming folder as it arrives, never buffered
  whole; once it passes ``dicom.max_instance_mb`` the rest is read and dropped, and the
  C-STORE is answered 0xA700 with the reason.
* **Time**: every socket read and write has a timeout (``dicom.network_timeout_seconds``).
"""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Callable

from osteogate.gateway.core.config import DicomConfig
from osteogate.gateway.core.dicomnet import client_tls_context, describe_rejection, server_tls_context
from osteogate.gateway.core.logs import get_logger, hashed
from osteogate.gateway.core.metrics import (
    INSTANCES_NOT_STORED,
    INSTANCES_RECEIVED,
    INSTANCES_REFUSED,
    ae_label,
)
from osteogate.gateway.receive.connections import ECHO_SLOTS, AssociationListener
from osteogate.gateway.receive.ingest import Ingestor
from osteogate.gateway.receive.streaming import ANNOUNCED_PDU_BYTES, StreamingSocket
from osteogate.gateway.receive.validation import (
    ACCEPTED_SOP_CLASSES,
    CANNOT_UNDERSTAND,
    OUT_OF_RESOURCES,
    OUT_OF_SCOPE_SOP_CLASSES,
    RejectedInstance,
)
from pydicom.dataset import Dataset
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
from pynetdicom.sop_class import Verification

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

# -- the SCP ---------------------------------------------------------------------------------------------


def _status(code: int, reason: str | None = None) -> Dataset:
    """A C-STORE response status, with the reason as Error Comment (LO: 64 ASCII characters)."""
    ds = Dataset()
    ds.Status = code
    if reason:
        ds.ErrorComment = reason.encode("ascii", "replace").decode().replace("\\", "/")[:64]
    return ds


def make_ae(config: DicomConfig) -> AE:
    """The AE: our AE title and timeouts, every storage SOP class and Verification supported."""
    ae = AE(ae_title=config.ae_title)
    # Our own slot count (AssociationListener.claim_slot) applies to requested associations;
    # pynetdicom's would count connections still waiting to associate, so keep it out of the way.
    ae.maximum_associations = config.max_associations + ECHO_SLOTS + max(64, 4 * config.max_associations) + 1
    ae.maximum_pdu_size = ANNOUNCED_PDU_BYTES
    ae.network_timeout = config.network_timeout_seconds
    ae.dimse_timeout = config.network_timeout_seconds
    # ARTIM: how long a connection may stay silent before its A-ASSOCIATE-RQ (PS3.8 9.1.5).
    ae.acse_timeout = config.handshake_timeout_seconds
    # Refuse associations addressed to another AE title, and callers not on the allow-list.
    ae.require_called_aet = True
    if config.allowed_calling_aets:
        ae.require_calling_aet = list(config.allowed_calling_aets)
    for sop_class in [*ACCEPTED_SOP_CLASSES, *OUT_OF_SCOPE_SOP_CLASSES]:
        ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    return ae



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
        self.ae = make_ae(config)

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
        if reason is None and self._server is not None and \
                not self._server.claim_slot(assoc, echo_only=_verification_only(assoc)):
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


def _verification_only(assoc: Association) -> bool:
    """True when the A-ASSOCIATE-RQ proposes the Verification SOP Class and nothing else."""
    contexts = getattr(assoc.requestor.primitive, "presentation_context_definition_list", None) or []
    return bool(contexts) and all(str(c.abstract_syntax) == str(Verification) for c in contexts)
