"""Study completion: a study with no new instance for ``stable_seconds`` is queued for the worker.

DICOM has no "study complete" message, so quiet time is the signal (as in Orthanc's
StableAge and mercure's series timeout).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import timedelta

from osteogate.gateway.core.logs import get_logger
from osteogate.gateway.store.db import Database, Job, JobStatus, Study, StudyStatus, utcnow
from sqlalchemy import select, update

log = get_logger("osteogate.gateway.receive.tracker")


class StudyTracker:
    def __init__(self, db: Database, stable_seconds: float, on_queued: Callable[[], None] | None = None) -> None:
        self.db = db
        self.stable_seconds = stable_seconds
        self.on_queued = on_queued
        self._lock = threading.Lock()

    def queue_stable_studies(self) -> int:
        """Queue every study that has been quiet long enough; returns how many were queued."""
        with self._lock:  # one scan at a time in this process; other processes: see below
            queued = self._queue()
        if queued and self.on_queued:
            self.on_queued()
        return queued

    def _queue(self) -> int:
        cutoff = utcnow() - timedelta(seconds=self.stable_seconds)
        queued = 0
        with self.db.session() as session:
            candidates = session.execute(
                select(Study.id, Study.version, Study.study_key, Study.instance_count)
                .where(Study.status == StudyStatus.RECEIVING, Study.last_received_at <= cutoff)
            ).all()
            for study_id, version, key, instances in candidates:
                # The conditional UPDATE is the claim: another scanner, or an instance arriving
                # meanwhile (new version, newer last_received_at), makes it match no row.
                claimed = session.execute(
                    update(Study)
                    .where(Study.id == study_id, Study.status == StudyStatus.RECEIVING,
                           Study.version == version, Study.last_received_at <= cutoff)
                    .values(status=StudyStatus.QUEUED)
                ).rowcount
                if claimed != 1:
                    continue
                session.add(Job(study_id=study_id, study_version=version, status=JobStatus.PENDING))
                log.info("study_queued", study_key=key, version=version, instances=instances)
                queued += 1
        return queued
