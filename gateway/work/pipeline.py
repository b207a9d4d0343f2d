"""One study's processing: decode (decode-ahead, decoder processes for slow codecs), score the
images with the network, then the model's assessment from image scores + header covariates."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from contextlib import closing
from typing import Any

from osteogate.gateway.core.config import Settings
from osteogate.gateway.core.metrics import INFERENCE_SECONDS
from osteogate.gateway.store.db import Instance
from osteogate.gateway.store.spool import Spool
from osteogate.gateway.work.decoding import DecodeRequest, DecoderPool, decode_for_model
from osteogate.gateway.work.outcome import ImageOutcome, StudyOutcome, study_covariates, study_region
from pydicom import dcmread
from pydicom.dataset import Dataset

_IDENTITY = ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "InstanceNumber",
             "SpecificCharacterSet"]


class StudyPipeline:
    """Decode -> score -> assess for one study at a time; keeps the decoder processes between studies."""

    def __init__(self, settings: Settings, spool: Spool) -> None:
        self.settings = settings
        self.spool = spool
        self._decoders: DecoderPool | None = None
        self._pool_lock = threading.Lock()

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
        ordered = sorted(instances, key=lambda i: i.received_at)
        cap = self.settings.model.max_images_per_study
        ordered, beyond = ordered[:cap], ordered[cap:]
        with closing(decoded.map(ordered)) as stream:
            for _, (item, image) in stream:
                outcome.images.append(item)
                if image is not None:
                    batch.append((item, image))
                if len(batch) >= per_call:
                    self.score_batch(batch, classifier, outcome.timings)
                    batch = []
        if batch:
            self.score_batch(batch, classifier, outcome.timings)
        reason = (f"not read: the study has {len(instances)} images, more than model.max_images_per_study "
                  f"({cap}); the first {cap} received were read")
        outcome.images.extend(ImageOutcome(instance, self._identity(instance), skip_reason=reason)
                              for instance in beyond)
        outcome.timings["decode_ms"] = sum(i.decode_ms or 0.0 for i in outcome.images)
        self.assess(outcome, classifier)
        return outcome

    def _identity(self, instance: Instance) -> Dataset:
        """The identifying attributes of an image that is not read (for the SR's list of them)."""
        try:
            return dcmread(self.spool.absolute(instance.path), stop_before_pixels=True, specific_tags=_IDENTITY)
        except Exception:
            return Dataset()  # gone or unreadable: counted in the study's images, not listed

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
