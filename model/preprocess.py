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

# Patch rule (deterministic, serving): candidates on a grid with stride patch_size/2, restricted to the
# central CENTRAL_FRACTION of each axis (side markers, labels and collimator edges live near the borders);
# each candidate is scored by mean + std of its pixels (bone is bright and textured, background is dark
# and flat); the best are taken greedily, skipping candidates overlapping a chosen one by more than
# MAX_OVERLAP of their area. If fewer survive than needed, the best-ranked are reused in order.
CENTRAL_FRACTION = 0.8
MAX_OVERLAP = 0.5
RANDOM_CANDIDATE_FACTOR = 4  # training: score 4x random candidates, keep the best -> random but on bone


def _as_2d(image: np.ndarray) -> np.ndarray:
    array = np.asarray(image, dtype=np.float32)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 2 or min(array.shape) < 1:
        raise ValueError(f"expected a 2-D grayscale image, got shape {array.shape}")
    return array


def resize_long_side(image: np.ndarray, long_side: int) -> np.ndarray:
    """Resize so the longer side equals ``long_side`` (aspect kept). INTER_AREA when shrinking (no aliasing
    of trabecular texture), INTER_LINEAR when enlarging."""
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
    so callers resize first. Fill 0 = black, like radiograph background after VOI."""
    array = _as_2d(image)
    out_h, out_w = (size, size) if isinstance(size, int) else size
    out_h, out_w = max(out_h, array.shape[0]), max(out_w, array.shape[1])
    canvas = np.full((out_h, out_w), fill, dtype=np.float32)
    top, left = (out_h - array.shape[0]) // 2, (out_w - array.shape[1]) // 2
    canvas[top:top + array.shape[0], left:left + array.shape[1]] = array
    return canvas


def _integrals(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f64 = image.astype(np.float64)
    return cv2.integral(f64), cv2.integral(f64 * f64)


def _mean_std(window_sum: np.ndarray, window_squares: np.ndarray, patch: int) -> tuple[np.ndarray, np.ndarray]:
    area = float(patch * patch)
    mean = window_sum / area
    var = np.maximum(window_squares / area - mean * mean, 0.0)
    return mean, np.sqrt(var)


def box_stats(image: np.ndarray, patch: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std of every patch x patch window (indexed by top-left) via integral images: O(pixels)."""
    total, squares = _integrals(image)

    def window(integral: np.ndarray) -> np.ndarray:
        return integral[patch:, patch:] - integral[:-patch, patch:] - integral[patch:, :-patch] + integral[:-patch, :-patch]

    return _mean_std(window(total), window(squares), patch)


def box_stats_at(image: np.ndarray, patch: int, ys: np.ndarray, xs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``box_stats`` at the given top-left positions only: the same integral images and the same
    arithmetic, element for element (so the same scores), without the full-size maps that serving
    never looks at (about 10x less work per image at working size 1024)."""
    total, squares = _integrals(image)

    def window(integral: np.ndarray) -> np.ndarray:
        return integral[ys + patch, xs + patch] - integral[ys, xs + patch] - integral[ys + patch, xs] + integral[ys, xs]

    return _mean_std(window(total), window(squares), patch)


def central_range(length: int, patch: int) -> tuple[int, int]:
    """Allowed top-left range along one axis so the patch stays within the central region."""
    margin = int(length * (1 - CENTRAL_FRACTION) / 2)
    low, high = margin, length - margin - patch
    if high < low:  # central region smaller than a patch: allow the whole axis
        low, high = 0, length - patch
    return low, max(low, high)


def _overlap(a: tuple[int, int], b: tuple[int, int], patch: int) -> float:
    dy, dx = max(0, patch - abs(a[0] - b[0])), max(0, patch - abs(a[1] - b[1]))
    return dy * dx / float(patch * patch)


def select_positions(candidates: list[tuple[int, int]], scores: np.ndarray, count: int, patch: int) -> list[tuple[int, int]]:
    order = sorted(range(len(candidates)), key=lambda i: (-scores[i], candidates[i]))  # ties: top-left first
    chosen: list[tuple[int, int]] = []
    for index in order:
        position = candidates[index]
        if all(_overlap(position, other, patch) <= MAX_OVERLAP for other in chosen):
            chosen.append(position)
            if len(chosen) == count:
                return chosen
    ranked = [candidates[i] for i in order]
    while len(chosen) < count:  # small image: reuse the best positions (duplicates only reweight the mean)
        chosen.append(ranked[(len(chosen)) % len(ranked)])
    return chosen


def patch_positions(image: np.ndarray, spec: InputSpec, rng: np.random.Generator | None = None) -> list[tuple[int, int]]:
    """Top-left (y, x) of the patches for an image already at working size (see module rule)."""
    patch = spec.patch_size
    height, width = image.shape
    (y0, y1), (x0, x1) = central_range(height, patch), central_range(width, patch)
    if rng is None:
        stride = max(1, patch // 2)
        ys = sorted({*range(y0, y1 + 1, stride), y1})
        xs = sorted({*range(x0, x1 + 1, stride), x1})
        candidates = [(y, x) for y in ys for x in xs]
    else:
        n = spec.patches_per_image * RANDOM_CANDIDATE_FACTOR
        candidates = list(zip(rng.integers(y0, y1 + 1, n).tolist(), rng.integers(x0, x1 + 1, n).tolist(), strict=True))
    ys, xs = (np.array(axis, dtype=np.intp) for axis in zip(*candidates, strict=True))
    mean, std = box_stats_at(image, patch, ys, xs)
    return select_positions(candidates, mean + std, spec.patches_per_image, patch)


Box = tuple[float, float, float, float]  # (x0, y0, x1, y1) as fractions of the source image


def extract_patches(image: np.ndarray, spec: InputSpec, rng: np.random.Generator | None = None) -> np.ndarray:
    """``[patches_per_image, patch_size, patch_size]`` float32 patches.

    The image is brought to ``working_size`` on its long side first (a no-op when it already is), so the
    patch scale is the same whatever the caller passes; images smaller than a patch are letterboxed.
    ``rng=None`` -> the deterministic serving rule; a Generator -> random positions (training).
    """
    return extract_patches_with_boxes(image, spec, rng)[0]


def working_image(image: np.ndarray, spec: InputSpec, patch: int) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """The image at ``working_size`` (letterboxed when smaller than ``patch``) and where the resized
    image sits on it: (top, left, height, width). Training's PatchSampler cuts from the same image."""
    array = _as_2d(image)
    if max(array.shape) != spec.working_size:
        array = resize_long_side(array, spec.working_size)
    height, width = array.shape
    if min(array.shape) < patch:
        array = letterbox(array, patch)
    top, left = (array.shape[0] - height) // 2, (array.shape[1] - width) // 2
    return array, (top, left, height, width)


def box_fractions(y: int, x: int, size: int, placement: tuple[int, int, int, int]) -> Box:
    """A ``size`` square at (y, x) of the working image as (x0, y0, x1, y1) fractions of the source."""
    top, left, height, width = placement

    def clip(v: float) -> float:
        return round(min(1.0, max(0.0, v)), 4)

    return (clip((x - left) / width), clip((y - top) / height),
            clip((x - left + size) / width), clip((y - top + size) / height))


def extract_patches_with_boxes(image: np.ndarray, spec: InputSpec, rng: np.random.Generator | None = None
                               ) -> tuple[np.ndarray, list[Box]]:
    """``extract_patches`` plus each patch's area as fractions of the source image (result card)."""
    patch = spec.patch_size
    array, placement = working_image(image, spec, patch)
    positions = patch_positions(array, spec, rng)
    patches = np.stack([array[y:y + patch, x:x + patch] for y, x in positions]).astype(np.float32, copy=False)
    return patches, [box_fractions(y, x, patch, placement) for y, x in positions]


def normalize(array: np.ndarray, spec: InputSpec) -> np.ndarray:
    """[H, W], [N, H, W] or [N, C, H, W] in [0, 1] -> float32 [N, C, H, W] replicated to ``spec.channels``
    and standardised with ``spec.mean``/``spec.std`` (ImageNet stats by default, matching pretrained
    backbones)."""
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
    """Serving preprocessing: float32 ``[N, C, H, W]`` (N = 1 whole, patches_per_image in patches mode)."""
    array = _as_2d(image)
    if spec.mode == "whole":
        return normalize(letterbox(resize_long_side(array, spec.size), spec.size), spec)
    return normalize(extract_patches(array, spec), spec)


def prepare_with_boxes(image: np.ndarray, spec: InputSpec) -> tuple[np.ndarray, list[Box]]:
    """``prepare`` plus the analysed areas as fractions of the source image (whole mode: the image)."""
    array = _as_2d(image)
    if spec.mode == "whole":
        return normalize(letterbox(resize_long_side(array, spec.size), spec.size), spec), [(0.0, 0.0, 1.0, 1.0)]
    patches, boxes = extract_patches_with_boxes(array, spec)
    return normalize(patches, spec), boxes
def needed_long_side(spec: InputSpec) -> int:
    """The long side, in pixels, that preprocessing brings every image to: ``working_size`` in patches
    mode, ``size`` in whole mode. Decoding more than this is wasted (model.pixels decodes JPEG 2000
    and baseline JPEG at reduced resolution down to it)."""
    return spec.working_size if spec.mode == "patches" else spec.size


@dataclass(frozen=True)
class PreparedImage:
    """An image made into network inputs: ``inputs`` (n, C, H, W) float32 and the analysed areas as
    fractions of the source image. Pure numpy and picklable, so a decode thread or process makes it
    while the model scores the previous image."""

    inputs: np.ndarray
    boxes: tuple[Box, ...]


def prepare_image(image: np.ndarray, spec: InputSpec) -> PreparedImage:
    """``prepare_with_boxes`` as one object."""
    inputs, boxes = prepare_with_boxes(image, spec)
    return PreparedImage(inputs, tuple(boxes))
