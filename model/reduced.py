"""Reduced-resolution decoding: a JPEG 2000 codestream read at a lower resolution level
(OpenJPEG ``reduce``) and a baseline JPEG decoded with DCT scaling (libjpeg ``draft``), so a
2048-pixel radiograph is never fully decoded for a 512-pixel model input; the J2K result is
filtered to match what "decode full, then resize" gives (tests/test_decode_parity.py).
"""

from __future__ import annotations

import functools
from io import BytesIO

import cv2
import numpy as np
from osteogate.model.codestream import (
    CodestreamInfo,
)
from pydicom.dataset import Dataset

MAX_REDUCTION_STEPS = 2  # deepest reduced decode: 1/4 (1/8 deviates more: tests/test_decode_parity.py)


def reduction_steps(long: int, long_side: int, deepest: int) -> int:
    """Largest k <= ``deepest`` such that halving ``long`` k times (rounding up, as JPEG 2000 and
    libjpeg do) still leaves at least ``long_side``: the model never gets an enlarged image.

    Parameters
    ----------
    long : int
        The image's long side at full resolution.
    long_side : int
        The long side the model needs.
    deepest : int
        The most halvings the codestream (and parity) allows.

    Returns
    -------
    int
        The number of halvings to decode with.
    """
    steps = 0
    while steps < deepest and -(-long // 2 ** (steps + 1)) >= long_side:
        steps += 1
    return steps


# JPEG 2000 analysis low-pass filters (T.800 Annex F), DC gain 1: a reduced resolution level is the
# image filtered by these and decimated by 2, once per level.
_J2K_LOWPASS = {
    True: np.array([-1, 2, 6, 2, -1]) / 8.0,  # 5/3 reversible (lossless)
    False: np.array([0.026748757411, -0.016864118443, -0.078223266529, 0.266864118443, 0.602949018236,
                     0.266864118443, -0.078223266529, -0.016864118443, 0.026748757411]),  # 9/7 irreversible
}


@functools.cache
def box_matching_filter(reversible: bool, levels: int) -> np.ndarray:
    """3-tap correlation kernel (offsets -1, 0, +1 on the reduced grid) that turns a JPEG 2000 image
    reduced by ``levels`` into the closest match of the 2**levels box average cv2.INTER_AREA makes
    of the full image, which is what "decode full, then resize" gives.

    Why: the wavelet low-pass keeps more fine texture and noise than a box average and its samples
    sit half a full-resolution pixel from the box's; uncorrected, the model input differs up to 0.13
    (in [0, 1]) near edges and patch choices flip; corrected, max 0.05 (tests/test_decode_parity.py).
    Derivation: by the noble identity, filtering with g after decimation equals filtering with g
    upsampled before it, so g is the least-squares fit, on the full-resolution grid (aliasing
    included), of g(z**D) H(z) H(z**2)... to the D-pixel box, with the DC gain held at 1.

    Parameters
    ----------
    reversible : bool
        The codestream's wavelet: reversible 5/3 (True) or irreversible 9/7.
    levels : int
        Resolution levels dropped.

    Returns
    -------
    numpy.ndarray
        The 3 filter taps.
    """
    lowpass = _J2K_LOWPASS[reversible]
    factor = 2**levels
    cascade, centre = np.array([1.0]), 0
    for level in range(levels):
        spread = np.zeros((len(lowpass) - 1) * 2**level + 1)
        spread[:: 2**level] = lowpass
        cascade = np.convolve(cascade, spread)
        centre += (len(lowpass) // 2) * 2**level
    offsets = np.arange(-1, 2)
    positions = np.arange(-centre - 2 * factor, centre + 3 * factor)
    target = ((positions >= 0) & (positions < factor)) / factor
    design = np.zeros((len(positions), len(offsets)))
    for column, offset in enumerate(offsets):
        index = positions - factor * offset + centre
        inside = (index >= 0) & (index < len(cascade))
        design[inside, column] = cascade[index[inside]]
    weight = 1e3  # the DC-gain row: brightness must not change
    taps, *_ = np.linalg.lstsq(np.vstack([design, weight * np.ones(len(offsets))]),
                               np.concatenate([target, [weight]]), rcond=None)
    return taps.astype(np.float32)


def decode_reduced(ds: Dataset, info: CodestreamInfo, frame: bytes, long_side: int) -> np.ndarray | None:
    """The first frame decoded directly at a reduced size, or None when this codestream cannot be
    (then the caller decodes it at full size). Monochrome only: colour goes through pydicom."""
    from PIL import Image

    if info.rows is None or info.columns is None or info.components != 1:
        return None
    long = max(info.rows, info.columns)
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    try:
        if info.kind == "jpeg2000" and info.signed == signed:
            steps = reduction_steps(long, long_side, min(info.levels, MAX_REDUCTION_STEPS))
            if steps == 0:
                return None
            with Image.open(BytesIO(frame)) as opened:
                opened.reduce = steps  # OpenJPEG skips the finest `steps` resolution levels
                opened.load()
                array = np.asarray(opened)
            # Pillow scales samples up to its container (8 or 16 bits) and offsets signed ones by
            # 2**(precision-1): undo both to get the stored values pydicom would have returned.
            container = 16 if array.dtype == np.uint16 else 8
            values = array.astype(np.int32)
            if container > info.precision:
                values >>= container - info.precision
            if info.signed:
                values -= 1 << (info.precision - 1)
            kernel = box_matching_filter(info.reversible, steps)
            return cv2.sepFilter2D(values.astype(np.float32), -1, kernel, kernel, borderType=cv2.BORDER_REPLICATE)
        if (info.kind == "jpeg" and info.precision == 8 and not signed
                and info.process in ("baseline", "extended", "progressive")):
            steps = reduction_steps(long, long_side, min(3, MAX_REDUCTION_STEPS))  # libjpeg: 1/2, 1/4, 1/8
            if steps == 0:
                return None
            with Image.open(BytesIO(frame)) as opened:
                if opened.mode != "L":
                    return None
                factor = 2**steps
                opened.draft("L", (max(1, opened.width // factor), max(1, opened.height // factor)))
                return np.asarray(opened)
    except Exception:  # Pillow/OpenJPEG refused this stream: the full decode reports any real error
        return None
    return None


