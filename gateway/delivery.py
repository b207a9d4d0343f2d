"""Delivery of result SRs to PACS by C-STORE, with retries that survive restarts.

Every attempt's outcome is in SQL (deliveries table), so a restarted gateway carries on where it
stopped. Transient failures (peer down, timeout, rejected-transient, out-of-resources status) are
retried with exponential backoff; a permanent rejection (rejected-permanent, e.g. unknown called
AE title) or a permanent failure status is marked REJECTED and logged with the reason in words,
not retried blindly: an admin fixes the configuration and uses `osteogate resend`. The decisions
(what is transient, how long to wait) are gateway.dicomnet's.

Each destination has its own lane: one thread at a time per destination in this process, lanes of
different destinations side by side, so a PACS that hangs until every timeout expires delays only
its own deliveries. Rows are still claimed one by one (SKIP LOCKED + conditional UPDATE), so
several processes sharing the database never send the same delivery twice.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import timedelta

import pydicom
from osteogate.gateway.config import Destination, Settings, TlsConfig
from osteogate.gateway.db import Database, Delivery, DeliveryStatus, StudyResult, utcnow
from osteogate.gateway.dicomnet import (
    AssociationError,
    Outcome,
    association,
    backoff_seconds,
    client_ae,
    response_status,
    response_text,
    status_outcome,
)
from osteogate.gateway.logs import get_logger
from osteogate.gateway.metrics import DELIVERIES
from osteogate.gateway.spool import Spool
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from sqlalchemy import or_, select

log = get_logger("osteogate.gateway.delivery")

# Lanes running at once in one process (each is one thread, busy only while it has work).
MAX_LANES = 32


@dataclass(frozen=True)
class SendOutcome:
    ok: bool
    permanent: bool
    detail: str


def send_file(
    path: str, destination: Destination, calling_aet: str, timeout: float = 30,
    tls: TlsConfig | None = None,
) -> SendOutcome:
    """C-STORE one file to one destination; classify the outcome as ok / transient / permanent."""
    ds = pydicom.dcmread(path)
    ae = client_ae(calling_aet, timeout)
    ae.add_requested_context(ds.SOPClassUID, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    try:
        with association(ae, destination, tls) as assoc:
            if not assoc.accepted_contexts:
                return SendOutcome(False, permanent=True,
                                   detail=f"{destination.ae_title} accepts no presentation context for "
                                          f"{ds.SOPClassUID.name}")
            response = assoc.send_c_store(ds)
    except AssociationError as exc:
        return SendOutcome(False, permanent=exc.outcome == Outcome.PERMANENT, detail=exc.detail)
    outcome = status_outcome(response_status(response))
    verb = "stored" if outcome.ok else "C-STORE failed"
    return SendOutcome(outcome.ok, permanent=outcome == Outcome.PERMANENT, detail=f"{verb}: {response_text(response)}")


class DeliveryManager:
    def __init__(self, settings: Settings, db: Database, reports: Spool) -> None:
        self.settings = settings
        self.db = db
        self.reports = reports
        self._lanes: dict[str, threading.Thread] = {}
        self._lock = threading.Lock()

    def backoff(self, attempts: int) -> float:
        cfg = self.settings.delivery
        return backoff_seconds(attempts, cfg.retry_base_seconds, cfg.retry_max_seconds)

    # -- lanes ----------------------------------------------------------------------------------

    def run_due(self, wait: bool = True) -> int:
        """Start a lane for each destination with due deliveries and no lane running here.

        ``wait=True`` (admin commands, tests): returns once those lanes are done, with how many
        deliveries they sent. ``wait=False`` (the scheduler's tick): returns at once, so a lane
        stuck on a silent peer never keeps the next tick from starting lanes for the others.
        """
        started: list[tuple[threading.Thread, list[int]]] = []
        with self._lock:
            self._lanes = {d: t for d, t in self._lanes.items() if t.is_alive()}
            for destination in self._due_destinations():
                if destination in self._lanes or len(self._lanes) >= MAX_LANES:
                    continue
                sent: list[int] = []
                thread = threading.Thread(target=self._lane, args=(destination, sent), daemon=True,
                                          name=f"osteogate-delivery-{len(self._lanes)}")
                self._lanes[destination] = thread
                started.append((thread, sent))
                thread.start()
        if not wait:
            return 0
        for thread, _ in started:
            thread.join()
        return sum(sum(sent) for _, sent in started)

    def _due(self) -> object:
        now = utcnow()
        return (
            (Delivery.status == DeliveryStatus.PENDING)
            & (Delivery.next_attempt_at <= now)
            & or_(Delivery.claimed_until.is_(None), Delivery.claimed_until < now)
        )

    def _due_destinations(self) -> list[str]:
        with self.db.session() as session:
            return list(session.execute(select(Delivery.destination).where(self._due()).distinct()).scalars())

    def _lane(self, destination: str, sent: list[int]) -> None:
        """Send this destination's due deliveries one after the other, oldest first."""
        try:
            while (claimed := self._claim(destination)) is not None:
                sent.append(self._attempt(*claimed))
        except Exception:  # a database hiccup: the next tick starts the lane again
            log.exception("delivery_lane_failed", destination=destination.split("@", 1)[0])

    def _claim(self, destination: str) -> tuple[int, str, str, str] | None:
        now = utcnow()
        claim_until = now + timedelta(seconds=self.settings.delivery.timeout_seconds * 4)
        with self.db.session() as session:
            delivery_id = self.db.claim_one(session, Delivery, self._due() & (Delivery.destination == destination),
                                            Delivery.next_attempt_at, {"claimed_until": claim_until})
            if delivery_id is None:
                return None
            delivery = session.get(Delivery, delivery_id)
            assert delivery is not None
            return delivery.id, delivery.destination, delivery.result.sr_path, delivery.result.study.study_key

    def _attempt(self, delivery_id: int, destination_text: str, sr_path: str, key: str) -> int:
        try:
            destination = Destination.parse(destination_text)
            outcome = send_file(
                str(self.reports.absolute(sr_path)), destination, self.settings.delivery_calling_aet,
                self.settings.delivery.timeout_seconds, self.settings.delivery.tls,
            )
        except ValueError as exc:  # a destination row that no longer parses: an admin must look
            outcome = SendOutcome(False, permanent=True, detail=f"destination unusable: {exc}")
        except Exception as exc:
            outcome = SendOutcome(False, permanent=False, detail=f"{type(exc).__name__}: {exc}")
        ae_title = destination_text.split("@", 1)[0]
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
                log.info("sr_delivered", study_key=key, destination=ae_title,
                         attempts=delivery.attempts, detail=outcome.detail)
                return 1
            delivery.last_error = outcome.detail[:2000]
            if outcome.permanent:
                delivery.status = DeliveryStatus.REJECTED
                log.error("sr_delivery_rejected", study_key=key, destination=ae_title,
                          detail=outcome.detail)
            else:
                delay = self.backoff(delivery.attempts)
                delivery.next_attempt_at = utcnow() + timedelta(seconds=delay)
                log.warning("sr_delivery_retry", study_key=key, destination=ae_title,
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
