"""Albumentations pipelines, applied inside training folds only (never to validation or test).

Horizontal flips are allowed for knee and spine AP/lateral films (a left knee mirrored looks like a
right knee); vertical flips are not (they put the femur below the tibia). Rotation is small: films
are taken upright. CLAHE and brightness/contrast imitate different exposure and post-processing.
"""

from __future__ import annotations

from dataclasses import dataclass

import albumentations as A
import cv2


@dataclass
class AugmentConfig:
    rotate_limit: float = 10.0
    brightness_contrast: float = 0.2
    hflip: bool = True
    clahe_p: float = 0.2
    noise_p: float = 0.2
    crop_scale_min: float = 0.7  # random resized crop keeps at least this share of the area
    enabled: bool = True

    @classmethod
    def from_dict(cls, values: dict[str, object]) -> AugmentConfig:
        known = {k: v for k, v in values.items() if k in cls.__dataclass_fields__}
        return cls(**known)  # type: ignore[arg-type]


def build_augment(config: AugmentConfig, out_size: int, seed: int | None = None) -> A.Compose:
    """uint8 HxW in -> uint8 out_size x out_size out (whole image after letterbox, or one patch).

    `seed`: albumentations 2 draws from its own generator, seeded from OS entropy unless given, so
    without it two runs of the same command train different models.
    """
    if not config.enabled:
        return A.Compose([A.Resize(out_size, out_size, interpolation=cv2.INTER_AREA)], seed=seed)
    steps: list[A.BasicTransform] = [
        A.RandomResizedCrop(size=(out_size, out_size), scale=(config.crop_scale_min, 1.0), ratio=(0.85, 1.18), p=1.0),
        A.Rotate(limit=config.rotate_limit, border_mode=cv2.BORDER_REFLECT_101, p=0.5),
    ]
    if config.hflip:
        steps.append(A.HorizontalFlip(p=0.5))
    steps += [
        A.RandomBrightnessContrast(config.brightness_contrast, config.brightness_contrast, p=0.5),
        A.CLAHE(clip_limit=2.0, p=config.clahe_p),
        A.GaussNoise(std_range=(0.01, 0.04), p=config.noise_p),
    ]
    return A.Compose(steps, seed=seed)
