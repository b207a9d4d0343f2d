"""Model inputs for training and evaluation, built from serving's preprocessing (model/preprocess.py).

Evaluation calls `model.preprocess.prepare` itself, so metrics describe what the gateway computes.
Training draws random patches with the same scoring rule (`extract_patches(..., rng)`: random
candidates inside the central region, best-scoring = on bone), but from a window `margin` times
larger than the patch so the random resized crop and rotation of augmentation have real context.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from osteogate.model.card import InputSpec
from osteogate.model.preprocess import (
    CENTRAL_FRACTION,
    MAX_OVERLAP,
    RANDOM_CANDIDATE_FACTOR,
    extract_patches,
    letterbox,
    normalize,
    prepare,
    resize_long_side,
)

__all__ = ["PatchSampler", "normalize", "prepare", "random_patches", "whole_view"]


def random_patches(image: np.ndarray, spec: InputSpec, count: int, rng: np.random.Generator, margin: float = 1.25) -> np.ndarray:
    """[count, w, w] float32 windows (w = margin x patch_size) at random on-bone positions."""
    window = min(int(spec.patch_size * margin), spec.working_size)
    training_spec = replace(spec, patch_size=window, patches_per_image=count)
    return extract_patches(image, training_spec, rng)


class PatchSampler:
    """Fast equivalent of `random_patches` for one image, reused across epochs.

    serving's rule scores every window by mean + std (bone is bright and textured); recomputing
    that map for every draw cost ~20 ms per image per step, more than a small network's step. The
    map is computed once here, on a `stride` grid, restricted to serving's central region; each
    draw scores RANDOM_CANDIDATE_FACTOR x count random grid positions and keeps the best, skipping
    those overlapping a chosen one by more than MAX_OVERLAP, like extract_patches(..., rng).
    """

    def __init__(self, image: np.ndarray, spec: InputSpec, margin: float = 1.25, stride: int = 8) -> None:
        """`image`: uint8 HxW (kept as uint8: a float copy of every training image would cost GBs)."""
        import cv2

        array = image.astype(np.float32) / 255.0
        if max(array.shape) != spec.working_size:
            array = resize_long_side(array, spec.working_size)
        self.window = min(int(spec.patch_size * margin), spec.working_size)
        if min(array.shape) < self.window:
            array = letterbox(array, self.window)
        same = array.shape == image.shape
        self.image = image if same else np.clip(np.rint(array * 255.0), 0, 255).astype(np.uint8)
        w = self.window
        total = cv2.integral(array.astype(np.float64))
        squares = cv2.integral(array.astype(np.float64) ** 2)
        ys = np.arange(*self._range(array.shape[0]), stride)
        xs = np.arange(*self._range(array.shape[1]), stride)
        yy, xx = np.meshgrid(ys, xs, indexing="ij")

        def box(integral: np.ndarray) -> np.ndarray:
            return (integral[yy + w, xx + w] - integral[yy, xx + w] - integral[yy + w, xx] + integral[yy, xx]) / (w * w)

        mean = box(total)
        self.scores = (mean + np.sqrt(np.maximum(box(squares) - mean**2, 0.0))).ravel()
        self.positions = np.stack([yy.ravel(), xx.ravel()], axis=1)

    def _range(self, length: int) -> tuple[int, int]:
        margin = int(length * (1 - CENTRAL_FRACTION) / 2)
        low, high = margin, length - margin - self.window
        if high < low:
            low, high = 0, length - self.window
        return low, max(low, high) + 1

    def sample(self, count: int, rng: np.random.Generator) -> np.ndarray:
        """[count, w, w] uint8 windows."""
        candidates = rng.integers(0, len(self.positions), count * RANDOM_CANDIDATE_FACTOR)
        order = candidates[np.argsort(-self.scores[candidates], kind="stable")]
        chosen: list[np.ndarray] = []
        for index in order:
            y, x = self.positions[index]
            if all(_overlap(y, x, other, self.window) <= MAX_OVERLAP for other in chosen):
                chosen.append(self.positions[index])
                if len(chosen) == count:
                    break
        while len(chosen) < count:
            chosen.append(self.positions[order[len(chosen) % len(order)]])
        w = self.window
        return np.stack([self.image[y : y + w, x : x + w] for y, x in chosen])


def _overlap(y: int, x: int, other: np.ndarray, window: int) -> float:
    dy = max(0, window - abs(int(y) - int(other[0])))
    dx = max(0, window - abs(int(x) - int(other[1])))
    return dy * dx / float(window * window)


def whole_view(image: np.ndarray, spec: InputSpec, margin: float = 1.15) -> np.ndarray:
    """Serving's resize + letterbox at margin x size: the random resized crop then brings it to size."""
    side = int(spec.size * margin)
    return letterbox(resize_long_side(image, side), side)
