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
    RANDOM_CANDIDATE_FACTOR,
    box_stats,
    central_range,
    extract_patches,
    letterbox,
    normalize,
    prepare,
    resize_long_side,
    select_positions,
    working_image,
)

__all__ = ["PatchSampler", "normalize", "prepare", "random_patches", "whole_view"]


def random_patches(image: np.ndarray, spec: InputSpec, count: int, rng: np.random.Generator, margin: float = 1.25) -> np.ndarray:
    """[count, w, w] float32 windows (w = margin x patch_size) at random on-bone positions."""
    window = min(int(spec.patch_size * margin), spec.working_size)
    training_spec = replace(spec, patch_size=window, patches_per_image=count)
    return extract_patches(image, training_spec, rng)


class PatchSampler:
    """Fast equivalent of `random_patches` for one image, reused across epochs: serving's rule.

    Scoring every window by mean + std costs ~20 ms per image per draw, more than a small
    network's step, so the score map is computed once here, on a `stride` grid. Everything else
    is model/preprocess.py's own code: the working image (`working_image`), the window scores
    (`box_stats`), the central region (`central_range`) and the greedy non-overlapping choice of
    the best candidates (`select_positions`); only the candidates differ (random grid positions
    instead of random pixels), which is training's randomness, not another rule.
    tests/test_training_data.py checks the parity.
    """

    def __init__(self, image: np.ndarray, spec: InputSpec, margin: float = 1.25, stride: int = 8) -> None:
        """`image`: uint8 HxW (kept as uint8: a float copy of every training image would cost GBs)."""
        self.window = min(int(spec.patch_size * margin), spec.working_size)
        array, _ = working_image(image.astype(np.float32) / 255.0, spec, self.window)
        self.image = image if array.shape == image.shape else np.clip(np.rint(array * 255.0), 0, 255).astype(np.uint8)
        mean, std = box_stats(array, self.window)
        (y0, y1), (x0, x1) = central_range(array.shape[0], self.window), central_range(array.shape[1], self.window)
        yy, xx = np.meshgrid(np.arange(y0, y1 + 1, stride), np.arange(x0, x1 + 1, stride), indexing="ij")
        self.scores = (mean + std)[yy, xx].ravel()
        self.positions = np.stack([yy.ravel(), xx.ravel()], axis=1)

    def candidates(self, count: int, rng: np.random.Generator) -> np.ndarray:
        """Indices of RANDOM_CANDIDATE_FACTOR x count random grid positions (with repeats)."""
        return rng.integers(0, len(self.positions), count * RANDOM_CANDIDATE_FACTOR)

    def choose(self, candidates: np.ndarray, count: int) -> list[tuple[int, int]]:
        positions = [(int(y), int(x)) for y, x in self.positions[candidates]]
        return select_positions(positions, self.scores[candidates], count, self.window)

    def sample(self, count: int, rng: np.random.Generator) -> np.ndarray:
        """[count, w, w] uint8 windows."""
        w = self.window
        return np.stack([self.image[y : y + w, x : x + w] for y, x in self.choose(self.candidates(count, rng), count)])


def whole_view(image: np.ndarray, spec: InputSpec, margin: float = 1.15) -> np.ndarray:
    """Serving's resize + letterbox at margin x size: the random resized crop then brings it to size."""
    side = int(spec.size * margin)
    return letterbox(resize_long_side(image, side), side)
