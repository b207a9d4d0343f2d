"""Classical texture baseline: LBP histograms + GLCM statistics -> standardised logistic regression.

Reported next to the networks (the gateway serves networks only). Features are computed on the
central part of the working-size image, where a knee film shows the joint and metaphyses.
Binary-source samples join training only as `normal` (their `osteoporosis` is ambiguous between
osteopenia and osteoporosis, and a linear softmax model has no set-valued loss).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

LBP_SETTINGS = ((8, 1.0), (16, 2.0), (16, 4.0))
GLCM_DISTANCES = (1, 2, 4, 8)
GLCM_PROPS = ("contrast", "dissimilarity", "homogeneity", "energy", "correlation")


def central_crop(image: np.ndarray, fraction: float = 0.6) -> np.ndarray:
    h, w = image.shape[:2]
    ch, cw = max(1, int(h * fraction)), max(1, int(w * fraction))
    top, left = (h - ch) // 2, (w - cw) // 2
    return image[top : top + ch, left : left + cw]


def texture_features(image: np.ndarray) -> np.ndarray:
    """1-D feature vector of a uint8 HxW image."""
    from skimage.feature import graycomatrix, graycoprops, local_binary_pattern

    crop = central_crop(image)
    features: list[np.ndarray] = []
    for points, radius in LBP_SETTINGS:
        codes = local_binary_pattern(crop, points, radius, method="uniform")
        hist, _ = np.histogram(codes, bins=points + 2, range=(0, points + 2), density=True)
        features.append(hist)
    # 32 grey levels: fewer empty co-occurrence cells on a few hundred thousand pixels.
    quantised = (crop // 8).astype(np.uint8)
    glcm = graycomatrix(quantised, GLCM_DISTANCES, [0, np.pi / 4, np.pi / 2, 3 * np.pi / 4], levels=32, symmetric=True, normed=True)
    for prop in GLCM_PROPS:
        features.append(graycoprops(glcm, prop).mean(axis=1))  # average over angles: rotation-robust
    features.append(np.array([crop.mean() / 255.0, crop.std() / 255.0]))
    return np.concatenate(features).astype(np.float64)


def feature_matrix(images: Sequence[np.ndarray]) -> np.ndarray:
    return np.stack([texture_features(image) for image in images])


def fit_texture_model(features: np.ndarray, y: np.ndarray, c: float = 0.1, seed: int = 0) -> Pipeline:
    model = make_pipeline(
        StandardScaler(),
        LogisticRegression(C=c, class_weight="balanced", max_iter=5000, random_state=seed),
    )
    model.fit(features, y)
    return model


def predict_proba_3(model: Pipeline, features: np.ndarray, n_classes: int = 3) -> np.ndarray:
    """Probabilities over all classes even if a training fold lacked one."""
    probs = np.zeros((len(features), n_classes))
    probs[:, model.classes_] = model.predict_proba(features)
    return probs
