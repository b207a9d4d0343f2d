"""CUDA path throughput (torch backend) at batch 1 and the worker's batch size, versus CPU ONNX Runtime.

    .venv/bin/python benchmarks/gpu.py [--model FILE] [--batch-size 8] [--seconds 5] [--size 2048]

Prepared to run as one script on a GPU machine. On a machine without CUDA it prints why and exits 0.
Two figures per backend and batch size:
  * model only: inputs/s of Backend.run on pre-made [B, C, H, W] tensors (CUDA: synchronised);
  * classifier: images/s of Classifier.predict on decoded 2048x2048 images (preprocessing included,
    as the worker calls it; decoding is the same on both paths and is left out).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import resolve_model


def rate(func: object, units: int, seconds: float, sync: object = None) -> float:
    """Units per second of repeated `func()` calls for about `seconds` (after 3 warm-up calls)."""
    for _ in range(3):
        func()  # type: ignore[operator]
    if callable(sync):
        sync()
    calls, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        func()  # type: ignore[operator]
        calls += 1
    if callable(sync):
        sync()
    return calls * units / (time.perf_counter() - t0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--batch-size", type=int, default=None, help="default: the gateway's model.batch_size")
    parser.add_argument("--seconds", type=float, default=5, help="measuring time per figure")
    parser.add_argument("--size", type=int, default=2048, help="decoded image side for the classifier figures")
    args = parser.parse_args()

    try:
        import torch
    except ImportError:
        print("torch is not installed: no CUDA path to measure")
        return 0
    if not torch.cuda.is_available():
        print("no CUDA device visible to torch (torch.cuda.is_available() is False): nothing to measure here; "
              "run this script on a GPU machine")
        return 0

    from osteogate.gateway.core.config import ModelConfig
    from osteogate.model.inference import Classifier
    from osteogate.model.preprocess import prepare

    batch_size = args.batch_size or ModelConfig().batch_size
    with tempfile.TemporaryDirectory(prefix="osteogate-bench-gpu-") as tmp:
        work = Path(tmp)
        model_path = resolve_model(args.model, work)
        gpu = Classifier.load(model_path, backend="torch", device="cuda")
        cpu = Classifier.load(model_path, backend="onnx", cache_dir=work / "onnx")
        card = gpu.card
        print(f"card: {torch.cuda.get_device_name(0)}; torch {torch.__version__}, CUDA {torch.version.cuda}")
        print(f"model {model_path.name} ({card.architecture}, input {card.input.mode} {card.input.size}); "
              f"worker batch size {batch_size}")

        rng = np.random.default_rng(0)
        image = rng.random((args.size, args.size), dtype=np.float32)
        one = prepare(image, card.input)  # [n, C, H, W]; n = patches per image in patches mode
        sync = torch.cuda.synchronize
        results: dict[tuple[str, int], tuple[float, float]] = {}
        for batch in sorted({1, batch_size}):
            tensors = np.repeat(one[:1], batch, axis=0)
            images = [image] * batch
            regions = [card.regions[0]] * batch
            for name, clf, s in (("cuda torch", gpu, sync), ("cpu onnxruntime", cpu, None)):
                model_rate = rate(lambda clf=clf, tensors=tensors: clf.backend.run(tensors), batch, args.seconds, s)
                predict_rate = rate(lambda clf=clf, images=images, regions=regions, batch=batch:
                                    clf.predict(images, regions, batch_size=batch), batch, args.seconds, s)
                results[(name, batch)] = (model_rate, predict_rate)
                print(f"batch {batch:3d}  {name:<16} model only {model_rate:8.1f} inputs/s   "
                      f"classifier {predict_rate:8.1f} images/s", flush=True)
        for batch in sorted({1, batch_size}):
            g, c = results[("cuda torch", batch)], results[("cpu onnxruntime", batch)]
            print(f"batch {batch:3d}: CUDA/CPU speed-up model only {g[0] / c[0]:.1f}x, classifier {g[1] / c[1]:.1f}x")
        print(f"peak CUDA memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
