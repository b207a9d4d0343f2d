"""Periodic work of the gateway, run by apscheduler: study completion, delivery retries, and
maintenance (stale job leases, retention purge, daily self-check).

Each job can also be run "now" (``trigger``) so a result is sent the moment it exists, without
waiting for the next tick; apscheduler's max_instances=1 keeps a job from overlapping itself.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from osteogate.gateway.core.config import Settings
from osteogate.gateway.core.logs import get_logger
from osteogate.gateway.store.db import Database
from osteogate.gateway.store.spool import Spool

log = get_logger("osteogate.gateway.operate.scheduler")


class GatewayScheduler:
    def __init__(self) -> None:
        self._scheduler = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(4)},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 30},
            timezone="UTC",
        )

    def add(self, name: str, func: Callable[[], object], seconds: float) -> None:
        def run() -> None:
            try:
                func()
            except Exception:
                # A failing tick (DB briefly locked, PACS glitch) must not kill the schedule.
                log.exception("scheduled_job_failed", job=name)

        self._scheduler.add_job(run, "interval", seconds=seconds, id=name, name=name,
                                next_run_time=datetime.now().astimezone())

    def run_once_at(self, job_id: str, func: Callable[[], object], when: datetime) -> None:
        """A one-shot job at ``when``; scheduling the same id again moves it (replace_existing)."""
        if not self._scheduler.running:
            return
        self._scheduler.add_job(func, "date", run_date=when, id=job_id, replace_existing=True,
                                misfire_grace_time=None)

    def trigger(self, name: str) -> None:
        """Run a job as soon as possible (coalesced with a run already pending)."""
        job = self._scheduler.get_job(name)
        if job is not None:
            job.modify(next_run_time=datetime.now().astimezone())

    def start(self) -> None:
        self._scheduler.start()

    def stop(self) -> None:
        if self._scheduler.running:
            self._scheduler.shutdown(wait=True)


def add_maintenance_jobs(scheduler: GatewayScheduler, settings: Settings, db: Database, spool: Spool) -> None:
    """Stale-lease recovery, retention purge (if enabled) and the daily self-check."""
    from osteogate.gateway.operate.admin import purge, recover_stale_jobs
    from osteogate.gateway.operate.selfcheck import run_selfcheck

    cfg = settings.scheduler
    scheduler.add("stale_jobs", lambda: recover_stale_jobs(db, settings.worker.max_attempts), cfg.stale_jobs_seconds)
    if settings.retention.spool_days > 0:
        scheduler.add("retention", lambda: purge(db, spool, settings.retention.spool_days), cfg.retention_seconds)
    scheduler.add("selfcheck", lambda: run_selfcheck(settings, db), cfg.selfcheck_seconds)
