"""Admin operations behind ``osteogate resend | purge`` and the maintenance jobs (replay:
gateway/operate/replay.py).

Everything here works on the shared store (SQL + spool + reports), so it is safe to run while
``osteogate serve`` runs: jobs and deliveries are claimed exclusively, whichever process takes
them, and the CLI waits on the rows, not on its own work.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from osteogate.gateway.core.config import Destination, Settings
from osteogate.gateway.core.errors import ExitCode, OsteoGateError
from osteogate.gateway.core.logs import get_logger
from osteogate.gateway.operate.queries import find_study
from osteogate.gateway.store.db import (
    STUDY_FINISHED,
    Database,
    Delivery,
    DeliveryStatus,
    Job,
    JobStatus,
    Study,
    StudyResult,
    StudyStatus,
    as_utc,
    utcnow,
)
from osteogate.gateway.store.spool import Spool
from sqlalchemy import select, update
from sqlalchemy.orm import selectinload

log = get_logger("osteogate.gateway.operate.admin")

FINISHED = STUDY_FINISHED
Progress = Callable[[int], None]  # called with how many items were completed since the last call


class AdminError(OsteoGateError, RuntimeError):
    """An admin request that cannot be carried out (unknown study, nothing to send...)."""

    exit_code = ExitCode.NOINPUT


# -- resend ------------------------------------------------------------------------------------


def latest_sr_result(db: Database, study: str) -> tuple[int, str]:
    """(result id, SR SOP Instance UID) of the newest SR made for a study (by UID or study key)."""
    with db.session() as session:
        found = find_study(session, study)
        if found is None:
            raise AdminError(f"no study {study}", None, "Name it by Study Instance UID or study key "
                             "(osteogate studies lists both)")
        row = session.execute(
            select(StudyResult.id, StudyResult.sr_sop_instance_uid)
            .where(StudyResult.study_id == found.id, StudyResult.sr_path.is_not(None))
            .order_by(StudyResult.version.desc()).limit(1)
        ).first()
        if row is None:
            raise AdminError(f"no SR for study {study}", f"it is {found.status.value} and no SR was made",
                             "`osteogate show` says why")
        return int(row[0]), str(row[1])


@dataclass(frozen=True)
class ResendTarget:
    destination: str
    # "queue": a new delivery; "retry-now": the pending delivery ``delivery_id`` is made due now
    # (never a second retry loop for the same SR and destination); "skip": already delivered;
    # "held": the site gate holds it (it goes when the gate opens; a second one would be a double).
    action: str
    delivery_id: int | None = None


def plan_resend(existing: Sequence[tuple[int, str, DeliveryStatus]], asked: Sequence[str],
                configured: Sequence[str]) -> list[ResendTarget]:
    """Where ``resend`` sends an SR, from the SR's earlier deliveries ``(id, destination, status)``.

    Asked (``--to``): exactly there, even where it was sent before (that is what was asked).
    Not asked: the configured destinations (or, with none, those the SR was queued for before),
    except where the SR is already delivered. Either way, a destination with a delivery of this
    SR still pending gets that delivery retried now rather than a second one, and one the site
    gate holds stays held: the gate, not an admin, decides when it goes.
    """
    pending = {dest: row_id for row_id, dest, status in sorted(existing) if status == DeliveryStatus.PENDING}
    held = {dest for _, dest, status in existing if status == DeliveryStatus.HELD}
    sent = {dest for _, dest, status in existing if status == DeliveryStatus.SENT}
    earlier = list(dict.fromkeys(dest for _, dest, _ in sorted(existing)))
    targets = list(dict.fromkeys(asked or configured or earlier))
    plan = []
    for destination in targets:
        if destination in pending:
            plan.append(ResendTarget(destination, "retry-now", pending[destination]))
        elif destination in held:
            plan.append(ResendTarget(destination, "held"))
        elif destination in sent and not asked:
            plan.append(ResendTarget(destination, "skip"))
        else:
            plan.append(ResendTarget(destination, "queue"))
    return plan


def resend_latest(db: Database, settings: Settings, study: str,
                  destinations: Sequence[Destination] | None) -> tuple[str, list[ResendTarget]]:
    """Queue the newest SR of a study again per :func:`plan_resend`; returns (SR UID, plan) with
    each planned delivery's id filled in (skipped ones have none)."""
    result_id, sr_uid = latest_sr_result(db, study)
    asked = [str(d) for d in destinations or []]
    configured = [str(d) for d in settings.delivery.destinations]
    with db.session(write=True) as session:
        query = select(StudyResult).where(StudyResult.id == result_id)
        if db.is_postgres:
            query = query.with_for_update()  # two resends at once must not both queue a delivery
        result = session.execute(query).scalar_one()
        existing = [(d.id, d.destination, d.status) for d in result.deliveries]
        plan = plan_resend(existing, asked, configured)
        if not plan:
            raise AdminError("nowhere to send the SR", "no --to given, no delivery.destinations configured, and "
                             "the SR was never queued anywhere", "Give --to AET@HOST:PORT",
                             exit_code=ExitCode.USAGE)
        done: list[ResendTarget] = []
        for target in plan:
            if target.action == "retry-now":
                session.execute(update(Delivery).where(Delivery.id == target.delivery_id,
                                                       Delivery.status == DeliveryStatus.PENDING)
                                .values(next_attempt_at=utcnow()))
                done.append(target)
            elif target.action == "queue":
                delivery = Delivery(result_id=result_id, destination=target.destination,
                                    status=DeliveryStatus.PENDING)
                session.add(delivery)
                session.flush()
                done.append(ResendTarget(target.destination, "queue", delivery.id))
            else:
                done.append(target)
        log.info("sr_requeued", study_key=result.study.study_key,
                 plan=[f"{t.destination}: {t.action}" for t in done])
    return sr_uid, done


def delivery_states(db: Database, delivery_ids: Sequence[int]) -> list[tuple[str, str, str | None]]:
    """(destination, status, last error) per delivery."""
    with db.session() as session:
        rows = session.execute(select(Delivery.destination, Delivery.status, Delivery.last_error)
                               .where(Delivery.id.in_(list(delivery_ids))).order_by(Delivery.id)).all()
    return [(dest, status.value, error) for dest, status, error in rows]


# -- purge -------------------------------------------------------------------------------------


@dataclass
class PurgeReport:
    studies: list[str] = field(default_factory=list)  # study keys (never UIDs in logs)
    files: int = 0
    bytes: int = 0


def purgeable_study_ids(db: Database, older_than_days: float, now: datetime | None = None) -> list[int]:
    """Studies whose spooled images may go: finished, fully delivered, quiet for long enough.

    Kept, whatever their age: anything still receiving/queued/processing, failed studies (they
    need a replay), and any study with a delivery not SENT (pending or rejected: the images may
    be needed to make the SR again). A done study must have been delivered at least once.
    """
    cutoff = (now or utcnow()) - timedelta(days=older_than_days)
    with db.session() as session:
        studies = session.execute(
            select(Study).where(Study.status.in_([StudyStatus.DONE, StudyStatus.SKIPPED]),
                                Study.last_received_at < cutoff)
            .options(selectinload(Study.results).selectinload(StudyResult.deliveries),
                     selectinload(Study.instances), selectinload(Study.jobs))
            .order_by(Study.last_received_at)
        ).scalars().all()
        return [s.id for s in studies if _purge_safe(s)]


def _purge_safe(study: Study) -> bool:
    if all(i.purged_at for i in study.instances):
        return False  # nothing left to remove
    if any(j.status in (JobStatus.PENDING, JobStatus.RUNNING) for j in study.jobs):
        return False
    deliveries = [d for r in study.results for d in r.deliveries]
    # A withdrawn delivery (held by the site gate, then superseded) will never be sent: it does
    # not keep the images; a held, pending or rejected one does (release or resend may need them).
    if any(d.status not in (DeliveryStatus.SENT, DeliveryStatus.WITHDRAWN) for d in deliveries):
        return False
    if study.status == StudyStatus.DONE:
        latest = study.results[-1] if study.results else None
        return bool(latest and latest.deliveries)
    return True


def purge(
    db: Database, spool: Spool, older_than_days: float, dry_run: bool = False, progress: Progress | None = None,
) -> PurgeReport:
    """Remove spooled image files of purgeable studies; the SQL rows stay, marked ``purged_at``.

    SRs under reports/ are kept: they are small, and ``resend`` needs them.
    """
    report = PurgeReport()
    now = utcnow()
    for study_id in purgeable_study_ids(db, older_than_days, now):
        _purge_study(db, spool, study_id, older_than_days, now, dry_run, report)
        if progress:
            progress(1)
    if report.studies and not dry_run:
        log.info("spool_purged", studies=len(report.studies), files=report.files, bytes=report.bytes,
                 older_than_days=older_than_days)
    return report


def _purge_study(db: Database, spool: Spool, study_id: int, days: float, now: datetime, dry_run: bool,
                 report: PurgeReport) -> None:
    with db.session() as session:
        query = select(Study).where(Study.id == study_id)
        if db.is_postgres:
            query = query.with_for_update()  # an arriving instance waits until we are done
        study = session.execute(query).scalar_one()
        # Checked again under the lock: a new instance or a replay may have come in meanwhile.
        if study.status not in (StudyStatus.DONE, StudyStatus.SKIPPED) or \
                as_utc(study.last_received_at) >= now - timedelta(days=days) or not _purge_safe(study):
            return
        report.studies.append(study.study_key)
        for instance in study.instances:
            if instance.purged_at:
                continue
            path = spool.absolute(instance.path)
            report.files += 1
            report.bytes += instance.size_bytes
            if dry_run:
                continue
            with contextlib.suppress(FileNotFoundError):  # already gone: still record it as purged
                path.unlink()
            instance.purged_at = now
        if not dry_run:
            _remove_empty_dirs(spool, study.study_uid)


def _remove_empty_dirs(spool: Spool, study_uid: str) -> None:
    """Series and study directories go when empty; a file that arrived meanwhile keeps them."""
    study_dir = spool.absolute(study_uid)
    if not study_dir.is_dir():
        return
    for series_dir in study_dir.iterdir():
        if series_dir.is_dir():
            with contextlib.suppress(OSError):
                os.rmdir(series_dir)
    with contextlib.suppress(OSError):
        os.rmdir(study_dir)


# -- stale jobs ------------------------------------------------------------------------------------


def recover_stale_jobs(db: Database, max_attempts: int) -> dict[str, int]:
    """Running jobs whose lease expired (worker died or hung): back to pending, or failed if spent.

    Workers would take expired jobs anyway; doing it here makes them visible (logged, counted)
    and stops a job that kills its worker every time (e.g. out of memory) from looping forever:
    attempts count every claim, so a job whose worker died ``max_attempts`` times is failed with
    "worker died N times", and so is a pending job left with its attempts spent.
    """
    now = utcnow()
    counts = {"requeued": 0, "failed": 0}
    expired = (Job.status == JobStatus.RUNNING) & (Job.lease_until < now)
    spent_pending = (Job.status == JobStatus.PENDING) & (Job.attempts >= max_attempts)
    with db.session() as session:
        query = select(Job).where(expired | spent_pending)
        if db.is_postgres:
            query = query.with_for_update(skip_locked=True)
        for job in session.execute(query).scalars():
            spent = job.attempts >= max_attempts
            values: dict[str, object] = {"lease_until": None,
                                         "status": JobStatus.FAILED if spent else JobStatus.PENDING}
            if spent:
                values |= {"finished_at": now,
                           "error": f"worker died {job.attempts} times (lease expired: the worker died or hung)"}
            # Conditional on the row still matching, so a worker renewing its lease right now wins.
            changed = session.execute(update(Job).where(Job.id == job.id, expired | spent_pending).values(**values)
                                      .execution_options(synchronize_session=False)).rowcount
            if changed and job.study.version == job.study_version:
                # The study's status follows its job, so `studies` does not show a dead run as live.
                if spent:
                    job.study.status = StudyStatus.FAILED
                elif job.study.status == StudyStatus.PROCESSING:
                    job.study.status = StudyStatus.QUEUED
            counts["failed" if spent else "requeued"] += changed
            if changed:
                log.warning("stale_job_recovered", job=job.id, study_key=job.study.study_key,
                            worker=job.worker, attempts=job.attempts, outcome="failed" if spent else "requeued")
    return counts
