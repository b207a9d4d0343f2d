"""Decode every image once with the gateway's decoder and keep a uint8 copy at the working size.

Decoding a 1024-2000 px JPEG/DICOM costs far more than a training step on a 96 px patch, so the
decoded image is cached as `.npy` (long side <= working_size) under ~/.cache or /tmp -- never in
the repository. The key covers path, size, mtime and working size, so edits invalidate it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
from osteogate.model.pixels import load_image_file
from osteogate.model.preprocess import resize_long_side

DEFAULT_CACHE = Path(os.environ.get("OSTEOGATE_CACHE", "/tmp/osteogate-cache"))


def decode(path: Path, long_side: int | None = None) -> np.ndarray:
    """float32 HxW in [0, 1] via model/pixels.py: training and serving must see identical pixels
    (with ``long_side``, DICOM is decoded at the model's size exactly as the worker does)."""
    return np.asarray(load_image_file(Path(path), long_side), dtype=np.float32)


def to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)


class ImageCache:
    """`get(path)` -> uint8 HxW with long side <= working_size (never upscaled)."""

    def __init__(self, working_size: int, root: Path | None = None) -> None:
        self.working_size = int(working_size)
        self.root = Path(root) if root else DEFAULT_CACHE
        self.root.mkdir(parents=True, exist_ok=True)

    def _key(self, path: Path) -> Path:
        stat = Path(path).stat()
        raw = f"{Path(path).resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{self.working_size}|serving-v2"
        return self.root / f"{hashlib.sha1(raw.encode()).hexdigest()}.npy"

    def get(self, path: Path) -> np.ndarray:
        key = self._key(path)
        if key.exists():
            try:
                return np.load(key)
            except (OSError, ValueError):
                key.unlink(missing_ok=True)  # half-written by a killed run: rebuild
        image = decode(path, self.working_size)  # the worker's decode at the working size
        if max(image.shape[:2]) > self.working_size:
            image = resize_long_side(image, self.working_size)
        array = to_uint8(image)
        tmp = key.with_suffix(f".{os.getpid()}.tmp.npy")
        np.save(tmp, array)
        tmp.replace(key)  # atomic: parallel runs never read a partial file
        return array
