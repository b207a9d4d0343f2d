"""Delivery of result SRs to PACS by C-STORE, with retries that survive restarts.

Every attempt's outcome is in SQL (deliveries table), so a restarted gateway carries on where it
stopped. Transient failures (peer down, timeout, transient rejection, out-of-resources status) are
retried with exponential backoff; a permanent rejection (A-ASSOCIATE-RJ "rejected-permanent",
e.g. unknown called AE title) or a permanent failure status is marked REJECTED and logged, not
retried blindly: an admin fixes the configuration and uses `osteogate resend`.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pydicom
from osteogate.gateway.config import Destination, Settings, TlsConfig
from osteogate.gateway.db import Database, Delivery, DeliveryStatus, StudyResult, utcnow
from osteogate.gateway.logs import get_logger
from osteogate.gateway.metrics import DELIVERIES
from osteogate.gateway.scp import client_tls_context
from osteogate.gateway.spool import Spool
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from sqlalchemy import or_

log = get_logger("osteogate.gateway.delivery")


@dataclass(frozen=True)
class SendOutcome:
    ok: bool
    permanent: bool
    detail: str


def result_files(result: StudyResult) -> list[str]:
    """What one delivery of a result sends, in order (the SR, then the result card), as paths
    relative to the reports directory. Results made before result_objects existed: their SR."""
    paths = [obj.path for obj in result.objects]
    return paths or ([result.sr_path] if result.sr_path else [])


def send_file(
    path: str | Sequence[str], destination: Destination, calling_aet: str, timeout: float = 30,
    tls: TlsConfig | None = None,
) -> SendOutcome:
    """C-STORE one file, or a result's files over one association, to one destination; classify the
    outcome as ok / transient / permanent.

    All or retry: any failed C-STORE makes the whole set be sent again later, so a PACS never keeps
    half a report. The first file (the SR) is the report: a peer that refuses its SOP class gets
    nothing. A later one (the result card) whose SOP class the peer refuses at negotiation is left
    out, and the outcome says so: an SR-only archive still gets its SR."""
    datasets = [pydicom.dcmread(p) for p in ([path] if isinstance(path, str) else path)]
    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    for sop_class in dict.fromkeys(str(ds.SOPClassUID) for ds in datasets):
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    tls_args = (client_tls_context(tls or TlsConfig()), destination.host) if destination.tls else None
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title, tls_args=tls_args)
    if assoc.is_rejected:
        rj = assoc.acceptor.primitive
        result = getattr(rj, "result", None)
        detail = f"association rejected (result {result}, source {getattr(rj, 'result_source', None)}, " \
                 f"reason {getattr(rj, 'diagnostic', None)})"
        # PS3.8 7.1.1.8: result 1 = rejected-permanent, 2 = rejected-transient.
        return SendOutcome(False, permanent=result == 0x01, detail=detail)
    if not assoc.is_established:
        return SendOutcome(False, permanent=False, detail="association failed (peer unreachable or aborted)")
    try:
        accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
        if str(datasets[0].SOPClassUID) not in accepted:
            name = pydicom.uid.UID(str(datasets[0].SOPClassUID)).name
            return SendOutcome(False, permanent=True, detail=f"peer accepts no context for {name}; nothing sent")
        left_out = sorted({pydicom.uid.UID(str(ds.SOPClassUID)).name for ds in datasets[1:]
                           if str(ds.SOPClassUID) not in accepted})
        status: Any = None
        for ds in datasets:
            if str(ds.SOPClassUID) in accepted:
                status = assoc.send_c_store(ds)
                if not _stored(status):
                    break
    finally:
        assoc.release()
    if not status or "Status" not in status:
        return SendOutcome(False, permanent=False, detail="no C-STORE response (timeout or abort)")
    code = int(status.Status)
    if code == 0x0000 or (code & 0xF000) == 0xB000:  # success or warning
        note = f"; not accepted by the peer, left out: {', '.join(left_out)}" if left_out else ""
        return SendOutcome(True, permanent=False, detail=f"status 0x{code:04X}{note}")
    # 0xA7xx out of resources is worth retrying; refusals of the dataset itself (0xA9xx, 0xCxxx,
    # 0x0122 SOP class not supported) will fail again the same way.
    permanent = (code & 0xFF00) != 0xA700
    return SendOutcome(False, permanent=permanent, detail=f"C-STORE failed with status 0x{code:04X}")


def _stored(status: Any) -> bool:
    return bool(status) and "Status" in status and (int(status.Status) == 0 or (int(status.Status) & 0xF000) == 0xB000)


class DeliveryManager:
    def __init__(self, settings: Settings, db: Database, reports: Spool) -> None:
        self.settings = settings
        self.db = db
        self.reports = reports
        self._lock = threading.Lock()  # one sender pass at a time in this process

    def backoff(self, attempts: int) -> float:
        cfg = self.settings.delivery
        return min(cfg.retry_base_seconds * 2 ** max(attempts - 1, 0), cfg.retry_max_seconds)

    def run_due(self) -> int:
        """Send every delivery that is due; returns how many were sent successfully."""
        if not self._lock.acquire(blocking=False):
            return 0
        try:
            sent = 0
            while (claimed := self._claim()) is not None:
                sent += self._attempt(*claimed)
            return sent
        finally:
            self._lock.release()

    def _claim(self) -> tuple[int, str, list[str], str] | None:
        now = utcnow()
        due = (
            (Delivery.status == DeliveryStatus.PENDING)
            & (Delivery.next_attempt_at <= now)
            & or_(Delivery.claimed_until.is_(None), Delivery.claimed_until < now)
        )
        claim_until = now + timedelta(seconds=self.settings.delivery.timeout_seconds * 4)
        with self.db.session() as session:
            delivery_id = self.db.claim_one(session, Delivery, due, Delivery.next_attempt_at,
                                            {"claimed_until": claim_until})
            if delivery_id is None:
                return None
            delivery = session.get(Delivery, delivery_id)
            assert delivery is not None
            return delivery.id, delivery.destination, result_files(delivery.result), delivery.result.study.study_key

    def _attempt(self, delivery_id: int, destination_text: str, paths: list[str], key: str) -> int:
        destination = self.settings.delivery.resolve(destination_text)  # configured auth/TLS
        files = [self.reports.absolute(p) for p in paths]  # the SR first, then the result card
        try:
            if destination.kind == "dicomweb":  # STOW-RS (gateway/stow.py); else C-STORE
                from osteogate.gateway.stow import send_files as stow_files

                outcome = stow_files(files, destination, self.settings.delivery.timeout_seconds)
            else:
                outcome = send_file(
                    [str(f) for f in files], destination, self.settings.delivery_calling_aet,
                    self.settings.delivery.timeout_seconds, self.settings.delivery.tls,
                )
        except Exception as exc:
            outcome = SendOutcome(False, permanent=False, detail=f"{type(exc).__name__}: {exc}")
        with self.db.session() as session:
            delivery = session.get(Delivery, delivery_id)
            assert delivery is not None
            delivery.attempts += 1
            delivery.claimed_until = None
            DELIVERIES.labels(outcome="sent" if outcome.ok else "rejected" if outcome.permanent else "failed").inc()
            if outcome.ok:
                delivery.status = DeliveryStatus.SENT
                delivery.sent_at = utcnow()
                delivery.last_error = None
                log.info("sr_delivered", study_key=key, destination=destination.name,
                         attempts=delivery.attempts, detail=outcome.detail)
                return 1
            delivery.last_error = outcome.detail[:2000]
            if outcome.permanent:
                delivery.status = DeliveryStatus.REJECTED
                log.error("sr_delivery_rejected", study_key=key, destination=destination.name,
                          detail=outcome.detail)
            else:
                delay = self.backoff(delivery.attempts)
                delivery.next_attempt_at = utcnow() + timedelta(seconds=delay)
                log.warning("sr_delivery_retry", study_key=key, destination=destination.name,
                            attempts=delivery.attempts, retry_in_s=delay, detail=outcome.detail)
        return 0

    def requeue(self, result_id: int, destinations: list[Destination] | None = None) -> int:
        """Queue the SR of one result again (``osteogate resend``)."""
        with self.db.session() as session:
            result = session.get(StudyResult, result_id)
            if result is None:
                return 0
            targets = destinations or self.settings.delivery.destinations
            for destination in targets:
                result.deliveries.append(Delivery(destination=str(destination), status=DeliveryStatus.PENDING))
            return len(targets)
