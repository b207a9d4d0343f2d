"""Where the patches go: bone-seeking patch positions (integral-image window statistics, the
central region, greedy non-overlapping selection). Split out of model/preprocess.py, which
re-exports these names."""

from __future__ import annotations

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


def _integrals(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f64 = image.astype(np.float64)
    return cv2.integral(f64), cv2.integral(f64 * f64)


def _mean_std(window_sum: np.ndarray, window_squares: np.ndarray, patch: int) -> tuple[np.ndarray, np.ndarray]:
    area = float(patch * patch)
    mean = window_sum / area
    var = np.maximum(window_squares / area - mean * mean, 0.0)
    return mean, np.sqrt(var)


def box_stats(image: np.ndarray, patch: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std of every patch x patch window (indexed by top-left) via integral images: O(pixels).

    Parameters
    ----------
    image : numpy.ndarray
        [H, W] image.
    patch : int
        Window size.

    Returns
    -------
    tuple of numpy.ndarray
        Mean and standard deviation maps.
    """
    total, squares = _integrals(image)

    def window(integral: np.ndarray) -> np.ndarray:
        return integral[patch:, patch:] - integral[:-patch, patch:] - integral[patch:, :-patch] + integral[:-patch, :-patch]

    return _mean_std(window(total), window(squares), patch)


def box_stats_at(image: np.ndarray, patch: int, ys: np.ndarray, xs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``box_stats`` at the given top-left positions only: the same integral images and the same
    arithmetic, element for element (so the same scores), without the full-size maps that serving
    never looks at (about 10x less work per image at working size 1024).

    Parameters
    ----------
    image : numpy.ndarray
        [H, W] image.
    patch : int
        Window size.
    ys, xs : numpy.ndarray
        Top-left positions.

    Returns
    -------
    tuple of numpy.ndarray
    """
    total, squares = _integrals(image)

    def window(integral: np.ndarray) -> np.ndarray:
        return integral[ys + patch, xs + patch] - integral[ys, xs + patch] - integral[ys + patch, xs] + integral[ys, xs]

    return _mean_std(window(total), window(squares), patch)


def central_range(length: int, patch: int) -> tuple[int, int]:
    """Allowed top-left range along one axis so the patch stays within the central region.

    Parameters
    ----------
    length : int
        Axis length.
    patch : int
        Patch size.

    Returns
    -------
    tuple of int
    """
    margin = int(length * (1 - CENTRAL_FRACTION) / 2)
    low, high = margin, length - margin - patch
    if high < low:  # central region smaller than a patch: allow the whole axis
        low, high = 0, length - patch
    return low, max(low, high)


def _overlap(a: tuple[int, int], b: tuple[int, int], patch: int) -> float:
    dy, dx = max(0, patch - abs(a[0] - b[0])), max(0, patch - abs(a[1] - b[1]))
    return dy * dx / float(patch * patch)


def select_positions(candidates: list[tuple[int, int]], scores: np.ndarray, count: int, patch: int) -> list[tuple[int, int]]:
    """The ``count`` best-scoring candidate positions, spread out (non-maximum suppression by patch overlap).

    Parameters
    ----------
    candidates : list of (int, int)
        Top-left positions.
    scores : numpy.ndarray
        One score per candidate.
    count : int
        How many to keep.
    patch : int
        Patch size.

    Returns
    -------
    list of (int, int)
    """
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
    """Top-left (y, x) of the patches for an image already at working size (see module rule).

    Parameters
    ----------
    image : numpy.ndarray
        The working-size image.
    spec : InputSpec
        The card's input spec.
    rng : numpy.random.Generator or None
        Training jitter (None at serving).

    Returns
    -------
    list of (int, int)
    """
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
