"""Claiming classify jobs: a conditional UPDATE (plus SKIP LOCKED on PostgreSQL) so several
workers, in threads, processes or hosts, never take the same job; a lease, so a job whose worker
died is taken again; and the crash-counting that fails a job which kills its process each time."""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Collection
from datetime import timedelta

from osteogate.gateway.core.config import Settings
from osteogate.gateway.core.logs import get_logger
from osteogate.gateway.store.db import Database, Job, JobStatus, Study, StudyStatus, utcnow
from osteogate.gateway.work.results import ResultRecorder
from sqlalchemy import or_, select, update

log = get_logger("osteogate.gateway.work.jobs")


# A random token per process: a restarted container has the same hostname and often the same PID
# as the one that died, and its jobs must still be recognised as orphaned.
_PROCESS_TOKEN = secrets.token_hex(4)


def worker_id() -> str:
    return f"{socket.gethostname()[:40]}:{os.getpid()}:{_PROCESS_TOKEN}"


def _orphaned_here(owner: str, host: str) -> bool:
    """True if ``owner`` (a worker_id) ran on this host in a process that no longer exists."""
    parts = owner.split(":")
    if len(parts) != 3 or parts[0] != host or not parts[1].isdigit():
        return False
    pid, token = int(parts[1]), parts[2]
    if pid == os.getpid():
        return token != _PROCESS_TOKEN
    return not _pid_alive(pid)


class JobClaims:
    """The job table as one worker sees it: claim the next job, recover this host's dead ones."""

    def __init__(self, settings: Settings, db: Database, owner: str, results: ResultRecorder) -> None:
        self.settings = settings
        self.db = db
        self.id = owner
        self.results = results

    def recover_own_dead_jobs(self) -> int:
        """Jobs left 'running' by an earlier process on this host whose PID is gone: back to pending,
        or failed ("worker died N times") once they have used up worker.max_attempts.

        A job that kills its process (out of memory, a crashing decoder) would otherwise come back
        at every restart and take the listener down with it each time. Other hosts' jobs are left
        to lease expiry (admin.recover_stale_jobs): we cannot tell whether they are alive.
        """
        host = socket.gethostname()[:40]
        recovered = failed = 0
        with self.db.session() as session:
            jobs = session.execute(select(Job).where(Job.status == JobStatus.RUNNING)).scalars().all()
            for job in jobs:
                if not _orphaned_here(job.worker or "", host):
                    continue
                job.lease_until = None
                if job.attempts >= self.settings.worker.max_attempts:
                    self.results.mark_failed(job, f"worker died {job.attempts} times while processing this study")
                    failed += 1
                else:
                    job.status = JobStatus.PENDING
                    recovered += 1
        if recovered:
            log.warning("jobs_recovered", count=recovered, reason="previous worker process died")
        if failed:
            log.error("jobs_failed", count=failed, reason="worker died on each attempt (max_attempts spent)")
        return recovered + failed

    def claim(self, only: Collection[int] | None = None) -> int | None:
        """Take the oldest claimable job; ``only`` limits the choice (``osteogate replay`` takes
        just its own jobs, so a replay run never classifies live traffic with another model).

        A job that has used up its attempts is never claimed again, whatever its state: the
        crash-counting in recover_own_dead_jobs and admin.recover_stale_jobs then fails it.
        """
        now = utcnow()
        lease = now + timedelta(seconds=self.settings.worker.lease_seconds)
        claimable = or_(
            Job.status == JobStatus.PENDING,
            (Job.status == JobStatus.RUNNING) & (Job.lease_until < now),
        ) & (Job.attempts < self.settings.worker.max_attempts)
        if only is not None:
            claimable = claimable & Job.id.in_(list(only))
        with self.db.session() as session:
            job_id = self.db.claim_one(session, Job, claimable, Job.id, {
                "status": JobStatus.RUNNING, "worker": self.id, "lease_until": lease, "started_at": now,
                "attempts": Job.attempts + 1,
            })
            if job_id is None:
                return None
            session.execute(
                update(Study).where(Study.id == select(Job.study_id).where(Job.id == job_id).scalar_subquery())
                .where(Study.status == StudyStatus.QUEUED).values(status=StudyStatus.PROCESSING)
            )
        return job_id


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

