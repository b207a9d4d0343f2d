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
from contextlib import closing
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from io import BytesIO
from typing import Any

import numpy as np
import pydicom
from osteogate.gateway.core.config import Settings
from osteogate.gateway.core.logs import get_logger, scrub
from osteogate.gateway.core.metrics import INFERENCE_SECONDS, STUDIES_PROCESSED, STUDY_PROCESSING_SECONDS
from osteogate.gateway.store.backfill import is_backfilled
from osteogate.gateway.store.db import (
    Database,
    Delivery,
    DeliveryStatus,
    ImageResult,
    Instance,
    Job,
    JobStatus,
    ResultObject,
    Study,
    StudyResult,
    StudyStatus,
    utcnow,
)
from osteogate.gateway.store.spool import Spool
from osteogate.gateway.work.decoding import DecodeRequest, DecoderPool, decode_for_model
from osteogate.model.assessment import ImageScore, StudyAssessment
from osteogate.model.covariates import Covariates
from osteogate.model.taxonomy import REGIONS
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import or_, select, update

log = get_logger("osteogate.gateway.work.worker")


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


def card_series_uid(study_uid: str) -> str:
    """The result cards' own series: stable across versions, like the SR's."""
    return generate_uid(entropy_srcs=[study_uid, "osteogate-result-card-series"])


@dataclass(frozen=True)
class MadeObject:
    """A DICOM object written for a result (before its SQL row exists)."""

    kind: str  # "sr" | "card"
    sop_class_uid: str
    sop_instance_uid: str
    series_uid: str
    path: str  # relative to the reports directory


@dataclass
class ImageOutcome:
    instance: Instance
    header: Dataset
    region: str | None = None
    skip_reason: str | None = None
    decode_ms: float | None = None
    score: ImageScore | None = None  # the image network's output, once scored
    thumbnail: np.ndarray | None = None  # small copy for the result card (decoded images are not kept)
    decoder_peak_kib: int | None = None  # peak memory of the decoder process, when one decoded it


@dataclass
class StudyOutcome:
    images: list[ImageOutcome] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    # What the model reports (None when nothing in the study was in scope); its images are the
    # scored ones, in the order of ``scored``.
    assessment: StudyAssessment | None = None

    @property
    def scored(self) -> list[ImageOutcome]:
        return [i for i in self.images if i.score is not None]


def study_region(items: Sequence[ImageOutcome]) -> str | None:
    """The study's region: the most common among in-scope images (ties: taxonomy order)."""
    counts = Counter(i.region for i in items if i.region)
    if not counts:
        return None
    return max(counts, key=lambda r: (counts[r], -REGIONS.index(r) if r in REGIONS else -len(REGIONS)))


def study_covariates(items: Sequence[ImageOutcome]) -> Covariates:
    """Covariates from the header of the in-scope image that states the most of them.

    Patient attributes are the same in every image of a study as a rule; when one image lacks some
    (a secondary view written by another device), the fullest header is the better source."""
    from osteogate.gateway.report.wording import image_order_key
    from osteogate.model.covariates import covariates_from_dataset

    candidates = [covariates_from_dataset(i.header) for i in sorted(items, key=lambda i: image_order_key(i.header))]
    # max() keeps the first of equals: the stable image order decides ties.
    return max(candidates, key=lambda c: len(c.present)) if candidates else Covariates()


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
        self._decoders: DecoderPool | None = None
        self._pool_lock = threading.Lock()
        if settings.report.result_card:
            self._check_card_font()

    @staticmethod
    def _check_card_font() -> None:
        """Say at start, once, when result cards cannot be drawn (each job would log it again)."""
        from osteogate.gateway.report.card import FontUnavailable, find_font

        try:
            find_font()
        except FontUnavailable as exc:
            log.error("result_card_unavailable", detail=str(exc))

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
        self.close_decoders()

    def _decoder_pool(self, processes: int) -> DecoderPool:
        """The decoder processes, started at the first study that needs them and kept: a fresh
        decoder's first image costs ~0.1 s more (library start-up), too much per study."""
        with self._pool_lock:
            if self._decoders is None or self._decoders.processes != processes:
                if self._decoders is not None:
                    self._decoders.close()
                self._decoders = DecoderPool(processes)
            return self._decoders

    def close_decoders(self) -> None:
        with self._pool_lock:
            decoders, self._decoders = self._decoders, None
        if decoders is not None:
            decoders.close()

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
        if outcome.assessment is not None:
            predecessor = self._read_header(self.reports, previous_sr) if previous_sr else None
            # Every object is durable before any delivery row points at it: no half-made report is sent.
            made = self.write_report(study_uid, outcome, classifier, result_version, predecessor)
        else:
            # Nothing in scope: recorded as skipped with reasons; PACS gets no empty report.
            made = []
        self._commit(job_id, outcome, classifier, result_version, made)
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

    def classify(self, instances: Sequence[Instance], classifier: Any) -> StudyOutcome:
        from osteogate.gateway.work.prefetch import Prefetcher, decode_plan, images_per_call
        from osteogate.model.preprocess import needed_long_side

        outcome = StudyOutcome()
        spec = classifier.card.input
        long_side = needed_long_side(spec)
        per_call = images_per_call(classifier.backend_name, spec.patches_per_image if spec.mode == "patches" else 1,
                                   self.settings.model.batch_size)
        # Decode of the next images (a few decoders, a few images ahead) overlaps scoring of these;
        # only network inputs are held, never a study's worth of full-size decodes. A study in a slow
        # codec gets decoder processes (gateway/work/decoding.py says why), kept for the next such study.
        batch: list[tuple[ImageOutcome, Any]] = []
        workers, in_processes = decode_plan((i.transfer_syntax_uid for i in instances), self.settings.model.decoders,
                                            self.settings.model.decode_in_subprocess)
        pool = self._decoder_pool(workers) if in_processes else None
        decoded = Prefetcher(lambda instance: self._decode_instance(instance, classifier, long_side, pool),
                             workers=workers)
        with closing(decoded.map(sorted(instances, key=lambda i: i.received_at))) as stream:
            for _, (item, image) in stream:
                outcome.images.append(item)
                if image is not None:
                    batch.append((item, image))
                if len(batch) >= per_call:
                    self.score_batch(batch, classifier, outcome.timings)
                    batch = []
        if batch:
            self.score_batch(batch, classifier, outcome.timings)
        outcome.timings["decode_ms"] = sum(i.decode_ms or 0.0 for i in outcome.images)
        self.assess(outcome, classifier)
        return outcome

    def _decode_instance(self, instance: Instance, classifier: Any, long_side: int,
                         decoders: DecoderPool | None) -> tuple[ImageOutcome, Any]:
        """Read one spooled instance, decode it at the model's size and make the network inputs (runs
        on a decode thread, the work itself in a decoder process when there is a pool):
        (outcome with header, thumbnail or skip reason; PreparedImage or None)."""
        if instance.purged_at is not None:
            # Retention removed the file after an earlier result was delivered; that result
            # stands for this image, and the new SR says why the image is not re-read.
            return ImageOutcome(instance, Dataset(), skip_reason="image purged by retention"), None
        try:
            path = str(self.spool.absolute(instance.path))
        except Exception as exc:
            return ImageOutcome(instance, Dataset(), skip_reason=f"spooled file unreadable: {type(exc).__name__}"), None
        request = DecodeRequest(path, long_side, classifier.card.input, tuple(classifier.card.regions),
                                thumbnail=self.settings.report.result_card)
        decoded = decoders.decode(request) if decoders is not None else decode_for_model(request)
        item = ImageOutcome(instance, decoded.header, region=decoded.region, skip_reason=decoded.skip_reason,
                            decode_ms=decoded.decode_ms, thumbnail=decoded.thumbnail,
                            decoder_peak_kib=decoded.decoder_peak_kib)
        return item, decoded.prepared

    def score_batch(self, batch: Sequence[tuple[ImageOutcome, Any]], classifier: Any,
                    timings: dict[str, float]) -> None:
        """Score prepared images (one or a small batch) with the image network.

        Separate from decoding so that a decode pipeline can hand images over as they come; the
        inputs are not kept after this (the result card needs only the thumbnails)."""
        if not batch:
            return
        t0 = time.perf_counter()
        scores = classifier.score_images(
            [image for _, image in batch], [item.region for item, _ in batch],
            batch_size=self.settings.model.batch_size,
        )
        elapsed = (time.perf_counter() - t0) * 1000
        timings["inference_ms"] = timings.get("inference_ms", 0.0) + elapsed
        INFERENCE_SECONDS.observe(elapsed / 1000)
        for (item, _), score in zip(batch, scores, strict=True):
            item.score = score

    def assess(self, outcome: StudyOutcome, classifier: Any) -> None:
        """The model's assessment of the study: image scores + header covariates -> StudyAssessment.

        One region per study (the most common); scored images of another region are left out of
        this report with the reason, rather than assessed by the wrong head."""
        scored = outcome.scored
        region = study_region(scored)
        if region is None:
            return
        for item in scored:
            if item.region != region:
                item.skip_reason = f"region {item.region} differs from the study's region {region}: not assessed"
                item.score = None
                item.thumbnail = None
        scored = outcome.scored
        covariates = study_covariates(scored)
        outcome.assessment = classifier.assess([i.score for i in scored], covariates, region)

    def study_report(self, outcome: StudyOutcome, classifier: Any) -> Any:
        """What the SR and the result card are made from (gateway.sr.StudyReport)."""
        from osteogate.gateway.report.sr import AlgorithmInfo, SkippedImage, StudyReport

        assert outcome.assessment is not None
        card = classifier.card
        algorithm = AlgorithmInfo(name=card.display_name, version=card.version, checkpoint_sha256=classifier.sha256)
        scored = outcome.scored
        skipped = tuple(SkippedImage(source=i.header, reason=i.skip_reason or "not classified")
                        for i in outcome.images if i.score is None and "StudyInstanceUID" in i.header)
        thumbnails = tuple(i.thumbnail for i in scored) if self.settings.report.result_card else ()
        return StudyReport(outcome.assessment, tuple(i.header for i in scored), algorithm, skipped, thumbnails)

    def build_report(self, report: Any, series_uid: str, sr_uid: str, version: int,
                     predecessor: Dataset | None, when: datetime | None = None) -> Dataset:
        """The result SR (TID 1500) of one version."""
        from osteogate.gateway.report.sr import build_result_sr

        return build_result_sr(report, series_instance_uid=series_uid, sop_instance_uid=sr_uid,
                               instance_number=version, predecessor=predecessor, content_datetime=when)

    def build_card(self, report: Any, series_uid: str, card_uid: str, version: int,
                   when: datetime | None = None) -> Dataset:
        """The result card (Secondary Capture) of one version: same series across versions."""
        from osteogate.gateway.report.card import build_result_card

        return build_result_card(report, series_instance_uid=series_uid, sop_instance_uid=card_uid,
                                 instance_number=version, content_datetime=when)

    def write_report(self, study_uid: str, outcome: StudyOutcome, classifier: Any, version: int,
                     predecessor: Dataset | None) -> list[MadeObject]:
        """Build and durably write the SR, then the result card; returns them in send order.

        A card that cannot be made (e.g. no font on this host) is logged and left out: the SR is a
        complete report on its own, and a card problem must not withhold the result."""
        report = self.study_report(outcome, classifier)
        when = datetime.now()
        made = []
        sr_uid = generate_uid()
        sr = self.build_report(report, sr_series_uid(study_uid), sr_uid, version, predecessor, when)
        made.append(self._write("sr", sr, study_uid))
        if self.settings.report.result_card:
            try:
                card = self.build_card(report, card_series_uid(study_uid), generate_uid(), version, when)
            except Exception as exc:  # noqa: BLE001 - the SR still goes; the reason is logged
                log.error("result_card_failed", error=type(exc).__name__, detail=str(exc)[:200]
                          if type(exc).__name__ == "FontUnavailable" else None)
            else:
                made.append(self._write("card", card, study_uid))
        return made

    def _write(self, kind: str, ds: Dataset, study_uid: str) -> MadeObject:
        relative = self.reports.report_path(study_uid, str(ds.SOPInstanceUID)).as_posix()
        buffer = BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        self.reports.write_atomic(relative, buffer.getvalue())
        return MadeObject(kind, str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID), relative)

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

    def _commit(self, job_id: int, outcome: StudyOutcome, classifier: Any, version: int,
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
                probabilities=dict(study.probabilities) if study and study.probabilities else None,
                t_score=study.t_score if study else None,
                t_score_low=study.t_score_interval[0] if study and study.t_score_interval else None,
                t_score_high=study.t_score_interval[1] if study and study.t_score_interval else None,
                inputs_used=list(study.inputs_used) if study else None,
                inputs_missing=list(study.inputs_missing) if study else None,
                model_name=classifier.card.display_name[:128], model_version=classifier.card.version[:32],
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
                result.deliveries.append(Delivery(destination=destination, status=DeliveryStatus.PENDING))
            job.status = JobStatus.DONE
            job.finished_at = utcnow()
            job.lease_until = None
            if job.study.version == job.study_version:
                job.study.status = status

    def _destinations(self, session: Any, job: Job) -> list[str]:
        """Where this result's SR goes: the configured destinations; for a replay run without
        any (an admin's one-off command), wherever the study's earlier SRs went; nowhere for a
        study fetched by a backfill while ``backfill.deliver`` is false."""
        if not self.settings.backfill.deliver and is_backfilled(session, job.study.study_uid):
            return []  # backfill.deliver = false: historical results stay in SQL (and `osteogate cases`)
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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

