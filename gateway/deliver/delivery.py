"""Delivery of results (the SR, then the result card) to PACS by C-STORE or DICOMweb STOW-RS
(gateway/deliver/stow.py), with retries that survive restarts.

Every attempt's outcome is in SQL (deliveries table), so a restarted gateway carries on where it
stopped. Transient failures (peer down, timeout, rejected-transient, out-of-resources status) are
retried with exponential backoff; a permanent rejection (rejected-permanent, e.g. unknown called
AE title) or a permanent failure status is marked REJECTED and logged with the reason in words,
not retried blindly: an admin fixes the configuration and uses `osteogate resend`. The decisions
(what is transient, how long to wait) are gateway.core.dicomnet's.

Each destination has its own lane: one thread at a time per destination in this process, lanes of
different destinations side by side, so a PACS that hangs until every timeout expires delays only
its own deliveries. Rows are still claimed one by one (SKIP LOCKED + conditional UPDATE), so
several processes sharing the database never send the same delivery twice.
"""

from __future__ import annotations

import threading
from datetime import timedelta

from osteogate.gateway.core.config import Settings
from osteogate.gateway.core.dicomnet import (
    backoff_seconds,
)
from osteogate.gateway.core.logs import get_logger
from osteogate.gateway.core.metrics import DELIVERIES
from osteogate.gateway.deliver.cstore import send_file
from osteogate.gateway.deliver.outcome import SendOutcome
from osteogate.gateway.store.db import Database, Delivery, DeliveryStatus, StudyResult, utcnow
from osteogate.gateway.store.spool import Spool
from sqlalchemy import or_, select

log = get_logger("osteogate.gateway.deliver.delivery")

# Lanes running at once in one process (each is one thread, busy only while it has work).
MAX_LANES = 32


def result_files(result: StudyResult) -> list[str]:
    """What one delivery of a result sends, in order (the SR, then the result card), as paths
    relative to the reports directory. Results made before result_objects existed: their SR."""
    paths = [obj.path for obj in result.objects]
    return paths or ([result.sr_path] if result.sr_path else [])


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
