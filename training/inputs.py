"""Model inputs for training and evaluation, built from serving's preprocessing (model/preprocess.py).

Evaluation calls `model.preprocess.prepare` itself, so metrics describe what the gateway computes.
Training draws random patches with the same scoring rule (`extract_patches(..., rng)`: random
candidates inside the central region, best-scoring = on bone), but from a window `margin` times
larger than the patch so the random resized crop and rotation of augmentation have real context.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from model.card import InputSpec
from model.preprocess import extract_patches, letterbox, normalize, prepare, resize_long_side

__all__ = ["normalize", "prepare", "random_patches", "whole_view"]


def random_patches(image: np.ndarray, spec: InputSpec, count: int, rng: np.random.Generator, margin: float = 1.25) -> np.ndarray:
    """[count, w, w] float32 windows (w = margin x patch_size) at random on-bone positions."""
    window = min(int(spec.patch_size * margin), spec.working_size)
    training_spec = replace(spec, patch_size=window, patches_per_image=count)
    return extract_patches(image, training_spec, rng)


def whole_view(image: np.ndarray, spec: InputSpec, margin: float = 1.15) -> np.ndarray:
    """Serving's resize + letterbox at margin x size: the random resized crop then brings it to size."""
    side = int(spec.size * margin)
    return letterbox(resize_long_side(image, side), side)
