"""Classifier stage throughput: decode + preprocess + model, against raw ONNX Runtime.

    .venv/bin/python benchmarks/inference.py [--images 16] [--rounds 7] [--size 2048] [--model FILE] [--batch-size 8]

For each transfer syntax (explicit VR LE, JPEG 2000 lossless, JPEG lossless SV1, RLE lossless) the
same 16-bit DX image is encoded once (pydicom's encoders; dcmtk dcmcjpeg for JPEG lossless, which
pydicom cannot encode), then the worker's per-image steps are timed: dcmread of the file bytes,
model.pixels.dataset_to_image (decode, LUTs, scaling) and model.preprocess.prepare (resize,
letterbox, normalise). The model part is model.inference.Classifier (ONNX backend, as the worker
uses it on CPU) at the worker's batch size, compared with InferenceSession.run on the same ONNX
file and the same pre-made tensors: the goal is the Classifier within 10% of raw ORT.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
from _common import resolve_model
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLosslessSV1, RLELossless

from tests.helpers import make_dataset


def encode_variants(work: Path, size: int) -> dict[str, bytes]:
    """File bytes of one image in each transfer syntax."""
    base = make_dataset(size=(size, size), seed=3)
    out: dict[str, bytes] = {}
    native = work / "native.dcm"
    base.save_as(native, enforce_file_format=True)
    out["explicit LE"] = native.read_bytes()
    for name, syntax in (("JPEG 2000 lossless", JPEG2000Lossless), ("RLE lossless", RLELossless)):
        ds = pydicom.dcmread(native)
        ds.compress(syntax)
        buffer = BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        out[name] = buffer.getvalue()
    if shutil.which("dcmcjpeg"):
        target = work / "jpegls1.dcm"
        # +e1: JPEG lossless, first-order prediction (selection value 1), what modalities usually send.
        done = subprocess.run(["dcmcjpeg", "+e1", str(native), str(target)], capture_output=True, text=True)
        if done.returncode == 0 and str(pydicom.dcmread(target, stop_before_pixels=True)
                                        .file_meta.TransferSyntaxUID) == JPEGLosslessSV1:
            out["JPEG lossless SV1"] = target.read_bytes()
        else:
            print(f"(dcmcjpeg failed, JPEG lossless skipped: {done.stderr.strip()[:200]})")
    else:
        print("(dcmtk dcmcjpeg not found: JPEG lossless skipped)")
    assert str(pydicom.dcmread(BytesIO(out["explicit LE"])).file_meta.TransferSyntaxUID) == ExplicitVRLittleEndian
    return out


def time_per_image(func: object, repeats: int) -> float:
    """Median seconds of `func()` over `repeats` calls (after one warm-up call)."""
    func()  # type: ignore[operator]
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        func()  # type: ignore[operator]
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16, help="images per model measurement (and decode repeats)")
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=7, help="interleaved Classifier / raw ORT rounds")
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--batch-size", type=int, default=None, help="default: the gateway's model.batch_size")
    args = parser.parse_args()

    from osteogate.gateway.config import ModelConfig
    from osteogate.model.inference import INPUT_NAME, OUTPUT_NAME, Classifier
    from osteogate.model.pixels import dataset_to_image
    from osteogate.model.preprocess import prepare

    batch_size = args.batch_size or ModelConfig().batch_size
    with tempfile.TemporaryDirectory(prefix="osteogate-bench-inference-") as tmp:
        work = Path(tmp)
        model_path = resolve_model(args.model, work)
        classifier = Classifier.load(model_path, backend="onnx", cache_dir=work / "onnx")
        card = classifier.card
        print(f"model {model_path.name} ({card.architecture}, input {card.input.mode} {card.input.size}), "
              f"backend {classifier.backend_name}, batch size {batch_size}, image {args.size}x{args.size} 16-bit")

        variants = encode_variants(work, args.size)
        print(f"\n{'transfer syntax':<22}{'size MB':>9}{'read ms':>9}{'decode ms':>11}{'preproc ms':>12}")
        per_syntax: dict[str, float] = {}
        image = None
        for name, raw in variants.items():
            read_s = time_per_image(lambda raw=raw: pydicom.dcmread(BytesIO(raw)), args.images)
            ds = pydicom.dcmread(BytesIO(raw))
            # The worker decodes a freshly read dataset each time: re-read so no cached array is reused.
            decode_s = time_per_image(lambda raw=raw: dataset_to_image(pydicom.dcmread(BytesIO(raw))),
                                      args.images) - read_s
            image = dataset_to_image(ds)
            prep_s = time_per_image(lambda image=image: prepare(image, card.input), args.images)
            per_syntax[name] = read_s + decode_s + prep_s
            print(f"{name:<22}{len(raw) / 1e6:>9.2f}{read_s * 1e3:>9.1f}{decode_s * 1e3:>11.1f}{prep_s * 1e3:>12.1f}")

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
        for _ in range(args.rounds):
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
        print(f"\nmodel, {n_inputs} inputs in batches of {batch_size}:")
        print(f"  Classifier (ONNX backend): {n_inputs / classifier_model_s:7.1f} inputs/s "
              f"({classifier_model_s / n_inputs * 1e3:.1f} ms each)")
        print(f"  raw onnxruntime:           {n_inputs / raw_s:7.1f} inputs/s ({raw_s / n_inputs * 1e3:.1f} ms each)")
        ratio = classifier_model_s / raw_s
        print(f"  Classifier/raw ORT time ratio (best of {args.rounds}): {ratio:.2f} (median {median_ratio:.2f}; "
              f"goal <= 1.10) -> {'OK' if ratio <= 1.10 else 'ABOVE GOAL'}")

        model_per_image = classifier_model_s / args.images
        print("\nwhole classifier stage per image (read + decode + preprocess + model):")
        for name, cost in per_syntax.items():
            total = cost + model_per_image
            bound = "model" if model_per_image >= cost else "decode+preprocess"
            print(f"  {name:<22}{1 / total:6.2f} images/s   bounded by {bound} "
                  f"({cost * 1e3:.0f} ms pixels vs {model_per_image * 1e3:.0f} ms model)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
