"""Study completion: a study with no new instance for ``stable_seconds`` is queued for the worker.

DICOM has no "study complete" message, so quiet time is the signal (as in Orthanc's
StableAge and mercure's series timeout).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

from sqlalchemy import select

from gateway.db import Database, Job, JobStatus, Study, StudyStatus, utcnow
from gateway.logs import get_logger

log = get_logger("gateway.tracker")


class StudyTracker:
    def __init__(self, db: Database, stable_seconds: float, on_queued: Callable[[], None] | None = None) -> None:
        self.db = db
        self.stable_seconds = stable_seconds
        self.on_queued = on_queued

    def queue_stable_studies(self) -> int:
        """Queue every study that has been quiet long enough; returns how many were queued."""
        cutoff = utcnow() - timedelta(seconds=self.stable_seconds)
        queued = 0
        with self.db.session() as session:
            studies = session.execute(
                select(Study)
                .where(Study.status == StudyStatus.RECEIVING, Study.last_received_at <= cutoff)
                .with_for_update(skip_locked=True)
            ).scalars().all()
            for study in studies:
                session.add(Job(study_id=study.id, study_version=study.version, status=JobStatus.PENDING))
                study.status = StudyStatus.QUEUED
                log.info("study_queued", study_key=study.study_key, version=study.version,
                         instances=study.instance_count)
                queued += 1
        if queued and self.on_queued:
            self.on_queued()
        return queued
