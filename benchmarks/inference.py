"""Classifier stage per transfer syntax, before/after issue #11, and Classifier against raw ONNX Runtime.

    .venv/bin/python benchmarks/inference.py [--images 8] [--rounds 3] [--size 2048] [--model FILE] [--batch-size 8]

1. Classifier stage (what the worker does for a study): --images files of one 2048x2048 radiograph
   (the knee sample enlarged with seeded noise, tests/helpers/codecs.py) in each transfer syntax,
   spooled on disk, classified by
   * before: the worker's loop as it was before issue #11 (``classify_before`` below, kept as the
     baseline): read, decode at full size, LUTs, keep every image, then one Classifier.predict;
   * after: ``ClassifierWorker.classify`` as it is now: decode at the model's size and make the
     network inputs in decoder processes (gateway/work/decoding.py, gateway/work/prefetch.py, ``--decoders``) while the model
     scores the previous images in small batches, with
     the worker's ONNX Runtime thread count (gateway.work.prefetch.model_threads: one core left to the
     decode thread; "before" uses ONNX Runtime's default, one thread per core, as the gateway did).
   Rounds alternate before/after, so each pair sees the same background load; printed: best and
   median images/s of each, and the ratio after/before as the median of the per-round ratios, with
   the goals (JPEG 2000 >= 4x, JPEG baseline >= 2x, native not slower).
2. Model part: model.inference.Classifier (ONNX backend) against InferenceSession.run on the same
   ONNX file and the same pre-made tensors: the goal is the Classifier within 10% of raw ORT.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pydicom
from _common import resolve_model, todays_decoders

from tests.helpers.codecs import SYNTAXES, encode, encoder_available, enlarged_sample

GOALS = {"JPEG 2000 lossless": 4.0, "JPEG 2000 lossy": 4.0, "JPEG baseline 8-bit": 2.0, "explicit LE": 1.0}


def classify_before(worker, instances, classifier):  # noqa: ANN001, ANN201
    """The worker's classify loop before issue #11 (baseline, kept here): every image decoded at full
    size with pydicom's default plugins and kept until one predict() call at the end."""
    from osteogate.gateway.work.decoding import CLASSIFIED_MODALITIES
    from osteogate.gateway.work.decoding import header_only as _header_only
    from osteogate.gateway.work.region import detect_region
    from osteogate.model.pixels import PixelDecodeError, dataset_to_image

    pending = []
    with todays_decoders():
        for instance in sorted(instances, key=lambda i: i.received_at):
            ds = pydicom.dcmread(worker.spool.absolute(instance.path))
            _header_only(ds)
            if str(ds.get("Modality", "")).upper() not in CLASSIFIED_MODALITIES:
                continue
            decision = detect_region(ds)
            try:
                image = dataset_to_image(ds)
            except PixelDecodeError:
                continue
            pending.append((decision.region, image))
    return classifier.predict([image for _, image in pending], [region for region, _ in pending],
                              batch_size=worker.settings.model.batch_size)


def stage_files(work: Path, size: int, count: int) -> dict[str, list[Path]]:
    """--images spooled copies of the test image per transfer syntax."""
    source = enlarged_sample("knee_dx", (size, size), seed=1)
    out: dict[str, list[Path]] = {}
    for name in SYNTAXES:
        if not encoder_available(name):
            print(f"({name}: encoder missing, skipped)")
            continue
        encoded = encode(source, name, work / "encoded")
        copies = []
        for i in range(count):
            copy = work / "spool" / name.replace(" ", "_") / f"{i}.dcm"
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(encoded, copy)
            copies.append(copy)
        out[name] = copies
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8, help="images per study (classifier stage) and per model run")
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=5, help="alternating before/after rounds per syntax")
    parser.add_argument("--model-rounds", type=int, default=7, help="interleaved Classifier / raw ORT rounds")
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--batch-size", type=int, default=None, help="default: the gateway's model.batch_size")
    parser.add_argument("--model-threads", type=int, default=0,
                        help="ONNX Runtime threads for 'after' (default 0: the gateway's default)")
    parser.add_argument("--decoders", type=int, default=0,
                        help="the worker's decoders for 'after' (default 0: the gateway's default)")
    parser.add_argument("--decode-in-threads", action="store_true",
                        help="'after' decodes in threads of the worker process, not in decoder processes")
    parser.add_argument("--only", default=None, help="comma-separated transfer syntax names (default: all)")
    args = parser.parse_args()

    from osteogate.gateway.core.config import ModelConfig, Settings
    from osteogate.gateway.report.publisher import ReportPublisher
    from osteogate.gateway.store.db import Instance
    from osteogate.gateway.store.spool import Spool
    from osteogate.gateway.work.prefetch import decode_workers, model_threads
    from osteogate.gateway.work.worker import ClassifierWorker
    from osteogate.model.inference import INPUT_NAME, OUTPUT_NAME, Classifier
    from osteogate.model.pixels import dataset_to_image
    from osteogate.model.preprocess import needed_long_side, prepare

    batch_size = args.batch_size or ModelConfig().batch_size
    with tempfile.TemporaryDirectory(prefix="osteogate-bench-inference-") as tmp:
        work = Path(tmp)
        model_path = resolve_model(args.model, work)
        classifier = Classifier.load(model_path, backend="onnx", cache_dir=work / "onnx")
        threads = model_threads(args.model_threads)
        worker_classifier = Classifier.load(model_path, backend="onnx", cache_dir=work / "onnx",
                                            intra_op_threads=threads, spin_wait=False)
        card = classifier.card
        print(f"model {model_path.name} ({card.architecture}, input {card.input.mode}, long side "
              f"{needed_long_side(card.input)}), backend {classifier.backend_name}, batch size {batch_size}, "
              f"{args.images} images of {args.size}x{args.size} per study; ONNX Runtime threads: before "
              f"default, after {threads}; decoders after, slow codecs: {decode_workers(args.decoders)} "
              f"{'threads' if args.decode_in_threads else 'processes'}, others: 1 thread")

        settings = Settings(model={"batch_size": batch_size, "decoders": args.decoders,
                                   "decode_in_subprocess": not args.decode_in_threads})
        worker = ClassifierWorker(settings, None, Spool(work / "spool"), ReportPublisher(settings, Spool(work / "reports")),  # type: ignore[arg-type]
                                  lambda _: worker_classifier)
        files = stage_files(work, args.size, args.images)
        if args.only:
            files = {k: v for k, v in files.items() if k in args.only.split(",")}
        print(f"\nclassifier stage, images/s: best (median) of {args.rounds} alternating rounds; ratio = median of "
              f"the per-round after/before ratios")
        print(f"{'transfer syntax':<22}{'before':>16}{'after':>16}{'after/before':>14}  goal")
        now = datetime.now(UTC)
        for name, paths in files.items():
            syntax = str(pydicom.dcmread(paths[0], stop_before_pixels=True).file_meta.TransferSyntaxUID)
            instances = [Instance(sop_instance_uid=f"1.2.3.{i}", path=str(p.relative_to(work / "spool")),
                                  transfer_syntax_uid=syntax,
                                  received_at=now + timedelta(seconds=i), purged_at=None)
                         for i, p in enumerate(paths)]
            classify_before(worker, instances[:1], classifier)  # warm-up of both paths
            worker.classify(instances[:1], worker_classifier)
            before, after = [], []
            for _ in range(args.rounds):
                t0 = time.perf_counter()
                classify_before(worker, instances, classifier)
                before.append(len(paths) / (time.perf_counter() - t0))
                t0 = time.perf_counter()
                outcome = worker.classify(instances, worker_classifier)
                after.append(len(paths) / (time.perf_counter() - t0))
                assert len(outcome.scored) == len(paths), [i.skip_reason for i in outcome.images]
            ratio = statistics.median(a / b for a, b in zip(after, before, strict=True))
            goal = GOALS.get(name)
            verdict = "" if goal is None else f">= {goal:g}x {'OK' if ratio >= goal else 'BELOW GOAL'}"
            if name == "explicit LE":
                verdict = f"not slower {'OK' if ratio >= 0.95 else 'SLOWER'}"
            print(f"{name:<22}{max(before):>7.2f} ({statistics.median(before):5.2f}){max(after):>8.2f} "
                  f"({statistics.median(after):5.2f}){ratio:>13.2f}x  {verdict}")

        image = dataset_to_image(pydicom.dcmread(next(iter(files.values()))[0]), needed_long_side(card.input))
        assert image is not None
        images = [image] * args.images
        regions = [card.regions[0]] * args.images
        # Raw ONNX Runtime: same file, default session options, same tensors, same batching.
        import onnxruntime as ort

        onnx_path = getattr(classifier.backend, "path", model_path.with_suffix(".onnx"))
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        tensors = np.concatenate([prepare(img, card.input) for img in images], axis=0).astype(np.float32)

        def raw_run() -> None:
            for i in range(0, len(tensors), batch_size):
                session.run([OUTPUT_NAME], {INPUT_NAME: tensors[i:i + batch_size]})

        # Interleaved rounds, so background load on a shared machine hits both sides alike. The
        # Classifier's own timing of its model part (preprocessing excluded) is what is compared.
        classifier.predict(images, regions, batch_size=batch_size)  # warm-up
        raw_run()
        model_ms, raw_ms = [], []
        for _ in range(args.model_rounds):
            classifier.predict(images, regions, batch_size=batch_size)
            model_ms.append(classifier.last_timings["model_ms"])
            t0 = time.perf_counter()
            raw_run()
            raw_ms.append((time.perf_counter() - t0) * 1000)
        # Best-of-rounds: on a shared machine the minimum is the least disturbed measurement.
        classifier_model_s = min(model_ms) / 1000
        raw_s = min(raw_ms) / 1000
        median_ratio = statistics.median(model_ms) / statistics.median(raw_ms)
        n_inputs = len(tensors)
        print(f"\nmodel part, {n_inputs} inputs in batches of {batch_size}:")
        print(f"  Classifier (ONNX backend): {n_inputs / classifier_model_s:7.1f} inputs/s "
              f"({classifier_model_s / n_inputs * 1e3:.1f} ms each)")
        print(f"  raw onnxruntime:           {n_inputs / raw_s:7.1f} inputs/s ({raw_s / n_inputs * 1e3:.1f} ms each)")
        ratio = classifier_model_s / raw_s
        print(f"  Classifier/raw ORT time ratio (best of {args.model_rounds}): {ratio:.2f} (median {median_ratio:.2f}; "
              f"goal <= 1.10) -> {'OK' if ratio <= 1.10 else 'ABOVE GOAL'}")

    return 0


if __name__ == "__main__":
    sys.exit(main())
