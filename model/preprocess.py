"""Image (float32 HxW in [0, 1]) -> network input float32 ``[N, C, H, W]`` according to ``card.input``.

* ``whole``: resize the long side to ``size`` (aspect kept), letterbox to ``size x size``; N = 1.
* ``patches``: resize the long side to ``working_size``; take ``patches_per_image`` patches of
  ``patch_size`` (``extract_patches``); N = patches_per_image. Scores are pooled later (inference.py).

The building blocks are public so the training pipeline can insert augmentation between them while
keeping the exact same resize, patch rule and normalisation as serving.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from osteogate.model.card import InputSpec
from osteogate.model.patch_select import (  # noqa: F401 - re-exported: callers import them from here
    CENTRAL_FRACTION,
    MAX_OVERLAP,
    RANDOM_CANDIDATE_FACTOR,
    box_stats,
    box_stats_at,
    central_range,
    patch_positions,
    select_positions,
)


def _as_2d(image: np.ndarray) -> np.ndarray:
    array = np.asarray(image, dtype=np.float32)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 2 or min(array.shape) < 1:
        raise ValueError(f"expected a 2-D grayscale image, got shape {array.shape}")
    return array


def resize_long_side(image: np.ndarray, long_side: int) -> np.ndarray:
    """Resize so the longer side equals ``long_side`` (aspect kept). INTER_AREA when shrinking (no aliasing
    of trabecular texture), INTER_LINEAR when enlarging.

    Parameters
    ----------
    image : numpy.ndarray
        [H, W] float image.
    long_side : int
        Target long side.

    Returns
    -------
    numpy.ndarray
    """
    array = _as_2d(image)
    height, width = array.shape
    scale = long_side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if size == (width, height):
        return array.copy()  # always a new array: training augments the result in place
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return cv2.resize(array, size, interpolation=interpolation)


def letterbox(image: np.ndarray, size: int | tuple[int, int], fill: float = 0.0) -> np.ndarray:
    """Centre ``image`` on a ``fill`` canvas of ``size`` (int or (height, width)); never shrinks the image,
    so callers resize first. Fill 0 = black, like radiograph background after VOI.

    Parameters
    ----------
    image : numpy.ndarray
        [H, W] image.
    size : int or tuple of int
        Canvas size.
    fill : float
        Background value.

    Returns
    -------
    numpy.ndarray
    """
    array = _as_2d(image)
    out_h, out_w = (size, size) if isinstance(size, int) else size
    out_h, out_w = max(out_h, array.shape[0]), max(out_w, array.shape[1])
    canvas = np.full((out_h, out_w), fill, dtype=np.float32)
    top, left = (out_h - array.shape[0]) // 2, (out_w - array.shape[1]) // 2
    canvas[top:top + array.shape[0], left:left + array.shape[1]] = array
    return canvas


Box = tuple[float, float, float, float]  # (x0, y0, x1, y1) as fractions of the source image


def extract_patches(image: np.ndarray, spec: InputSpec, rng: np.random.Generator | None = None) -> np.ndarray:
    """``[patches_per_image, patch_size, patch_size]`` float32 patches.

    The image is brought to ``working_size`` on its long side first (a no-op when it already is), so the
    patch scale is the same whatever the caller passes; images smaller than a patch are letterboxed.
    ``rng=None`` -> the deterministic serving rule; a Generator -> random positions (training).

    Parameters
    ----------
    image : numpy.ndarray
        [H, W] image in [0, 1].
    spec : InputSpec
        The card's input spec.
    rng : numpy.random.Generator or None
        Training jitter.

    Returns
    -------
    numpy.ndarray
    """
    return extract_patches_with_boxes(image, spec, rng)[0]


def working_image(image: np.ndarray, spec: InputSpec, patch: int) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """The image at ``working_size`` (letterboxed when smaller than ``patch``) and where the resized
    image sits on it: (top, left, height, width). Training's PatchSampler cuts from the same image.

    Parameters
    ----------
    image : numpy.ndarray
        [H, W] image.
    spec : InputSpec
        The input spec.
    patch : int
        Patch size.

    Returns
    -------
    tuple of (numpy.ndarray, tuple of int)
    """
    array = _as_2d(image)
    if max(array.shape) != spec.working_size:
        array = resize_long_side(array, spec.working_size)
    height, width = array.shape
    if min(array.shape) < patch:
        array = letterbox(array, patch)
    top, left = (array.shape[0] - height) // 2, (array.shape[1] - width) // 2
    return array, (top, left, height, width)


def box_fractions(y: int, x: int, size: int, placement: tuple[int, int, int, int]) -> Box:
    """A ``size`` square at (y, x) of the working image as (x0, y0, x1, y1) fractions of the source.

    Parameters
    ----------
    y, x : int
        Top-left in the working image.
    size : int
        Square size.
    placement : tuple of int
        Where the source sits in the working image.

    Returns
    -------
    Box
    """
    top, left, height, width = placement

    def clip(v: float) -> float:
        return round(min(1.0, max(0.0, v)), 4)

    return (clip((x - left) / width), clip((y - top) / height),
            clip((x - left + size) / width), clip((y - top + size) / height))


def extract_patches_with_boxes(image: np.ndarray, spec: InputSpec, rng: np.random.Generator | None = None
                               ) -> tuple[np.ndarray, list[Box]]:
    """``extract_patches`` plus each patch's area as fractions of the source image (result card).

    Parameters
    ----------
    image : numpy.ndarray
        [H, W] image.
    spec : InputSpec
        The input spec.
    rng : numpy.random.Generator or None
        Training jitter.

    Returns
    -------
    tuple of (numpy.ndarray, list of Box)
    """
    patch = spec.patch_size
    array, placement = working_image(image, spec, patch)
    positions = patch_positions(array, spec, rng)
    patches = np.stack([array[y:y + patch, x:x + patch] for y, x in positions]).astype(np.float32, copy=False)
    return patches, [box_fractions(y, x, patch, placement) for y, x in positions]


def normalize(array: np.ndarray, spec: InputSpec) -> np.ndarray:
    """[H, W], [N, H, W] or [N, C, H, W] in [0, 1] -> float32 [N, C, H, W] replicated to ``spec.channels``
    and standardised with ``spec.mean``/``spec.std`` (ImageNet stats by default, matching pretrained
    backbones).

    Parameters
    ----------
    array : numpy.ndarray
        Images in [0, 1].
    spec : InputSpec
        Mean, std, channels.

    Returns
    -------
    numpy.ndarray
    """
    data = np.asarray(array, dtype=np.float32)
    if data.ndim == 2:
        data = data[None, None]
    elif data.ndim == 3:
        data = data[:, None]
    elif data.ndim != 4:
        raise ValueError(f"expected [H,W], [N,H,W] or [N,C,H,W], got shape {data.shape}")
    if data.shape[1] == 1 and spec.channels > 1:
        data = np.repeat(data, spec.channels, axis=1)
    if data.shape[1] != spec.channels:
        raise ValueError(f"expected {spec.channels} channels, got {data.shape[1]}")
    mean = np.asarray(spec.mean, dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(spec.std, dtype=np.float32).reshape(1, -1, 1, 1)
    return np.ascontiguousarray((data - mean) / std, dtype=np.float32)


def prepare(image: np.ndarray, spec: InputSpec) -> np.ndarray:
    """Serving preprocessing: float32 ``[N, C, H, W]`` (N = 1 whole, patches_per_image in patches mode).

    Parameters
    ----------
    image : numpy.ndarray
        [H, W] image in [0, 1].
    spec : InputSpec
        The input spec.

    Returns
    -------
    numpy.ndarray
    """
    array = _as_2d(image)
    if spec.mode == "whole":
        return normalize(letterbox(resize_long_side(array, spec.size), spec.size), spec)
    return normalize(extract_patches(array, spec), spec)


def prepare_with_boxes(image: np.ndarray, spec: InputSpec) -> tuple[np.ndarray, list[Box]]:
    """``prepare`` plus the analysed areas as fractions of the source image (whole mode: the image).

    Parameters
    ----------
    image : numpy.ndarray
        [H, W] image in [0, 1].
    spec : InputSpec
        The input spec.

    Returns
    -------
    tuple of (numpy.ndarray, list of Box)
    """
    array = _as_2d(image)
    if spec.mode == "whole":
        return normalize(letterbox(resize_long_side(array, spec.size), spec.size), spec), [(0.0, 0.0, 1.0, 1.0)]
    patches, boxes = extract_patches_with_boxes(array, spec)
    return normalize(patches, spec), boxes
def needed_long_side(spec: InputSpec) -> int:
    """The long side, in pixels, that preprocessing brings every image to: ``working_size`` in patches
    mode, ``size`` in whole mode. Decoding more than this is wasted (model.pixels decodes JPEG 2000
    and baseline JPEG at reduced resolution down to it).

    Parameters
    ----------
    spec : InputSpec
        The input spec.

    Returns
    -------
    int
    """
    return spec.working_size if spec.mode == "patches" else spec.size


@dataclass(frozen=True)
class PreparedImage:
    """An image made into network inputs: ``inputs`` (n, C, H, W) float32 and the analysed areas as
    fractions of the source image. Pure numpy and picklable, so a decode thread or process makes it
    while the model scores the previous image."""

    inputs: np.ndarray
    boxes: tuple[Box, ...]


def prepare_image(image: np.ndarray, spec: InputSpec) -> PreparedImage:
    """``prepare_with_boxes`` as one object.

    Parameters
    ----------
    image : numpy.ndarray
        [H, W] image in [0, 1].
    spec : InputSpec
        The input spec.

    Returns
    -------
    PreparedImage
    """
    inputs, boxes = prepare_with_boxes(image, spec)
    return PreparedImage(inputs, tuple(boxes))
