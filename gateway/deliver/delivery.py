"""Delivery of results (the SR, then the result card) to PACS by C-STORE or DICOMweb STOW-RS
(gateway/deliver/stow.py), with retries that survive restarts.

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
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pydicom
from osteogate.gateway.core.config import Destination, Settings, TlsConfig
from osteogate.gateway.core.dicomnet import (
    AssociationError,
    Outcome,
    association,
    backoff_seconds,
    client_ae,
    response_status,
    response_text,
    status_outcome,
)
from osteogate.gateway.core.logs import get_logger
from osteogate.gateway.core.metrics import DELIVERIES
from osteogate.gateway.store.db import Database, Delivery, DeliveryStatus, StudyResult, utcnow
from osteogate.gateway.store.spool import Spool
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from sqlalchemy import or_, select

log = get_logger("osteogate.gateway.deliver.delivery")

# Lanes running at once in one process (each is one thread, busy only while it has work).
MAX_LANES = 32


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
    outcome as ok / transient / permanent (gateway.dicomnet's rules).

    All or retry: any failed C-STORE makes the whole set be sent again later, so a PACS never keeps
    half a report. The first file (the SR) is the report: a peer that refuses its SOP class gets
    nothing. A later one (the result card) whose SOP class the peer refuses at negotiation is left
    out, and the outcome says so: an SR-only archive still gets its SR."""
    datasets = [pydicom.dcmread(p) for p in ([path] if isinstance(path, str) else path)]
    ae = client_ae(calling_aet, timeout)
    for sop_class in dict.fromkeys(str(ds.SOPClassUID) for ds in datasets):
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    response: Any = None
    try:
        with association(ae, destination, tls) as assoc:
            accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
            if str(datasets[0].SOPClassUID) not in accepted:
                return SendOutcome(False, permanent=True,
                                   detail=f"{destination.ae_title} accepts no presentation context for "
                                          f"{datasets[0].SOPClassUID.name}; nothing sent")
            left_out = sorted({ds.SOPClassUID.name for ds in datasets[1:] if str(ds.SOPClassUID) not in accepted})
            for ds in datasets:
                if str(ds.SOPClassUID) in accepted:
                    response = assoc.send_c_store(ds)
                    if not status_outcome(response_status(response)).ok:
                        break
    except AssociationError as exc:
        return SendOutcome(False, permanent=exc.outcome == Outcome.PERMANENT, detail=exc.detail)
    outcome = status_outcome(response_status(response))
    if outcome.ok:
        note = f"; not accepted by the peer, left out: {', '.join(left_out)}" if left_out else ""
        return SendOutcome(True, permanent=False, detail=f"stored: {response_text(response)}{note}")
    return SendOutcome(False, permanent=outcome == Outcome.PERMANENT, detail=f"C-STORE failed: {response_text(response)}")


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

    def _claim(self, destination: str) -> tuple[int, str, list[str], str] | None:
        now = utcnow()
        claim_until = now + timedelta(seconds=self.settings.delivery.timeout_seconds * 4)
        with self.db.session() as session:
            delivery_id = self.db.claim_one(session, Delivery, self._due() & (Delivery.destination == destination),
                                            Delivery.next_attempt_at, {"claimed_until": claim_until})
            if delivery_id is None:
                return None
            delivery = session.get(Delivery, delivery_id)
            assert delivery is not None
            return delivery.id, delivery.destination, result_files(delivery.result), delivery.result.study.study_key

    def _attempt(self, delivery_id: int, destination_text: str, paths: list[str], key: str) -> int:
        name = destination_text
        try:
            destination = self.settings.delivery.resolve(destination_text)  # configured auth/TLS
            name = destination.name
            files = [self.reports.absolute(p) for p in paths]  # the SR first, then the result card
            if destination.kind == "dicomweb":  # STOW-RS (gateway/deliver/stow.py); else C-STORE
                from osteogate.gateway.deliver.stow import send_files as stow_files

                outcome = stow_files(files, destination, self.settings.delivery.timeout_seconds)
            else:
                outcome = send_file(
                    [str(f) for f in files], destination, self.settings.delivery_calling_aet,
                    self.settings.delivery.timeout_seconds, self.settings.delivery.tls,
                )
        except ValueError as exc:  # a destination row that no longer parses: an admin must look
            outcome = SendOutcome(False, permanent=True, detail=f"destination unusable: {exc}")
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
                log.info("sr_delivered", study_key=key, destination=name,
                         attempts=delivery.attempts, detail=outcome.detail)
                return 1
            delivery.last_error = outcome.detail[:2000]
            if outcome.permanent:
                delivery.status = DeliveryStatus.REJECTED
                log.error("sr_delivery_rejected", study_key=key, destination=name,
                          detail=outcome.detail)
            else:
                delay = self.backoff(delivery.attempts)
                delivery.next_attempt_at = utcnow() + timedelta(seconds=delay)
                log.warning("sr_delivery_retry", study_key=key, destination=name,
                            attempts=delivery.attempts, retry_in_s=delay, detail=outcome.detail)
        return 0
