"""Decode ahead: background threads prepare the next images while the model scores the current ones.

The worker classifies a study image by image. Decoding (file read, codestream decode, LUTs, resize to
the model's size) and inference are independent for different images, so ``Prefetcher.map`` runs the
decode step of images i+1, i+2... on a small pool of background threads while the caller runs the
model on image i; ONNX Runtime, torch, OpenCV and most codecs release the GIL while they compute
(OpenJPEG does not: slow codecs are decoded in decoder processes, gateway/work/decoding.py).

Memory is bounded by construction: at most ``depth + workers`` results are made or being made ahead
of the one the caller holds. A result is what the model needs (the image at the model's size, 4 MB
for 1024x1024 float32), never the full-size decode, so a study of 100 images costs a few images of
memory, not 100.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")

DEFAULT_DEPTH = 2  # results decoded ahead; 1-2 hides the decode time, more only costs memory
# Network inputs per model call on a GPU: large batches keep it busy; on CPU a batch of the
# configured size (model.batch_size) is already efficient and keeps the pipeline short.
GPU_INPUTS_PER_CALL = 64


class Prefetcher(Generic[Item, Result]):
    """``map(items)`` yields ``(item, work(item))`` in order, with ``work`` running on ``workers``
    background threads at most ``depth + workers`` results ahead of the consumer. An exception
    raised by ``work`` is raised by ``map`` at that item; leaving the loop early (break, exception)
    cancels what has not started and waits for what has (a bounded amount: ``workers`` items).

    More than one worker pays when decoding costs more than scoring (JPEG 2000: ~120 ms a decode
    against ~30 ms of inference on one core), so the second core would otherwise sit idle."""

    def __init__(self, work: Callable[[Item], Result], depth: int = DEFAULT_DEPTH,
                 name: str = "osteogate-decode", workers: int = 1) -> None:
        if depth < 1:
            raise ValueError("depth must be >= 1")
        if workers < 1:
            raise ValueError("workers must be >= 1")
        self.work = work
        self.depth = depth
        self.name = name
        self.workers = workers

    def map(self, items: Iterable[Item]) -> Iterator[tuple[Item, Result]]:
        window = self.depth + self.workers  # futures submitted beyond the result the consumer holds
        pending: deque[tuple[Item, Future[Result]]] = deque()
        pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix=self.name)
        source = iter(items)
        try:
            for item in source:
                pending.append((item, pool.submit(self.work, item)))
                if len(pending) >= window:
                    break
            while pending:
                item, future = pending.popleft()
                result = future.result()  # raises the work's exception at its item
                for nxt in source:  # keep the window full while the consumer uses this result
                    pending.append((nxt, pool.submit(self.work, nxt)))
                    break
                yield item, result
                del result
        finally:
            # Not started: cancelled. Running: waited for, so no thread outlives the stream.
            pool.shutdown(wait=True, cancel_futures=True)


def images_per_call(backend_name: str, inputs_per_image: int, batch_size: int) -> int:
    """How many decoded images the worker gives the model at once.

    CPU (ONNX Runtime or torch on CPU): ``batch_size`` network inputs per call (at least one image),
    so the model starts as soon as one image is decoded and decoding the next overlaps it. GPU: about
    ``GPU_INPUTS_PER_CALL`` inputs (a GPU is fast and wants big batches; the decode thread keeps
    feeding it meanwhile)."""
    inputs_per_image = max(1, inputs_per_image)
    budget = GPU_INPUTS_PER_CALL if "cuda" in backend_name else batch_size
    return max(1, budget // inputs_per_image)


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. a container's cpuset), else all."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def model_threads(configured: int, cores: int | None = None) -> int:
    """ONNX Runtime intra-op threads for the worker: ``configured`` when set (model.threads), else one
    per usable core. The worker's session does not spin-wait (``Classifier.load(spin_wait=False)``):
    with ONNX Runtime's default spinning, its idle threads took the CPU from the decoders running
    beside it, and one thread per core less one was the better choice; without spinning, one per
    core is faster for every transfer syntax measured (benchmarks/inference.py, 2 cores: native
    26.7 -> 27.0 img/s, baseline JPEG 24.8 -> 31.4, RLE 23.6 -> 27.4, JPEG 2000 11.0 -> 10.7)."""
    if configured:
        return configured
    if cores is None:
        cores = usable_cores()
    return max(1, cores)


def decode_workers(configured: int, cores: int | None = None) -> int:
    """Decoders for a study in a slow codec (``decode_plan``): ``configured`` when set
    (model.decoders), else one per usable core, at most 4, so a decode-bound study (JPEG 2000, JPEG
    lossless) keeps every core busy (benchmarks/inference.py)."""
    if configured:
        return configured
    if cores is None:
        cores = usable_cores()
    return max(1, min(cores, 4))


# Transfer syntaxes whose decode at the model's size costs more than the model's inference on one
# core (benchmarks/decode.py, benchmarks/inference.py): JPEG 2000 (Part 1, Part 2, HTJ2K), JPEG-LS,
# JPEG lossless and 12-bit extended JPEG (libjpeg's DCT scaling is for 8-bit baseline only).
# Native, deflated, RLE and baseline JPEG decode at reduced size in a few milliseconds: the model
# bounds those studies, and more decoders only take CPU from it.
SLOW_DECODE_SYNTAXES = frozenset({
    "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.92", "1.2.840.10008.1.2.4.93",
    "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203",
    "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81",
    "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70",
    "1.2.840.10008.1.2.4.51",
})


def decode_plan(transfer_syntaxes: Iterable[str | None], configured: int, in_subprocess: bool,
                cores: int | None = None) -> tuple[int, bool]:
    """(decoders, in decoder processes) for one study.

    A study with a slow codec gets ``decode_workers`` decoders, as processes when allowed: OpenJPEG
    and CharLS hold the GIL, so only processes decode two images at once, and a decoder that a
    hostile codestream crashes then costs that image, not the gateway. Any other study is decoded on
    one thread of the worker process (processes would only add the transfer of each image's inputs)."""
    if any(syntax in SLOW_DECODE_SYNTAXES for syntax in transfer_syntaxes):
        return decode_workers(configured, cores), in_subprocess
    return 1, False
