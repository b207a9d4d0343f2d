"""model/preprocess.py: shapes, letterboxing, normalisation and the patch rule."""

from __future__ import annotations

import numpy as np
import pytest
from osteogate.model.card import InputSpec
from osteogate.model.preprocess import (
    extract_patches,
    letterbox,
    normalize,
    patch_positions,
    prepare,
    resize_long_side,
)


def test_resize_long_side_keeps_aspect():
    image = np.random.default_rng(0).random((300, 150), dtype=np.float32)
    assert resize_long_side(image, 100).shape == (100, 50)
    assert resize_long_side(image, 600).shape == (600, 300)
    assert resize_long_side(image, 300) is not image and resize_long_side(image, 300).shape == (300, 150)


def test_letterbox_centres_image():
    out = letterbox(np.ones((10, 4), np.float32), 10)
    assert out.shape == (10, 10)
    assert out[:, 3:7].min() == 1.0 and out[:, :3].max() == 0.0 and out[:, 7:].max() == 0.0


def test_whole_mode_shape_and_padding_value():
    spec = InputSpec(size=64)
    batch = prepare(np.full((200, 100), 0.5, np.float32), spec)
    assert batch.shape == (1, 3, 64, 64) and batch.dtype == np.float32
    mean, std = np.array(spec.mean), np.array(spec.std)
    np.testing.assert_allclose(batch[0, :, 32, 32], (0.5 - mean) / std, atol=1e-5)   # image
    np.testing.assert_allclose(batch[0, :, 32, 2], (0.0 - mean) / std, atol=1e-5)    # letterbox pad


def test_normalize_shapes_and_channels():
    spec = InputSpec(channels=1, mean=[0.5], std=[0.5])
    assert normalize(np.ones((8, 8)), spec).shape == (1, 1, 8, 8)
    np.testing.assert_allclose(normalize(np.ones((2, 8, 8)), spec), 1.0)
    with pytest.raises(ValueError):
        normalize(np.ones((1, 3, 8, 8)), spec)
    with pytest.raises(ValueError):
        prepare(np.ones((8, 8, 3)), spec)


def _bone_image() -> np.ndarray:
    """Dark background, a bright textured 'bone' block left of centre, a bright marker in a corner."""
    rng = np.random.default_rng(0)
    image = np.full((400, 300), 0.05, np.float32)
    image[120:300, 60:170] = 0.6 + 0.2 * rng.random((180, 110))
    image[5:30, 260:295] = 1.0  # "L" marker near the border: must not be chosen
    return image


def test_patches_mode_deterministic_and_on_bone():
    spec = InputSpec(mode="patches", patch_size=48, patches_per_image=4, working_size=400)
    image = _bone_image()
    batch = prepare(image, spec)
    assert batch.shape == (4, 3, 48, 48)
    np.testing.assert_array_equal(batch, prepare(image, spec))
    for y, x in patch_positions(image, spec):
        patch = image[y:y + 48, x:x + 48]
        assert patch.mean() > 0.5, (y, x)  # on the bone, not background or marker
        assert y > 30
    positions = patch_positions(image, spec)
    assert len(set(positions)) == 4  # distinct when the image is large enough


def test_patches_rescale_to_working_size_and_random_positions():
    spec = InputSpec(mode="patches", patch_size=48, patches_per_image=4, working_size=400)
    image = _bone_image()
    big = resize_long_side(image, 800)
    # Same scale whatever the input size: the patches cover the same regions (per-patch means agree).
    means_big, means = extract_patches(big, spec).mean(axis=(1, 2)), extract_patches(image, spec).mean(axis=(1, 2))
    np.testing.assert_allclose(np.sort(means_big), np.sort(means), atol=0.03)
    a = extract_patches(image, spec, rng=np.random.default_rng(1))
    b = extract_patches(image, spec, rng=np.random.default_rng(2))
    assert a.shape == b.shape == (4, 48, 48) and not np.array_equal(a, b)
    assert a.mean() > 0.4  # random, but still biased to the bone


def test_tiny_image_in_patches_mode():
    spec = InputSpec(mode="patches", patch_size=64, patches_per_image=3, working_size=64)
    batch = prepare(np.random.default_rng(0).random((20, 10), dtype=np.float32), spec)
    assert batch.shape == (3, 3, 64, 64)
