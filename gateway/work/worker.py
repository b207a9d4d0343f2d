"""Classifier worker: takes queued studies from SQL, classifies them, writes the SR and queues delivery.

Runs in its own thread (ONNX Runtime and torch release the GIL during inference, so the SCP keeps
answering). Jobs are claimed with a conditional UPDATE (plus SKIP LOCKED on PostgreSQL), so
several workers, in threads, processes or hosts, never take the same job; a claimed job carries a
lease, and a job whose worker died is taken again once the lease expires.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection
from typing import Any

from osteogate.gateway.core.config import Settings
from osteogate.gateway.core.logs import get_logger
from osteogate.gateway.core.metrics import STUDIES_PROCESSED, STUDY_PROCESSING_SECONDS
from osteogate.gateway.groundtruth.gate import SiteGate, withhold
from osteogate.gateway.store.db import Database, DeliveryStatus, Instance, Job
from osteogate.gateway.store.spool import Spool
from osteogate.gateway.work.jobs import JobClaims, worker_id
from osteogate.gateway.work.outcome import Publisher, StudyOutcome
from osteogate.gateway.work.pipeline import StudyPipeline
from osteogate.gateway.work.results import ResultRecorder

log = get_logger("osteogate.gateway.work.worker")


class ClassifierWorker:
    """Processes classify jobs one at a time; ``run_once`` is the unit the thread loop repeats.

    The per-study work is the pipeline's (decode, score, assess), the objects are the publisher's
    (the report stage, handed in by ``operate``), the bookkeeping is the recorder's.
    """

    def __init__(
        self,
        settings: Settings,
        db: Database,
        spool: Spool,
        publisher: Publisher,
        classifier_factory: Callable[[str | None], Any],
        on_result: Callable[[], None] | None = None,
        site_gate: SiteGate | None = None,
    ) -> None:
        self.settings = settings
        self.db = db
        self.spool = spool
        self.publisher = publisher
        self.classifier_factory = classifier_factory
        self.on_result = on_result
        self.site_gate = site_gate
        self.pipeline = StudyPipeline(settings, spool)
        self.results = ResultRecorder(settings, db)
        self.id = worker_id()
        self.jobs = JobClaims(settings, db, self.id, self.results)
        self.wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_heartbeat = time.monotonic()

    # -- thread ----------------------------------------------------------------------------------

    def start(self) -> None:
        self.jobs.recover_own_dead_jobs()
        self._thread = threading.Thread(target=self._loop, name="osteogate-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30) -> None:
        self._stop.set()
        self.wake.set()
        if self._thread:
            self._thread.join(timeout)
        self.pipeline.close_decoders()

    def close_decoders(self) -> None:
        self.pipeline.close_decoders()

    def classify(self, instances: list[Instance], classifier: Any) -> StudyOutcome:
        """Decode, score and assess one study's instances (the pipeline's work)."""
        return self.pipeline.classify(instances, classifier)

    @property
    def alive(self) -> bool:
        return bool(self._thread and self._thread.is_alive())

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.last_heartbeat = time.monotonic()
            try:
                worked = self.run_once()
            except Exception:
                log.exception("worker_loop_error")
                worked = False
            if not worked:
                self.wake.wait(self.settings.worker.poll_interval_seconds)
                self.wake.clear()

    def run_once(self, only: Collection[int] | None = None) -> bool:
        job_id = self.jobs.claim(only)
        if job_id is None:
            return False
        try:
            self.process(job_id)
        except Exception as exc:
            log.exception("job_failed", job=job_id, error=type(exc).__name__)
            STUDIES_PROCESSED.labels(outcome="failed").inc()
            self.results.fail(job_id, f"{type(exc).__name__}: {exc}")
        return True

    # -- processing ------------------------------------------------------------------------------

    def apply_site_gate(self, outcome: StudyOutcome) -> None:
        """Shadow: mark the deliveries to hold. Required: report "not assessed" with the gate's
        reason (the SR, card and show say it), keeping the model's result for the validation."""
        if self.site_gate is None or outcome.assessment is None:
            return
        gate = self.site_gate.state()
        outcome.held = gate.holds
        if gate.withholds and outcome.assessment.study.assessed:
            outcome.withheld = outcome.assessment.study
            outcome.assessment = withhold(outcome.assessment, gate.reason or "awaiting site validation")

    def process(self, job_id: int) -> None:
        started = time.perf_counter()
        with self.db.session() as session:
            job = session.get(Job, job_id)
            assert job is not None
            study = job.study
            instances = list(study.instances)
            study_uid, study_id, key, version = study.study_uid, study.id, study.study_key, job.study_version
            model_path = job.model_path
            # The newest SR actually sent for this study is the predecessor of the next one; one the
            # site gate holds (or withdrew) never reached the PACS, so no SR names it.
            previous_sr = next((r.sr_path for r in reversed(study.results) if r.sr_path and not any(
                d.status in (DeliveryStatus.HELD, DeliveryStatus.WITHDRAWN) for d in r.deliveries)), None)
        log.info("job_started", job=job_id, study_key=key, version=version, instances=len(instances))

        classifier = self.classifier_factory(model_path)
        outcome = self.pipeline.classify(instances, classifier)
        outcome.timings["total_ms"] = (time.perf_counter() - started) * 1000

        if self.results.superseded(job_id):
            log.info("job_superseded", job=job_id, study_key=key)
            return

        self.apply_site_gate(outcome)
        result_version = self.results.next_version(study_id)
        # Every object is durable before any delivery row points at it: no half-made report is sent.
        # Nothing in scope: recorded as skipped with reasons; PACS gets no empty report.
        made = (self.publisher.publish(study_uid, outcome, classifier, result_version, previous_sr)
                if outcome.assessment is not None else [])
        self.results.commit(job_id, outcome, classifier, result_version, made)
        result = outcome.assessment.study if outcome.assessment else None
        STUDY_PROCESSING_SECONDS.observe(time.perf_counter() - started)
        STUDIES_PROCESSED.labels(outcome="classified" if outcome.assessment else "skipped").inc()
        log.info("study_classified", job=job_id, study_key=key,
                 region=outcome.assessment.region if outcome.assessment else None,
                 label=result.label if result else None,
                 assessed=result.assessed if result else None,
                 inputs=list(result.inputs_used) if result else None,
                 images=len(outcome.scored), skipped=len(outcome.images) - len(outcome.scored),
                 objects=[m.kind for m in made], ms=round(outcome.timings["total_ms"], 1))
        if self.on_result:
            self.on_result()
