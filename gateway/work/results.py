"""Result persistence: one transaction writes the study result, its image results, the report
objects the publisher made and the deliveries, and closes the job; or records the failure."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from osteogate.gateway.core.config import Settings
from osteogate.gateway.core.logs import get_logger, scrub
from osteogate.gateway.groundtruth.gate import withheld_figures
from osteogate.gateway.store.backfill import is_backfilled
from osteogate.gateway.store.db import (
    Database,
    Delivery,
    DeliveryStatus,
    ImageResult,
    Job,
    JobStatus,
    ResultObject,
    StudyResult,
    StudyStatus,
    utcnow,
)
from osteogate.gateway.work.outcome import MadeObject, StudyOutcome
from sqlalchemy import select

log = get_logger("osteogate.gateway.work.results")


class ResultRecorder:
    """Writes what a job came to (result rows, objects, deliveries) or why it failed."""

    def __init__(self, settings: Settings, db: Database) -> None:
        self.settings = settings
        self.db = db

    def next_version(self, study_id: int) -> int:
        """The version number the next result of this study gets."""
        with self.db.session() as session:
            return 1 + (session.execute(
                select(StudyResult.version).where(StudyResult.study_id == study_id)
                .order_by(StudyResult.version.desc()).limit(1)).scalar_one_or_none() or 0)

    def superseded(self, job_id: int) -> bool:
        with self.db.session() as session:
            job = session.get(Job, job_id)
            assert job is not None
            if job.study.version == job.study_version:
                return False
            # New instances arrived while we worked: the tracker queues the new version; this
            # result would be out of date before it reached PACS.
            job.status = JobStatus.DONE
            job.finished_at = utcnow()
            job.error = "superseded by a newer study version"
            return True

    def commit(self, job_id: int, outcome: StudyOutcome, classifier: Any, version: int,
                made: Sequence[MadeObject]) -> None:
        assessment = outcome.assessment
        study = assessment.study if assessment else None
        status = StudyStatus.DONE if assessment else StudyStatus.SKIPPED
        sr = next((m for m in made if m.kind == "sr"), None)
        with self.db.session() as session:
            job = session.get(Job, job_id)
            assert job is not None
            result = StudyResult(
                study_id=job.study_id, job_id=job.id, version=version, status=status,
                region=assessment.region if assessment else None,
                assessed=study.assessed if study else None, reason=study.reason if study else None,
                label=study.label if study else None,
                notes=list(study.notes or assessment.covariates.notes) if study and assessment else None,
                probabilities=dict(study.probabilities) if study and study.probabilities else None,
                t_score=study.t_score if study else None,
                t_score_low=study.t_score_interval[0] if study and study.t_score_interval else None,
                t_score_high=study.t_score_interval[1] if study and study.t_score_interval else None,
                # The estimand's screening decision, where the assessment carries one (model/estimand.py).
                decision=getattr(study, "decision", None),
                referral_threshold=getattr(study, "referral_threshold", None),
                withheld=withheld_figures(outcome.withheld) if outcome.withheld else None,
                inputs_used=list(study.inputs_used) if study else None,
                inputs_missing=list(study.inputs_missing) if study else None,
                model_name=((study.model_name if study else "") or classifier.card.display_name)[:128],
                model_version=classifier.card.version[:32],
                model_sha256=classifier.sha256, backend=classifier.backend_name[:32],
                timings={k: round(v, 2) for k, v in outcome.timings.items()},
                sr_sop_instance_uid=sr.sop_instance_uid if sr else None,
                sr_series_uid=sr.series_uid if sr else None, sr_path=sr.path if sr else None,
            )
            session.add(result)
            image_results = iter(assessment.images if assessment else ())
            for item in outcome.images:
                reported = next(image_results).assessment if item.score is not None else None
                result.images.append(ImageResult(
                    sop_instance_uid=item.instance.sop_instance_uid,
                    status="classified" if reported else "skipped",
                    assessed=reported.assessed if reported else None,
                    reason=(reported.reason if reported else item.skip_reason),
                    region=item.region, label=reported.label if reported else None,
                    probabilities=dict(reported.probabilities) if reported and reported.probabilities else None,
                    decode_ms=item.decode_ms,
                ))
            for position, obj in enumerate(made):
                result.objects.append(ResultObject(
                    position=position, kind=obj.kind, sop_class_uid=obj.sop_class_uid,
                    sop_instance_uid=obj.sop_instance_uid, series_uid=obj.series_uid, path=obj.path))
            for destination in self._destinations(session, job) if made else ():
                # Shadow mode with the site gate closed: made and stored, held until the gate opens.
                lane = DeliveryStatus.HELD if outcome.held else DeliveryStatus.PENDING
                result.deliveries.append(Delivery(destination=destination, status=lane))
            job.status = JobStatus.DONE
            job.finished_at = utcnow()
            job.lease_until = None
            if job.study.version == job.study_version:
                job.study.status = status

    def _destinations(self, session: Any, job: Job) -> list[str]:
        """Where this result's SR goes: the job's own destinations (``replay --to``, whoever runs
        it); else the configured destinations; for a replay run without any (an admin's one-off
        command), wherever the study's earlier SRs went; nowhere for a study fetched by a
        backfill while ``backfill.deliver`` is false."""
        if job.destinations:
            return list(job.destinations)
        if not self.settings.backfill.deliver and is_backfilled(session, job.study.study_uid):
            return []  # historical results stay in SQL and `osteogate cases`
        configured = [str(d) for d in self.settings.delivery.destinations]
        if configured or job.reason != "replay":
            return configured
        earlier = session.execute(
            select(Delivery.destination).join(StudyResult).where(StudyResult.study_id == job.study_id)
            .distinct()
        ).scalars().all()
        return sorted(earlier)

    def fail(self, job_id: int, error: str) -> None:
        with self.db.session() as session:
            job = session.get(Job, job_id)
            if job is None:
                return
            job.error = error[:2000]
            job.lease_until = None
            if job.attempts >= self.settings.worker.max_attempts:
                self.mark_failed(job, job.error)
            else:
                job.status = JobStatus.PENDING

    @staticmethod
    def mark_failed(job: Job, error: str) -> None:
        """The job is over for good; its study shows ``failed`` (unless a newer version superseded it)."""
        job.status = JobStatus.FAILED
        job.finished_at = utcnow()
        job.error = error[:2000]
        if job.study.version == job.study_version:
            job.study.status = StudyStatus.FAILED
        # The error may quote a value from the header (an exception message): scrubbed for the log.
        log.error("job_failed_for_good", job=job.id, study_key=job.study.study_key, attempts=job.attempts,
                  reason=scrub(error[:200]))
