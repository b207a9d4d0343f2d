"""The running gateway: wires listener, store, tracker, worker, delivery and scheduler together."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from osteogate.gateway.backfill.metrics import BackfillCollector
from osteogate.gateway.core.config import Settings
from osteogate.gateway.core.logs import get_logger, study_key
from osteogate.gateway.core.metrics import REGISTRY
from osteogate.gateway.deliver.delivery import DeliveryManager
from osteogate.gateway.groundtruth.gate import SiteGate
from osteogate.gateway.groundtruth.mllp import MllpListener
from osteogate.gateway.operate.health import HealthServer, StoreCollector
from osteogate.gateway.operate.preflight import ClassifierCache, preflight, warn_unsafe_defaults
from osteogate.gateway.operate.scheduler import GatewayScheduler, add_maintenance_jobs
from osteogate.gateway.receive.ingest import Ingestor
from osteogate.gateway.receive.scp import StorageSCP
from osteogate.gateway.receive.tracker import StudyTracker
from osteogate.gateway.report.publisher import ReportPublisher
from osteogate.gateway.store.spool import Spool
from osteogate.gateway.store.wiring import open_store
from osteogate.gateway.work.worker import ClassifierWorker

log = get_logger("osteogate.gateway.operate.service")



class Gateway:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        preflight(settings)  # ports and files first: nothing is loaded for a start that cannot work
        self.store = open_store(settings, create=True)
        self.db, self.spool, self.reports = self.store.db, self.store.spool, self.store.reports
        self.scheduler = GatewayScheduler()
        self.tracker = StudyTracker(self.db, settings.study.stable_seconds, on_queued=self._wake_worker)
        self.delivery = DeliveryManager(settings, self.db, self.reports)
        self.classifiers = ClassifierCache(settings) if settings.worker.enabled else None
        self.site_gate = site_gate(settings, self.db, self.scheduler)
        self.worker = (
            ClassifierWorker(settings, self.db, self.spool, ReportPublisher(settings, self.reports), self.classifiers,
                             on_result=lambda: self.scheduler.trigger("delivery"), site_gate=self.site_gate)
            if self.classifiers else None
        )
        ingestor = Ingestor(self.db, self.spool, max_instance_bytes=settings.dicom.max_instance_mb * 2**20)
        self.scp = StorageSCP(settings.dicom, ingestor, accepting=self.refusal_reason, on_stored=self._instance_stored)
        # DXA results (HL7 ORU over MLLP): only where the site configured a port for its feed.
        self.mllp = MllpListener(settings.groundtruth, self.db) if settings.groundtruth.mllp_enabled else None
        self._stopped = threading.Event()
        self.http: HealthServer | None = None
        self._collector = StoreCollector(self.db, self.spool.free_bytes)
        self._backfill_collector = BackfillCollector(self.db)
        self._backfill_stop = threading.Event()

    def _add_backfill_job(self) -> None:
        """``[backfill] enabled``: the configured backfill runs (and resumes) every interval."""
        cfg = self.settings.backfill
        if cfg.enabled and cfg.source:
            from osteogate.gateway.backfill.setup import run_scheduled

            self.scheduler.add("backfill", lambda: run_scheduled(self.settings, self.db, self._backfill_stop),
                               cfg.interval_seconds)

    def health(self) -> dict[str, Any]:
        """What /healthz reports.

        ``healthy`` (HTTP 200) when database, spool disk, worker and model are fine, else HTTP 503.
        ``status`` is "ok", "degraded" (healthy, but SRs are not reaching a destination: each one
        failing is listed in ``failing_destinations``; still HTTP 200, since restarting the
        gateway cannot fix a PACS) or "unhealthy".
        """
        from osteogate.gateway.operate.queries import failing_destinations

        checks: dict[str, Any] = {}
        try:
            checks["database"] = self.db.ping()
            checks["failing_destinations"] = failing_destinations(self.db)
        except Exception as exc:
            checks["database"] = False
            checks["database_error"] = type(exc).__name__
            checks["failing_destinations"] = []
        refusal = self.refusal_reason()
        checks["spool_disk"] = refusal is None
        checks["spool_free_mb"] = round(self.spool.free_bytes() / 2**20)
        if refusal:
            checks["spool_disk_error"] = refusal
        checks["worker_alive"] = self.worker.alive if self.worker else None
        checks["model_loaded"] = self.classifiers.loaded if self.classifiers else None
        checks["healthy"] = bool(checks["database"] and checks["spool_disk"]
                                 and checks["worker_alive"] is not False and checks["model_loaded"] is not False)
        gate = self.site_gate.state() if self.site_gate else None
        if gate is not None:
            checks["site_gate"] = gate.to_dict()
        checks["status"] = ("unhealthy" if not checks["healthy"]
                            else "degraded" if checks["failing_destinations"] or (gate and gate.degraded) else "ok")
        if gate is not None and gate.degraded:
            checks["degraded_reason"] = f"site gate closed: {gate.reason}"
        return checks

    def _instance_stored(self, study_uid: str) -> None:
        # Check for completion right when this study can become stable, not up to one polling
        # interval later; each new instance moves the check. The interval scan stays as the
        # safety net (and covers restarts).
        when = datetime.now(UTC) + timedelta(seconds=self.settings.study.stable_seconds + 0.02)
        self.scheduler.run_once_at(f"stable:{study_key(study_uid)}", self.tracker.queue_stable_studies, when)

    def _wake_worker(self) -> None:
        if self.worker:
            self.worker.wake.set()

    def refusal_reason(self) -> str | None:
        free_mb = self.spool.free_bytes() / (1024 * 1024)
        if free_mb < self.settings.storage.min_free_mb:
            return f"spool disk has {free_mb:.0f} MB free, below storage.min_free_mb"
        return None

    @property
    def port(self) -> int:
        return self.scp.port

    def start(self) -> None:
        remove_orphans(self.spool, self.reports)
        if self.classifiers:
            self.classifiers()  # load the model before accepting work: fail fast on a bad checkpoint
        self.scheduler.add("study_completion", self.tracker.queue_stable_studies,
                           self.settings.study.check_interval_seconds)
        # Lanes run in their own threads: a tick never waits for a slow destination.
        self.scheduler.add("delivery", lambda: self.delivery.run_due(wait=False),
                           self.settings.delivery.check_interval_seconds)
        if self.site_gate:  # new DXA results may open (or drift close) the gate without new studies
            self.scheduler.add("site_gate", self.site_gate.refresh, self.settings.gate.refresh_seconds)
        add_maintenance_jobs(self.scheduler, self.settings, self.db, self.spool)
        self._add_backfill_job()
        self.scheduler.start()
        if self.worker:
            self.worker.start()
        if self.settings.http.enabled:
            # Before the listener: once the DICOM port answers, so does the health check.
            REGISTRY.register(self._collector)
            REGISTRY.register(self._backfill_collector)
            self.http = HealthServer(self.settings.http.bind, self.settings.http.port, self.health)
            self.http.start()
        self.scp.start()
        if self.mllp:
            self.mllp.start()
        log.info("gateway_started", ae_title=self.settings.dicom.ae_title, port=self.port,
                 destinations=[str(d) for d in self.settings.delivery.destinations],
                 stable_seconds=self.settings.study.stable_seconds)
        warn_unsafe_defaults(self.settings, port=self.port)

    def stop(self) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.scp.stop()  # stop taking new work first
        if self.mllp:
            self.mllp.stop()
        if self.http:
            self.http.stop()
            REGISTRY.unregister(self._collector)
            REGISTRY.unregister(self._backfill_collector)
        self._backfill_stop.set()  # a scheduled backfill ends its current step and returns
        if self.worker:
            self.worker.stop()
        self.scheduler.stop()
        self.store.dispose()
        self.spool.release_incoming()
        self.reports.release_incoming()
        log.info("gateway_stopped")

    def serve_forever(self) -> None:
        """Run until SIGINT/SIGTERM, then stop cleanly."""
        run_until_signal(self.start, self.stop)


def site_gate(settings: Settings, db: Any, scheduler: GatewayScheduler) -> SiteGate | None:
    """The site gate when ``gate.site_validation`` is not "off"; releasing held SRs wakes delivery."""
    if settings.gate.site_validation == "off":
        return None
    return SiteGate(settings.gate, db, settings.groundtruth.match_days,
                    on_release=lambda _count: scheduler.trigger("delivery"),
                    on_open=(lambda _state: replay_withheld(db)) if settings.gate.site_validation == "required" else None)


def replay_withheld(db: Any) -> list[int]:
    """Queue a replay of every study whose latest result the gate reported as not assessed
    ("required" mode): once the gate is open they reach the PACS as a new, assessed version."""
    from osteogate.gateway.operate.replay import plan_replay, queue_replay
    from osteogate.gateway.store.db import Study, StudyResult
    from sqlalchemy import func, select

    latest = (select(StudyResult.study_id, func.max(StudyResult.version).label("version"))
              .group_by(StudyResult.study_id).subquery())
    with db.session() as session:
        uids = session.execute(
            select(Study.study_uid).join(latest, latest.c.study_id == Study.id)
            .join(StudyResult, (StudyResult.study_id == Study.id) & (StudyResult.version == latest.c.version))
            .where(StudyResult.withheld.is_not(None))).scalars().all()
    jobs = queue_replay(db, plan_replay(db, list(uids))) if uids else []
    if jobs:
        log.info("site_gate_replays", studies=len(jobs))
    return jobs


def remove_orphans(*stores: Spool) -> None:
    """Temporary files of processes that died mid-write (their own per-process folders) go at once;
    a scan for stray temporaries of older releases runs in the background (a big spool takes a while)."""
    for store in stores:
        removed = store.remove_orphans(legacy_scan=False)
        if removed:
            log.warning("orphans_removed", count=removed, store=store.root.name)

    def scan() -> None:
        for store in stores:
            try:
                removed = store.remove_legacy_temporaries()
            except OSError:
                log.warning("orphan_scan_failed", store=store.root.name)
                continue
            if removed:
                log.warning("orphans_removed", count=removed, store=store.root.name, legacy=True)

    threading.Thread(target=scan, name="osteogate-orphan-scan", daemon=True).start()


def run_until_signal(start: Callable[[], None], stop: Callable[[], None]) -> None:
    done = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("signal_received", signal=signal.Signals(signum).name)
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    start()
    try:
        done.wait()
    finally:
        stop()


class WorkerService:
    """``osteogate worker``: classification + delivery + maintenance, no DICOM listener.

    For scale-out: several of these (and one ``serve`` that receives) share one PostgreSQL
    database and one spool (a shared filesystem). Job and delivery claims are exclusive, so
    each study is classified once and each SR sent once, whichever process does it. Study
    completion stays with ``serve``: its tracker is the one writer of new classify jobs.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        preflight(settings, listeners=False)
        self.store = open_store(settings, create=True)
        self.db, self.spool, self.reports = self.store.db, self.store.spool, self.store.reports
        self.scheduler = GatewayScheduler()
        self.delivery = DeliveryManager(settings, self.db, self.reports)
        self.classifiers = ClassifierCache(settings)
        self.site_gate = site_gate(settings, self.db, self.scheduler)
        self.worker = ClassifierWorker(settings, self.db, self.spool, ReportPublisher(settings, self.reports), self.classifiers,
                                       on_result=lambda: self.scheduler.trigger("delivery"), site_gate=self.site_gate)

    def start(self) -> None:
        remove_orphans(self.reports)
        self.classifiers()  # fail fast on a bad checkpoint
        self.scheduler.add("delivery", lambda: self.delivery.run_due(wait=False),
                           self.settings.delivery.check_interval_seconds)
        if self.site_gate:  # new DXA results may open (or drift close) the gate without new studies
            self.scheduler.add("site_gate", self.site_gate.refresh, self.settings.gate.refresh_seconds)
        add_maintenance_jobs(self.scheduler, self.settings, self.db, self.spool)
        self.scheduler.start()
        self.worker.start()
        log.info("worker_started", worker=self.worker.id,
                 destinations=[str(d) for d in self.settings.delivery.destinations])
        warn_unsafe_defaults(self.settings, listener=False)

    def stop(self) -> None:
        self.worker.stop()
        self.scheduler.stop()
        self.store.dispose()
        self.reports.release_incoming()
        log.info("worker_stopped", worker=self.worker.id)

    def serve_forever(self) -> None:
        run_until_signal(self.start, self.stop)
