"""Decode one spooled instance for the model: the work of a decoder, in a thread or a separate process.

``decode_for_model`` reads the file, checks modality and region, decodes the pixels at the model's
size (codestream checked first: model.pixels), keeps a small thumbnail for the result card and makes
the network inputs. What goes in and out is plain data (picklable), so the worker can run it in
decoder processes (``DecoderPool``), for two reasons measured on this project's 2-core machine:

* OpenJPEG (Pillow and pylibjpeg alike) holds the GIL while it decodes, so two decoder *threads* run
  one at a time; two decoder *processes* decode two JPEG 2000 images at once (benchmarks/inference.py).
* A decoder that crashes or is killed on a hostile codestream costs that image ("not assessed" with
  the reason), not the gateway process and its listener.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from types import TracebackType

import numpy as np
import pydicom
from osteogate.gateway.work.region import detect_region
from osteogate.model.card import InputSpec
from osteogate.model.preprocess import PreparedImage
from pydicom.dataset import Dataset

CLASSIFIED_MODALITIES = frozenset({"CR", "DX"})
THUMBNAIL_MAX = 512  # longest side of the source-image copies kept for the result card
DECODER_DIED = ("the decoder process died on this image (its pixel data crashed or exhausted the "
                "decoder)")


@dataclass(frozen=True)
class DecodeRequest:
    path: str  # absolute path of the spooled file
    long_side: int  # what the model's preprocessing needs (model.preprocess.needed_long_side)
    spec: InputSpec
    regions: tuple[str, ...]  # regions the model has heads for
    thumbnail: bool  # keep a small copy for the result card


@dataclass
class Decoded:
    header: Dataset  # the instance without pixel data (the SR and card need only the header)
    skip_reason: str | None = None
    region: str | None = None
    decode_ms: float | None = None
    thumbnail: np.ndarray | None = None
    prepared: PreparedImage | None = None
    decoder_peak_kib: int | None = None  # peak RSS of the decoder process that made it (Linux), if any


def decode_for_model(request: DecodeRequest) -> Decoded:
    """One instance -> header, region, thumbnail and network inputs, or the reason it is not scored.

    Pixel data that cannot be decoded is a skip reason, not an exception; anything else raised is a
    fault of the gateway and is raised (the job is retried, then failed with the reason)."""
    from osteogate.model.pixels import PixelDecodeError, dataset_to_image
    from osteogate.model.preprocess import prepare_image

    t0 = time.perf_counter()
    try:
        ds = pydicom.dcmread(request.path)
    except Exception as exc:
        return Decoded(Dataset(), skip_reason=f"spooled file unreadable: {type(exc).__name__}")
    decoded = _screen(ds, request)
    if decoded.skip_reason:
        return decoded
    try:
        # Codestream header checked first (bombs refused), then decoded at the model's size.
        image = dataset_to_image(ds, request.long_side)
    except PixelDecodeError as exc:
        decoded.skip_reason = f"pixel data could not be decoded: {exc}"
        return decoded
    decoded.decode_ms = (time.perf_counter() - t0) * 1000
    if request.thumbnail:
        decoded.thumbnail = thumbnail(image)
    decoded.prepared = prepare_image(image, request.spec)
    return decoded


def header_only(ds: Dataset) -> Dataset:
    """A copy without pixel data: the SR needs only the header, and big arrays should be freed."""
    header = Dataset()
    # get_item: elements as read (raw), unconverted. Iterating the dataset would convert every value,
    # and one malformed optional value (an IS of "1e400") would then cost the whole study.
    for tag in ds.keys():  # noqa: SIM118 - iterating a Dataset yields converted elements
        if tag.group != 0x7FE0:
            header[tag] = ds.get_item(tag)
    header.file_meta = ds.file_meta
    return header


def _screen(ds: Dataset, request: DecodeRequest) -> Decoded:
    """The header checks before any pixel is decoded: modality, then region."""
    decoded = Decoded(header_only(ds))
    modality = str(ds.get("Modality", "")).upper()
    if modality not in CLASSIFIED_MODALITIES:
        decoded.skip_reason = f"out of scope: modality {modality or 'missing'}"
        return decoded
    decision = detect_region(ds)
    if not decision.known:
        decoded.skip_reason = f"region unknown ({decision.source})"
    elif decision.region not in request.regions:
        decoded.skip_reason = f"region {decision.region} not supported by the model"
    else:
        decoded.region = decision.region
    return decoded


def thumbnail(image: np.ndarray, max_side: int = THUMBNAIL_MAX) -> np.ndarray:
    """A small uint8 greyscale copy of a decoded image (float in [0, 1], display-ready), for the card.

    Made right after decoding so the worker never holds full-size images for the card. Area
    averaging (OpenCV): for a 2x reduction as good as Lanczos to the eye at 512 px, and ~10x
    cheaper (it runs for every image, beside the model)."""
    import cv2

    array = np.asarray(image)
    if array.ndim == 3:  # colour or multi-sample: luminance is enough for a thumbnail
        array = array[..., :3].mean(axis=-1) if array.shape[-1] in (3, 4) else array[0]
    if array.dtype != np.uint8:
        array = np.nan_to_num(array.astype(np.float32, copy=False), nan=0.0)
    height, width = array.shape[:2]
    scale = max_side / max(height, width)
    if scale < 1.0:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        array = cv2.resize(array, size, interpolation=cv2.INTER_AREA)
    if array.dtype != np.uint8:
        low, high = float(array.min()), float(array.max())
        if not 0.0 <= low <= high <= 1.0:
            array = (array - low) / (high - low) if high > low else np.zeros_like(array)
        array = (np.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return np.ascontiguousarray(array)


# -- decoder processes ---------------------------------------------------------------------------


def _decode_in_process(request: DecodeRequest) -> Decoded:
    """``decode_for_model`` in a decoder process, with that process's peak memory so far."""
    decoded = decode_for_model(request)
    decoded.decoder_peak_kib = _peak_rss_kib()
    return decoded


def _peak_rss_kib() -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _decoder_start(gateway_pid: int, gateway_started: str | None) -> None:
    """Decoder process start. No library warning or log record reaches stderr from here (pydicom
    warns with the offending value, a birth date or a UID); the worker reports what matters. And the
    decoder exits when the gateway process is gone: a process pool's workers otherwise wait for work
    for ever after their parent is killed (SIGKILL, OOM), and each crash would leave two behind."""
    import logging

    warnings.simplefilter("ignore")
    logging.disable(logging.CRITICAL)
    threading.Thread(target=_exit_with_gateway, args=(gateway_pid, gateway_started),
                     name="osteogate-decoder-watch", daemon=True).start()


def _exit_with_gateway(gateway_pid: int, gateway_started: str | None, interval: float = 1.0) -> None:
    while True:
        time.sleep(interval)
        try:
            os.kill(gateway_pid, 0)
            alive = gateway_started is None or _process_started(gateway_pid) == gateway_started
        except ProcessLookupError:
            alive = False
        except PermissionError:  # exists (another user's process would be a reused PID: see above)
            alive = gateway_started is None
        if not alive:
            os._exit(0)


def _process_started(pid: int) -> str | None:
    """The process's start time in clock ticks (Linux /proc), so a reused PID is not taken for it."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            return stat.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


_context_lock = threading.Lock()
_context: multiprocessing.context.BaseContext | None = None


def _process_context() -> multiprocessing.context.BaseContext:
    """forkserver: forking the threaded gateway itself is unsafe; the fork server is a clean process
    that imports the decoders once, so a pool starts in milliseconds after the first."""
    global _context
    with _context_lock:
        if _context is None:
            context = multiprocessing.get_context("forkserver")
            # "__main__" too: each decoder otherwise re-runs the main script's imports on start
            # (multiprocessing's main-module fix-up; for `osteogate serve` the whole CLI).
            context.set_forkserver_preload(["__main__", "osteogate.gateway.work.decoding", "osteogate.model.pixels"])
            _context = context
        return _context


class DecoderPool:
    """``processes`` decoder processes, started at the first ``decode`` and kept until ``close`` (the
    worker keeps one between studies: a fresh decoder's first image costs ~0.1 s of library start-up).
    ``decode`` is called from the worker's decode threads, one request each at a time.

    A decoder that dies (segfault, out-of-memory kill) breaks the pool: every request then in flight
    is retried alone in a fresh process, so the image that kills its decoder again is the one skipped
    with ``DECODER_DIED``, and the others are decoded. Where decoder processes cannot run at all (no
    usable /dev/shm, a fork server that cannot start, an embedding main script that fails in a
    child), images are decoded in the calling thread instead, and that is logged once: slower, never
    an image lost to the machinery."""

    def __init__(self, processes: int, work: Callable[[DecodeRequest], Decoded] | None = None,
                 initializer: Callable[..., None] | None = None) -> None:
        self.processes = max(1, processes)
        self.work = work or _decode_in_process  # module-level functions (pickled by name)
        self.initializer = initializer or _decoder_start
        self._gateway = (os.getpid(), _process_started(os.getpid()))
        self.unavailable: str | None = None  # why decoder processes are not used, once they are not
        self._lock = threading.Lock()
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> DecoderPool:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    def _executor(self, processes: int) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(processes, mp_context=_process_context(), initializer=self.initializer,
                                   initargs=self._gateway)

    def _current(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = self._executor(self.processes)
            return self._pool

    def _discard(self, broken: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._pool is broken:
                self._pool = None
        broken.shutdown(wait=False, cancel_futures=True)

    def decode(self, request: DecodeRequest) -> Decoded:
        if self.unavailable:
            return decode_for_model(request)
        try:
            pool = self._current()
        except (OSError, NotImplementedError, RuntimeError) as exc:  # no semaphores, no fork server...
            return self._in_thread(request, f"{type(exc).__name__}: {exc}")
        try:
            return pool.submit(self.work, request).result()
        except BrokenProcessPool:  # a decoder died (on this image or another one in flight)
            self._discard(pool)
        except (OSError, NotImplementedError) as exc:  # a decoder process could not be started
            return self._in_thread(request, f"{type(exc).__name__}: {exc}")
        try:
            with self._executor(1) as lone:
                return lone.submit(self.work, request).result()
        except BrokenProcessPool:
            pass
        except (OSError, NotImplementedError, RuntimeError) as exc:
            return self._in_thread(request, f"{type(exc).__name__}: {exc}")
        if not self._processes_start():
            return self._in_thread(request, "decoder processes die at start")
        # Twice fatal to its decoder, while a decoder that is given nothing survives: this image is
        # not assessed. Its header is still read here (no pixel data) so the SR names it and says why.
        try:
            decoded = _screen(pydicom.dcmread(request.path, stop_before_pixels=True), request)
        except Exception as exc:
            return Decoded(Dataset(), skip_reason=f"spooled file unreadable: {type(exc).__name__}")
        decoded.region, decoded.skip_reason = None, DECODER_DIED
        return decoded

    def _processes_start(self) -> bool:
        try:
            with self._executor(1) as probe:
                return probe.submit(abs, 0).result(timeout=120) == 0
        except Exception:
            return False

    def _in_thread(self, request: DecodeRequest, reason: str) -> Decoded:
        with self._lock:
            first = self.unavailable is None
            self.unavailable = reason
        if first:
            from osteogate.gateway.core.logs import get_logger

            get_logger("osteogate.gateway.work.decoding").warning(
                "decoder_processes_unavailable", reason=reason[:200],
                detail="images are decoded in the worker process instead (slower for JPEG 2000)")
        return decode_for_model(request)

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
