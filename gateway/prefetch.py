"""Decode ahead: a background thread prepares the next images while the model scores the current ones.

The worker classifies a study image by image. Decoding (file read, codestream decode, LUTs, resize to
the model's size) and inference are independent for different images, so ``Prefetcher.map`` runs the
decode step of image i+1 (and i+2) on one background thread while the caller runs the model on image
i; ONNX Runtime, torch, OpenCV and most codecs release the GIL while they compute.

Memory is bounded by construction: at most ``depth`` finished results wait in the queue, one is being
made, and the caller holds one batch. A result is what the model needs (the image at the model's
size, 4 MB for 1024x1024 float32), never the full-size decode, so a study of 100 images costs a few
images of memory, not 100.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")

DEFAULT_DEPTH = 2  # results decoded ahead; 1-2 hides the decode time, more only costs memory
# Network inputs per model call on a GPU: large batches keep it busy; on CPU a batch of the
# configured size (model.batch_size) is already efficient and keeps the pipeline short.
GPU_INPUTS_PER_CALL = 64
_POLL_SECONDS = 0.1


class _Failure:
    """An exception raised by the work function, carried to the consumer thread."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


_DONE = object()


class Prefetcher(Generic[Item, Result]):
    """``map(items)`` yields ``(item, work(item))`` in order, with ``work`` running on a background
    thread at most ``depth`` results ahead of the consumer. An exception raised by ``work`` is raised
    by ``map`` at that item; leaving the loop early (break, exception) stops the thread."""

    def __init__(self, work: Callable[[Item], Result], depth: int = DEFAULT_DEPTH,
                 name: str = "osteogate-decode") -> None:
        if depth < 1:
            raise ValueError("depth must be >= 1")
        self.work = work
        self.depth = depth
        self.name = name

    def map(self, items: Iterable[Item]) -> Iterator[tuple[Item, Result]]:
        results: queue.Queue[object] = queue.Queue(maxsize=self.depth)
        stop = threading.Event()

        def put(entry: object) -> bool:
            while not stop.is_set():
                try:
                    results.put(entry, timeout=_POLL_SECONDS)
                    return True
                except queue.Full:
                    continue
            return False

        def produce() -> None:
            try:
                for item in items:
                    if stop.is_set():
                        return
                    try:
                        entry: object = (item, self.work(item))
                    except BaseException as exc:  # handed to the consumer, which decides
                        put(_Failure(exc))
                        return
                    if not put(entry):
                        return
                    del entry  # the queue holds the only reference: memory stays bounded
            except BaseException as exc:  # iterating `items` failed
                put(_Failure(exc))
                return
            put(_DONE)

        thread = threading.Thread(target=produce, name=self.name, daemon=True)
        thread.start()
        try:
            while True:
                entry = results.get()
                if entry is _DONE:
                    return
                if isinstance(entry, _Failure):
                    raise entry.error
                yield entry  # type: ignore[misc]
                del entry
        finally:
            stop.set()
            while thread.is_alive():  # unblock a producer waiting on a full queue, then wait for it
                with contextlib.suppress(queue.Empty):
                    results.get_nowait()
                thread.join(timeout=_POLL_SECONDS)


def images_per_call(backend_name: str, inputs_per_image: int, batch_size: int) -> int:
    """How many decoded images the worker gives the model at once.

    CPU (ONNX Runtime or torch on CPU): ``batch_size`` network inputs per call (at least one image),
    so the model starts as soon as one image is decoded and decoding the next overlaps it. GPU: about
    ``GPU_INPUTS_PER_CALL`` inputs (a GPU is fast and wants big batches; the decode thread keeps
    feeding it meanwhile)."""
    inputs_per_image = max(1, inputs_per_image)
    budget = GPU_INPUTS_PER_CALL if "cuda" in backend_name else batch_size
    return max(1, budget // inputs_per_image)


def model_threads(configured: int, cores: int | None = None) -> int:
    """ONNX Runtime intra-op threads for the worker: ``configured`` when set (model.threads), else one
    per usable core less one, left to the decode thread. Otherwise the decode thread and ONNX
    Runtime's pool (one thread per core) oversubscribe the CPU and every parallel operator waits for
    its descheduled thread: on 2 cores that made the pipeline slower than decoding then scoring
    (benchmarks/inference.py)."""
    if configured:
        return configured
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores - 1)
