"""Replay: classify finished studies again from the spool (``osteogate replay``).

Jobs are queued in SQL with the replay's model and destinations, so whichever process takes
them (the command's own worker, or a running ``serve``/``worker``) runs them the same way; the
command waits on the rows, not on its own work.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from osteogate.gateway.core.logs import get_logger
from osteogate.gateway.operate.admin import FINISHED, AdminError, Progress
from osteogate.gateway.operate.queries import find_study
from osteogate.gateway.store.db import Database, Delivery, Job, JobStatus, Study, StudyResult, StudyStatus
from sqlalchemy import select
from sqlalchemy.orm import selectinload

log = get_logger("osteogate.gateway.operate.replay")


@dataclass(frozen=True)
class ReplayCandidate:
    study_uid: str
    study_key: str
    status: str
    # Why the study is left alone; None when it will be replayed.
    refusal: str | None = None


def plan_replay(
    db: Database, study_uids: Sequence[str] = (), since: datetime | None = None, status: str | None = None,
) -> list[ReplayCandidate]:
    """Which studies a replay would take, and why any named one would be left alone.

    Studies are named by Study Instance UID or by the study key logs and ``show`` print. A name
    that matches no study raises AdminError (exit 66), dry run or not: a typo never passes as
    "nothing to do".
    """
    with db.session() as session:
        named: list[int] = []
        unknown: list[str] = []
        for ident in study_uids:
            found = find_study(session, ident)
            if found is None:
                unknown.append(ident)
            else:
                named.append(found.id)
        if unknown:
            shown = ", ".join(_shown(u) for u in unknown[:3]) + (" ..." if len(unknown) > 3 else "")
            raise AdminError(f"no study {shown}", None, "Name studies by Study Instance UID or study key "
                             "(osteogate studies lists both); nothing was replayed")
        query = select(Study).options(selectinload(Study.instances)).order_by(Study.last_received_at)
        if study_uids:
            query = query.where(Study.id.in_(named))
        if since is not None:
            query = query.where(Study.last_received_at >= since)
        if status:
            query = query.where(Study.status == StudyStatus(status))
        studies = session.execute(query).scalars().all()
        return [ReplayCandidate(s.study_uid, s.study_key, s.status.value, _replay_refusal(s)) for s in studies]


def _shown(ident: str) -> str:
    """An operator's argument quoted for an error line: printable, and cut when long."""
    text = ident if ident.isprintable() else ident.encode("unicode_escape").decode("ascii")
    return repr(text[:80] + ("..." if len(text) > 80 else ""))


def _replay_refusal(study: Study) -> str | None:
    if study.status not in FINISHED:
        # Receiving/queued/processing: a run is coming or under way; replaying now would race it.
        return f"study is {study.status.value}: wait until it is finished"
    if any(i.purged_at for i in study.instances):
        return "spooled images were purged by retention"
    return None


def queue_replay(db: Database, plan: Sequence[ReplayCandidate], model_path: Path | None = None,
                 destinations: Sequence[str] | None = None) -> list[int]:
    """Insert a replay job per eligible study (study -> queued); returns the job ids.

    ``destinations`` (``replay --to``) is stored on each job, so the result goes there whichever
    process runs the job: a running gateway's worker may take it before this command does.
    """
    job_ids: list[int] = []
    uids = [c.study_uid for c in plan if c.refusal is None]
    with db.session() as session:
        query = select(Study).where(Study.study_uid.in_(uids), Study.status.in_(FINISHED))
        if db.is_postgres:
            query = query.with_for_update(skip_locked=True)
        for study in session.execute(query).scalars():
            job = Job(study_id=study.id, study_version=study.version, status=JobStatus.PENDING, reason="replay",
                      model_path=str(model_path.resolve()) if model_path else None,
                      destinations=list(destinations) if destinations else None)
            session.add(job)
            study.status = StudyStatus.QUEUED
            session.flush()
            job_ids.append(job.id)
            log.info("replay_queued", study_key=study.study_key, job=job.id, model=model_path.name if model_path else None)
    return job_ids


def job_states(db: Database, job_ids: Sequence[int]) -> dict[int, JobStatus]:
    with db.session() as session:
        rows = session.execute(select(Job.id, Job.status).where(Job.id.in_(list(job_ids)))).all()
    return {job_id: status for job_id, status in rows}


def wait_for_jobs(
    db: Database,
    job_ids: Sequence[int],
    run_one: Callable[[], bool] | None,
    timeout: float,
    progress: Progress | None = None,
    poll: float = 0.5,
) -> dict[int, JobStatus]:
    """Run (``run_one``) and/or wait until every job is done or failed, or the timeout passes.

    Another process (a running ``serve`` or ``worker``) may take some of the jobs: only the rows'
    states count, whoever did the work.
    """
    deadline = time.monotonic() + timeout
    finished_before = 0
    while True:
        states = job_states(db, job_ids)
        finished = sum(s in (JobStatus.DONE, JobStatus.FAILED) for s in states.values())
        if progress and finished > finished_before:
            progress(finished - finished_before)
        finished_before = finished
        if finished == len(job_ids) or time.monotonic() > deadline:
            return states
        if run_one is None or not run_one():
            time.sleep(poll)


def job_deliveries(db: Database, job_ids: Sequence[int]) -> list[int]:
    """The delivery rows of the results these jobs made (whichever process ran them)."""
    with db.session() as session:
        return list(session.execute(select(Delivery.id).join(StudyResult)
                                    .where(StudyResult.job_id.in_(list(job_ids)))).scalars())


