"""The gateway's DICOM listener: Storage SCP for CR/DX/SC plus Verification.

Handlers are bound to pynetdicom events; the C-STORE handler returns only after the instance is
on disk and in SQL (see gateway.ingest).
"""

from __future__ import annotations

import ipaddress
import ssl
from collections.abc import Callable

from osteogate.gateway.config import DicomConfig, TlsConfig
from osteogate.gateway.ingest import ACCEPTED_SOP_CLASSES, OUT_OF_RESOURCES, Ingestor, RejectedInstance
from osteogate.gateway.logs import get_logger, hashed
from osteogate.gateway.metrics import INSTANCES_RECEIVED, INSTANCES_REFUSED
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
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer

log = get_logger("osteogate.gateway.scp")

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
        self._server: ThreadedAssociationServer | None = None
        self.ae = self._make_ae()

    def _make_ae(self) -> AE:
        ae = AE(ae_title=self.config.ae_title)
        ae.maximum_associations = self.config.max_associations
        ae.network_timeout = self.config.network_timeout_seconds
        ae.acse_timeout = self.config.network_timeout_seconds
        ae.dimse_timeout = self.config.network_timeout_seconds
        # Refuse associations addressed to another AE title, and callers not on the allow-list.
        ae.require_called_aet = True
        if self.config.allowed_calling_aets:
            ae.require_calling_aet = list(self.config.allowed_calling_aets)
        for sop_class in ACCEPTED_SOP_CLASSES:
            ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        return ae

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.server_address[1])

    def start(self) -> None:
        handlers = [
            (evt.EVT_REQUESTED, self.handle_requested),
            (evt.EVT_C_STORE, self.handle_store),
            (evt.EVT_C_ECHO, self.handle_echo),
            (evt.EVT_ESTABLISHED, self.handle_established),
            (evt.EVT_REJECTED, self.handle_rejected),
        ]
        self._server = self.ae.start_server(
            (self.config.bind, self.config.port), block=False, evt_handlers=handlers,
            ssl_context=server_tls_context(self.config.tls),
        )
        log.info("scp_listening", ae_title=self.config.ae_title, port=self.port, bind=self.config.bind,
                 tls=self.config.tls.enabled)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
            log.info("scp_stopped")

    # -- event handlers ------------------------------------------------------------------------

    def host_allowed(self, address: str) -> bool:
        if not self.config.allowed_hosts:
            return True
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in ipaddress.ip_network(net, strict=False) for net in self.config.allowed_hosts)

    def handle_requested(self, event: evt.Event) -> None:
        """Refuse an association before negotiation: unknown source host, or no room to store."""
        assoc = event.assoc
        address = str(assoc.requestor.address)
        if not self.host_allowed(address):
            log.warning("association_refused", reason="source host not allowed", peer=hashed(address),
                        calling_ae=assoc.requestor.ae_title)
            # Permanent, service user, no reason given: do not tell a stranger what would work.
            assoc.acse.send_reject(0x01, 0x01, 0x01)
            assoc.kill()  # waits until the A-ASSOCIATE-RJ has left, then ends the association
            return
        refusal = self.accepting()
        if refusal:
            log.warning("association_refused", reason=refusal, calling_ae=assoc.requestor.ae_title)
            # Transient "local limit exceeded": the modality keeps its images and retries later.
            assoc.acse.send_reject(0x02, 0x03, 0x02)
            assoc.kill()

    def handle_established(self, event: evt.Event) -> None:
        log.info(
            "association_established",
            calling_ae=event.assoc.requestor.ae_title,
            peer=hashed(str(event.assoc.requestor.address)),
        )

    def handle_rejected(self, event: evt.Event) -> None:
        log.warning("association_rejected", calling_ae=event.assoc.requestor.ae_title)

    def handle_echo(self, event: evt.Event) -> int:
        return 0x0000

    def handle_store(self, event: evt.Event) -> int:
        calling_ae = event.assoc.requestor.ae_title
        context_sop_class = str(event.context.abstract_syntax)
        try:
            refusal = self.accepting()
            if refusal:
                # Out of resources is a transient failure: the modality keeps the image and retries.
                raise RejectedInstance(OUT_OF_RESOURCES, refusal)
            encoded = event.encoded_dataset(include_meta=True)
            if len(encoded) > self.config.max_instance_mb * 1024 * 1024:
                raise RejectedInstance(OUT_OF_RESOURCES, f"instance larger than {self.config.max_instance_mb} MB")
            stored = self.ingestor.store(encoded, calling_ae=calling_ae, context_sop_class=context_sop_class)
        except RejectedInstance as exc:
            log.warning("instance_refused", status=f"0x{exc.status:04X}", reason=exc.reason, calling_ae=calling_ae)
            INSTANCES_REFUSED.labels(status=f"0x{exc.status:04X}").inc()
            return exc.status
        except Exception as exc:  # never let a bug take the listener down
            log.exception("instance_store_failed", error=type(exc).__name__, calling_ae=calling_ae)
            INSTANCES_REFUSED.labels(status=f"0x{OUT_OF_RESOURCES:04X}").inc()
            return OUT_OF_RESOURCES
        log.info(
            "instance_stored",
            study_key=stored.study_key,
            instance=hashed(stored.sop_instance_uid),
            duplicate=stored.duplicate,
            calling_ae=calling_ae,
        )
        INSTANCES_RECEIVED.labels(calling_ae=calling_ae).inc()
        if self.on_stored and not stored.duplicate:
            self.on_stored(stored.study_uid)
        return 0x0000


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


def client_tls_context(config: TlsConfig) -> ssl.SSLContext:
    """TLS for sending: the PACS certificate is always verified (against ca_file or system CAs)."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                         cafile=str(config.ca_file) if config.ca_file else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if config.cert_file and config.key_file:
        context.load_cert_chain(str(config.cert_file), str(config.key_file))
    return context
