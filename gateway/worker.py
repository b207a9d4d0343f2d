"""Classifier worker: takes queued studies from SQL, classifies them, writes the SR and queues delivery.

Runs in its own thread (ONNX Runtime and torch release the GIL during inference, so the SCP keeps
answering). Jobs are claimed with a conditional UPDATE (plus SKIP LOCKED on PostgreSQL), so
several workers, in threads, processes or hosts, never take the same job; a claimed job carries a
lease, and a job whose worker died is taken again once the lease expires.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from io import BytesIO
from typing import Any

import pydicom
from osteogate.gateway.config import Settings
from osteogate.gateway.db import (
    Database,
    Delivery,
    DeliveryStatus,
    ImageResult,
    Instance,
    Job,
    JobStatus,
    Study,
    StudyResult,
    StudyStatus,
    utcnow,
)
from osteogate.gateway.logs import get_logger, scrub
from osteogate.gateway.metrics import INFERENCE_SECONDS, STUDIES_PROCESSED, STUDY_PROCESSING_SECONDS
from osteogate.gateway.region import detect_region
from osteogate.gateway.spool import Spool
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import or_, select, update

log = get_logger("osteogate.gateway.worker")

CLASSIFIED_MODALITIES = {"CR", "DX"}
CLASSES = ("normal", "osteopenia", "osteoporosis")


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


def sr_series_uid(study_uid: str) -> str:
    """One SR series per study, stable across versions, so PACS shows the versions together."""
    return generate_uid(entropy_srcs=[study_uid, "osteogate-result-series"])


@dataclass
class ImageOutcome:
    instance: Instance
    header: Dataset
    region: str | None = None
    probabilities: dict[str, float] | None = None
    label: str | None = None
    skip_reason: str | None = None
    decode_ms: float | None = None


@dataclass
class StudyOutcome:
    images: list[ImageOutcome] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)  # the model card's operating points

    @property
    def classified(self) -> list[ImageOutcome]:
        return [i for i in self.images if i.probabilities is not None]

    def summary(self) -> tuple[str | None, str | None, dict[str, float] | None]:
        """Study-level region, label and probabilities: the mean over classified images.

        The mean is a deliberate, simple choice: every classified view counts equally, and the
        per-image values stay in the SR for the reader.
        """
        classified = self.classified
        if not classified:
            return None, None, None
        region = Counter(i.region for i in classified).most_common(1)[0][0]
        probs = {c: sum(i.probabilities[c] for i in classified) / len(classified) for c in CLASSES}  # type: ignore[index]
        from osteogate.model.inference import decide_label

        return region, decide_label(probs, self.thresholds), probs


class ClassifierWorker:
    """Processes classify jobs one at a time; ``run_once`` is the unit the thread loop repeats."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        spool: Spool,
        reports: Spool,
        classifier_factory: Callable[[str | None], Any],
        on_result: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self.db = db
        self.spool = spool
        self.reports = reports
        self.classifier_factory = classifier_factory
        self.on_result = on_result
        self.id = worker_id()
        self.wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_heartbeat = time.monotonic()

    # -- thread ----------------------------------------------------------------------------------

    def start(self) -> None:
        self.recover_own_dead_jobs()
        self._thread = threading.Thread(target=self._loop, name="osteogate-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30) -> None:
        self._stop.set()
        self.wake.set()
        if self._thread:
            self._thread.join(timeout)

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

    # -- job claiming ------------------------------------------------------------------------------

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
                    self._mark_failed(job, f"worker died {job.attempts} times while processing this study")
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

    def run_once(self, only: Collection[int] | None = None) -> bool:
        job_id = self.claim(only)
        if job_id is None:
            return False
        try:
            self.process(job_id)
        except Exception as exc:
            log.exception("job_failed", job=job_id, error=type(exc).__name__)
            STUDIES_PROCESSED.labels(outcome="failed").inc()
            self._fail(job_id, f"{type(exc).__name__}: {exc}")
        return True

    # -- processing ------------------------------------------------------------------------------

    def process(self, job_id: int) -> None:
        started = time.perf_counter()
        with self.db.session() as session:
            job = session.get(Job, job_id)
            assert job is not None
            study = job.study
            instances = list(study.instances)
            study_uid, study_id, key, version = study.study_uid, study.id, study.study_key, job.study_version
            model_path = job.model_path
            # The newest SR actually sent for this study is the predecessor of the next one.
            previous_sr = next((r.sr_path for r in reversed(study.results) if r.sr_path), None)
        log.info("job_started", job=job_id, study_key=key, version=version, instances=len(instances))

        classifier = self.classifier_factory(model_path)
        outcome = self.classify(instances, classifier)
        outcome.timings["total_ms"] = (time.perf_counter() - started) * 1000

        if self._superseded(job_id):
            log.info("job_superseded", job=job_id, study_key=key)
            return

        with self.db.session() as session:
            result_version = 1 + (session.execute(
                select(StudyResult.version).where(StudyResult.study_id == study_id)
                .order_by(StudyResult.version.desc()).limit(1)).scalar_one_or_none() or 0)
        if outcome.classified:
            sr_uid, series_uid = generate_uid(), sr_series_uid(study_uid)
            predecessor = self._read_header(self.reports, previous_sr) if previous_sr else None
            sr = self.build_report(outcome, classifier, series_uid, sr_uid, result_version, predecessor)
            sr_relative: str | None = self.reports.report_path(study_uid, sr_uid).as_posix()
            buffer = BytesIO()
            sr.save_as(buffer, enforce_file_format=True)
            # The SR is durable before any delivery row points at it: no half-made report is sent.
            self.reports.write_atomic(sr_relative, buffer.getvalue())
        else:
            # Nothing in scope: recorded as skipped with reasons; PACS gets no empty report.
            sr_uid = series_uid = sr_relative = None
        self._commit(job_id, outcome, classifier, result_version, sr_uid, series_uid, sr_relative)
        region, label, _ = outcome.summary()
        STUDY_PROCESSING_SECONDS.observe(time.perf_counter() - started)
        STUDIES_PROCESSED.labels(outcome="classified" if outcome.classified else "skipped").inc()
        log.info("study_classified", job=job_id, study_key=key, region=region, label=label,
                 images=len(outcome.classified), skipped=len(outcome.images) - len(outcome.classified),
                 sr=sr_uid is not None, ms=round(outcome.timings["total_ms"], 1))
        if self.on_result:
            self.on_result()

    def classify(self, instances: Sequence[Instance], classifier: Any) -> StudyOutcome:
        from osteogate.model.pixels import PixelDecodeError, dataset_to_image

        outcome = StudyOutcome(thresholds=dict(classifier.card.thresholds))
        pending: list[tuple[ImageOutcome, Any]] = []
        decode_total = 0.0
        for instance in sorted(instances, key=lambda i: i.received_at):
            t0 = time.perf_counter()
            if instance.purged_at is not None:
                # Retention removed the file after an earlier result was delivered; that result
                # stands for this image, and the new SR says why the image is not re-read.
                outcome.images.append(ImageOutcome(instance, Dataset(), skip_reason="image purged by retention"))
                continue
            try:
                ds = pydicom.dcmread(self.spool.absolute(instance.path))
            except Exception as exc:
                header = Dataset()
                item = ImageOutcome(instance, header, skip_reason=f"spooled file unreadable: {type(exc).__name__}")
                outcome.images.append(item)
                continue
            header = _header_only(ds)
            item = ImageOutcome(instance, header)
            outcome.images.append(item)
            modality = str(ds.get("Modality", "")).upper()
            if modality not in CLASSIFIED_MODALITIES:
                item.skip_reason = f"out of scope: modality {modality or 'missing'}"
                continue
            decision = detect_region(ds)
            if not decision.known:
                item.skip_reason = f"region unknown ({decision.source})"
                continue
            if decision.region not in classifier.card.regions:
                item.skip_reason = f"region {decision.region} not supported by the model"
                continue
            item.region = decision.region
            try:
                image = dataset_to_image(ds)
            except PixelDecodeError as exc:
                item.skip_reason = f"pixel data could not be decoded: {exc}"
                continue
            item.decode_ms = (time.perf_counter() - t0) * 1000
            decode_total += item.decode_ms
            pending.append((item, image))
        outcome.timings["decode_ms"] = decode_total
        if pending:
            t0 = time.perf_counter()
            predictions = classifier.predict(
                [image for _, image in pending], [item.region for item, _ in pending],
                batch_size=self.settings.model.batch_size,
            )
            outcome.timings["inference_ms"] = (time.perf_counter() - t0) * 1000
            INFERENCE_SECONDS.observe(outcome.timings["inference_ms"] / 1000)
            for (item, _), prediction in zip(pending, predictions, strict=True):
                item.probabilities = {c: float(prediction.probabilities[c]) for c in CLASSES}
                item.label = prediction.label
        return outcome

    def build_report(
        self, outcome: StudyOutcome, classifier: Any, series_uid: str, sr_uid: str, version: int,
        predecessor: Dataset | None,
    ) -> Dataset:
        from osteogate.gateway.sr import AlgorithmInfo, ImageFinding, SkippedImage, build_result_sr

        card = classifier.card
        algorithm = AlgorithmInfo(name=card.display_name, version=card.version, checkpoint_sha256=classifier.sha256)
        findings = [
            ImageFinding(source=i.header, region=i.region, probabilities=i.probabilities, label=i.label)  # type: ignore[arg-type]
            for i in outcome.classified
        ]
        skipped = [SkippedImage(source=i.header, reason=i.skip_reason or "not classified")
                   for i in outcome.images if i.probabilities is None and "StudyInstanceUID" in i.header]
        _, label, probs = outcome.summary()
        return build_result_sr(
            findings, algorithm, series_instance_uid=series_uid, sop_instance_uid=sr_uid,
            instance_number=version, skipped=skipped, study_label=label, study_probabilities=probs,
            predecessor=predecessor,
        )

    # -- bookkeeping -----------------------------------------------------------------------------

    def _superseded(self, job_id: int) -> bool:
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

    def _commit(
        self, job_id: int, outcome: StudyOutcome, classifier: Any, version: int, sr_uid: str | None,
        series_uid: str | None, sr_relative: str | None,
    ) -> None:
        region, label, probs = outcome.summary()
        status = StudyStatus.DONE if outcome.classified else StudyStatus.SKIPPED
        with self.db.session() as session:
            job = session.get(Job, job_id)
            assert job is not None
            result = StudyResult(
                study_id=job.study_id, job_id=job.id, version=version, status=status, region=region,
                label=label, p_normal=probs["normal"] if probs else None,
                p_osteopenia=probs["osteopenia"] if probs else None,
                p_osteoporosis=probs["osteoporosis"] if probs else None,
                model_name=classifier.card.display_name[:128], model_version=classifier.card.version[:32],
                model_sha256=classifier.sha256, backend=classifier.backend_name[:32],
                timings={k: round(v, 2) for k, v in outcome.timings.items()},
                sr_sop_instance_uid=sr_uid, sr_series_uid=series_uid, sr_path=sr_relative,
            )
            session.add(result)
            for item in outcome.images:
                p = item.probabilities or {}
                result.images.append(ImageResult(
                    sop_instance_uid=item.instance.sop_instance_uid,
                    status="classified" if item.probabilities else "skipped", reason=item.skip_reason,
                    region=item.region, label=item.label, p_normal=p.get("normal"),
                    p_osteopenia=p.get("osteopenia"), p_osteoporosis=p.get("osteoporosis"),
                    decode_ms=item.decode_ms,
                ))
            for destination in self._destinations(session, job) if sr_uid else ():
                result.deliveries.append(Delivery(destination=destination, status=DeliveryStatus.PENDING))
            job.status = JobStatus.DONE
            job.finished_at = utcnow()
            job.lease_until = None
            if job.study.version == job.study_version:
                job.study.status = status

    def _destinations(self, session: Any, job: Job) -> list[str]:
        """Where this result's SR goes: the configured destinations; for a replay run without
        any (an admin's one-off command), wherever the study's earlier SRs went."""
        configured = [str(d) for d in self.settings.delivery.destinations]
        if configured or job.reason != "replay":
            return configured
        earlier = session.execute(
            select(Delivery.destination).join(StudyResult).where(StudyResult.study_id == job.study_id)
            .distinct()
        ).scalars().all()
        return sorted(earlier)

    def _fail(self, job_id: int, error: str) -> None:
        with self.db.session() as session:
            job = session.get(Job, job_id)
            if job is None:
                return
            job.error = error[:2000]
            job.lease_until = None
            if job.attempts >= self.settings.worker.max_attempts:
                self._mark_failed(job, job.error)
            else:
                job.status = JobStatus.PENDING

    @staticmethod
    def _mark_failed(job: Job, error: str) -> None:
        """The job is over for good; its study shows ``failed`` (unless a newer version superseded it)."""
        job.status = JobStatus.FAILED
        job.finished_at = utcnow()
        job.error = error[:2000]
        if job.study.version == job.study_version:
            job.study.status = StudyStatus.FAILED
        # The error may quote a value from the header (an exception message): scrubbed for the log.
        log.error("job_failed_for_good", job=job.id, study_key=job.study.study_key, attempts=job.attempts,
                  reason=scrub(error[:200]))

    @staticmethod
    def _read_header(store: Spool, relative: str) -> Dataset | None:
        try:
            return pydicom.dcmread(store.absolute(relative), stop_before_pixels=True)
        except Exception:
            return None


def _header_only(ds: Dataset) -> Dataset:
    """A copy without pixel data: the SR needs only the header, and big arrays should be freed."""
    header = Dataset()
    header.update({elem.tag: elem for elem in ds if elem.tag.group != 0x7FE0})
    header.file_meta = ds.file_meta
    return header


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

