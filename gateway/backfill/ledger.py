"""The backfill's plan and states in SQL (gateway/store/backfill.py): every step is one short
transaction, so killing the command at any moment loses at most the retrieve under way, which is
simply done again (the gateway keeps one copy of each instance)."""

from __future__ import annotations

import hashlib
import json
import os
import socket
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from osteogate.gateway.backfill.query import FoundStudy
from osteogate.gateway.core.errors import TemporaryFailure
from osteogate.gateway.core.logs import get_logger, study_key
from osteogate.gateway.store.backfill import BackfillRun, BackfillState, BackfillStudy
from osteogate.gateway.store.db import (
    STUDY_FINISHED,
    Database,
    Instance,
    Job,
    JobStatus,
    Study,
    StudyResult,
    StudyStatus,
    utcnow,
)
from sqlalchemy import func, select, update

log = get_logger("osteogate.gateway.backfill.ledger")

# A run's hold on the store lasts this long without renewal (the engine renews it at every step,
# and at least every poll while waiting).
HOLD_SECONDS = 600
HOLDER = f"{os.getpid()}@{socket.gethostname()}"[:64]


def holder_alive(holder: str | None) -> bool:
    """Whether the process holding a run may still be running: on this host, whether its pid
    exists (a SIGKILLed backfill is taken over at once); elsewhere, until the hold expires."""
    pid, _, host = (holder or "").partition("@")
    if host != socket.gethostname() or not pid.isdigit():
        return True
    if int(pid) == os.getpid():
        return False  # our own, from an earlier run in this process (the scheduled job)
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fingerprint(source: str, filters: dict[str, Any]) -> str:
    """The same source and filters give the same run to resume."""
    return hashlib.sha256(json.dumps([source, filters], sort_keys=True).encode()).hexdigest()


@dataclass
class Counts:
    """Where one run stands (the progress line and /metrics)."""

    found: int = 0
    retrieved: int = 0
    screened: int = 0
    skipped: int = 0
    failed: int = 0
    waiting: int = 0  # found, not yet retrieved
    receiving: int = 0  # retrieved, not yet screened


class _LedgerBase:
    def __init__(self, db: Database, model_sha256: str | None) -> None:
        self.db = db
        # Results of this model count as screened; None (model unknown): any result counts.
        self.model_sha256 = model_sha256

    def _screened_now(self, session: Any, study_id: int) -> bool:
        query = select(StudyResult.id).where(StudyResult.study_id == study_id)
        if self.model_sha256:
            query = query.where(StudyResult.model_sha256 == self.model_sha256)
        return session.execute(query.limit(1)).first() is not None


class PlanRecords(_LedgerBase):
    """The runs and what they found."""

    def start_run(self, source: str, filters: dict[str, Any]) -> tuple[int, bool]:
        """(run id, resumed): an unfinished run of the same source and filters is continued.
        Raises TemporaryFailure while another backfill holds this store (one at a time)."""
        print_ = fingerprint(source, filters)
        with self.db.session(write=True) as session:
            busy = next((r for r in session.execute(select(BackfillRun).where(BackfillRun.held_until > utcnow())
                                                    .with_for_update()).scalars() if holder_alive(r.holder)), None)
            if busy is not None:
                raise TemporaryFailure("another backfill is running on this store",
                                       f"run {busy.id} held by {busy.holder} (renewed while it runs; the hold of a "
                                       f"process killed on another host expires within {HOLD_SECONDS} s)",
                                       "One backfill at a time keeps the load on the PACS predictable: wait for it, "
                                       "or stop it")
            run = session.execute(
                select(BackfillRun).where(BackfillRun.fingerprint == print_, BackfillRun.finished_at.is_(None))
                .order_by(BackfillRun.id.desc()).limit(1)
            ).scalar_one_or_none()
            if run is not None:
                # A study killed mid-retrieve is fetched again: the gateway keeps one copy.
                session.execute(update(BackfillStudy).where(BackfillStudy.state == BackfillState.RETRIEVING)
                                .values(state=BackfillState.FOUND))
                run.holder, run.held_until = HOLDER, utcnow() + timedelta(seconds=HOLD_SECONDS)
                return run.id, True
            run = BackfillRun(source=source[:255], fingerprint=print_, filters=filters, chunks_done=[],
                              holder=HOLDER, held_until=utcnow() + timedelta(seconds=HOLD_SECONDS))
            session.add(run)
            session.flush()
            session.execute(update(BackfillStudy).where(BackfillStudy.state == BackfillState.RETRIEVING)
                            .values(state=BackfillState.FOUND))
            return run.id, False

    def chunks_done(self, run_id: int) -> set[str]:
        with self.db.session() as session:
            run = session.get(BackfillRun, run_id)
            return set(run.chunks_done or []) if run else set()

    def chunk_done(self, run_id: int, key: str) -> None:
        with self.db.session(write=True) as session:
            run = session.get(BackfillRun, run_id)
            if run is not None:
                run.chunks_done = [*(run.chunks_done or []), key]

    def finish_run(self, run_id: int) -> None:
        with self.db.session(write=True) as session:
            run = session.get(BackfillRun, run_id)
            if run is not None:
                run.finished_at = utcnow()

    def hold(self, run_id: int, *, release: bool = False) -> None:
        """Renew this process's hold on the run (or give it up: a clean stop or the end)."""
        with self.db.session(write=True) as session:
            run = session.get(BackfillRun, run_id)
            if run is not None and run.holder == HOLDER:
                run.held_until = None if release else utcnow() + timedelta(seconds=HOLD_SECONDS)

    def judge_found(self, study_uid: str, *, dry_run: bool = False) -> str:
        """What a found study needs, read-only: "screened" (skip), "queued" (the gateway has it,
        screening is pending), "replay" (screened by another model, images still spooled),
        "failed" / "skipped" (an earlier run's verdict stands) or "retrieve"."""
        with self.db.session() as session:
            row = session.execute(select(BackfillStudy).where(BackfillStudy.study_uid == study_uid)).scalar_one_or_none()
            study = session.execute(select(Study).where(Study.study_uid == study_uid)).scalar_one_or_none()
            if study is not None and self._screened_now(session, study.id):
                return "screened"
            if row is not None and row.state in (BackfillState.FAILED, BackfillState.SKIPPED):
                return row.state.value
            if study is None:
                return "retrieve"
            if study.status not in STUDY_FINISHED:
                return "queued"
            purged = session.execute(select(Instance.id).where(Instance.study_id == study.id,
                                                               Instance.purged_at.is_not(None)).limit(1)).first()
            return "retrieve" if purged else "replay"

    def record_found(self, run_id: int, source: str, found: FoundStudy) -> str:
        """Write one found study into the plan; returns :meth:`judge_found`'s verdict."""
        verdict = "skipped" if found.skip_reason else self.judge_found(found.study_uid)
        with self.db.session(write=True) as session:
            row = session.execute(select(BackfillStudy).where(BackfillStudy.study_uid == found.study_uid)
                                  ).scalar_one_or_none()
            if verdict == "screened":
                if row is not None and row.state != BackfillState.SCREENED:
                    row.state, row.screened_at = BackfillState.SCREENED, row.screened_at or utcnow()
                return verdict
            if row is None:
                row = BackfillStudy(study_uid=found.study_uid, study_key=study_key(found.study_uid), source=source[:255],
                                    attempts=0, next_attempt_at=utcnow(), found_at=utcnow())
                session.add(row)
            elif verdict in ("failed", "skipped") and not found.skip_reason:
                return verdict  # an earlier run's verdict stands (--retry-failed resets failures)
            row.run_id = run_id
            row.study_date = found.study_date[:8] or None
            row.modalities = "\\".join(found.modalities)[:64] or None
            row.series_uids = found.series_uids
            row.instances_expected = found.instances
            if found.skip_reason:
                row.state, row.reason = BackfillState.SKIPPED, found.skip_reason
            elif verdict == "queued":
                row.state = BackfillState.RECEIVED
            elif verdict == "replay":
                self._queue_replay(session, found.study_uid)
                row.state, row.reason = BackfillState.RECEIVED, "screened by another model: replay queued"
            elif row.state in (BackfillState.SCREENED, BackfillState.RECEIVED):
                row.state = BackfillState.FOUND  # screened by another model, images gone: fetch again
        return verdict

    @staticmethod
    def _queue_replay(session: Any, study_uid: str) -> None:
        """A replay job, as `osteogate replay` queues one: the study is screened again from the
        spool with the current model instead of being fetched again."""
        study = session.execute(select(Study).where(Study.study_uid == study_uid)).scalar_one()
        session.add(Job(study_id=study.id, study_version=study.version, status=JobStatus.PENDING, reason="replay"))
        study.status = StudyStatus.QUEUED
        log.info("backfill_replay_queued", study_key=study.study_key)

    def retry_failed(self, run_id: int) -> int:
        with self.db.session(write=True) as session:
            return int(session.execute(
                update(BackfillStudy).where(BackfillStudy.state == BackfillState.FAILED)
                .values(state=BackfillState.FOUND, attempts=0, reason=None, next_attempt_at=utcnow(), run_id=run_id)
            ).rowcount or 0)


class StudyStates(_LedgerBase):
    """Each study's way from found to screened."""

    def next_due(self, run_id: int, now: datetime) -> BackfillStudy | None:
        """The oldest study of this run waiting to be fetched whose retry time has come."""
        with self.db.session() as session:
            return session.execute(
                select(BackfillStudy).where(BackfillStudy.run_id == run_id, BackfillStudy.state == BackfillState.FOUND,
                                            BackfillStudy.next_attempt_at <= now)
                .order_by(BackfillStudy.study_date, BackfillStudy.id).limit(1)
            ).scalar_one_or_none()

    def next_retry_at(self, run_id: int) -> datetime | None:
        with self.db.session() as session:
            value = session.execute(select(func.min(BackfillStudy.next_attempt_at)).where(
                BackfillStudy.run_id == run_id, BackfillStudy.state == BackfillState.FOUND)).scalar_one_or_none()
        return value

    def set_state(self, row_id: int, state: BackfillState, reason: str | None = None, *,
                  attempt: bool = False, retry_in: float | None = None) -> BackfillStudy:
        with self.db.session(write=True) as session:
            row = session.get(BackfillStudy, row_id)
            assert row is not None
            row.state, row.reason = state, reason
            if attempt:
                row.attempts += 1
                row.last_attempt_at = utcnow()
            if state == BackfillState.RECEIVED:
                row.retrieved_at = utcnow()
            if retry_in is not None:
                row.next_attempt_at = utcnow() + timedelta(seconds=retry_in)
            return row

    def queue_depth(self) -> int:
        """Classify jobs pending or running in the gateway: the backfill waits while it is long."""
        with self.db.session() as session:
            return int(session.execute(select(func.count()).select_from(Job).where(
                Job.status.in_([JobStatus.PENDING, JobStatus.RUNNING]))).scalar_one())

    def refresh_screened(self) -> int:
        """Received studies the gateway has screened (or failed to screen) since; returns how many
        changed."""
        changed = 0
        with self.db.session(write=True) as session:
            rows = session.execute(
                select(BackfillStudy, Study).join(Study, Study.study_uid == BackfillStudy.study_uid)
                .where(BackfillStudy.state == BackfillState.RECEIVED)
            ).all()
            for row, study in rows:
                if self._screened_now(session, study.id) and study.status in STUDY_FINISHED:
                    row.state, row.screened_at, row.reason = BackfillState.SCREENED, utcnow(), None
                    changed += 1
                elif study.status == StudyStatus.FAILED:
                    row.state = BackfillState.FAILED
                    row.reason = f"the gateway could not screen it (osteogate show {study.study_key})"
                    changed += 1
        return changed

    def counts(self, run_id: int) -> Counts:
        with self.db.session() as session:
            by_state = dict(session.execute(
                select(BackfillStudy.state, func.count()).where(BackfillStudy.run_id == run_id)
                .group_by(BackfillStudy.state)).all())
            retrieved = session.execute(select(func.count()).select_from(BackfillStudy).where(
                BackfillStudy.run_id == run_id, BackfillStudy.retrieved_at.is_not(None))).scalar_one()
        get = lambda state: int(by_state.get(state, 0))  # noqa: E731
        return Counts(found=sum(int(v) for v in by_state.values()), retrieved=int(retrieved),
                      screened=get(BackfillState.SCREENED), skipped=get(BackfillState.SKIPPED),
                      failed=get(BackfillState.FAILED),
                      waiting=get(BackfillState.FOUND) + get(BackfillState.RETRIEVING),
                      receiving=get(BackfillState.RECEIVED))

    def failures(self, run_id: int, limit: int = 20) -> list[tuple[str, str]]:
        """(study key, reason) of this run's failed studies, for the closing report."""
        with self.db.session() as session:
            return [(k, r or "") for k, r in session.execute(
                select(BackfillStudy.study_key, BackfillStudy.reason).where(
                    BackfillStudy.run_id == run_id, BackfillStudy.state == BackfillState.FAILED).limit(limit))]


class Ledger(PlanRecords, StudyStates):
    """SQL operations of one backfill run: its plan (PlanRecords) and its studies' states (StudyStates)."""
