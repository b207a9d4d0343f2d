"""k-fold cross-validation shared by every method (texture baseline, whole-image and patch networks).

All methods see the SAME group-stratified folds (same seed). Inside each training fold a grouped
hold-out is carved for early stopping, temperature and thresholds; the test fold is touched once.
Only samples with true 3-class labels are evaluated; binary-source samples are training signal.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from osteogate.training.metrics import (
    OperatingRule,
    bootstrap,
    fit_temperature,
    fold_spread,
    operating_thresholds,
    point_metrics,
    pooled_probs,
)
from osteogate.training.pool import Pool
from osteogate.training.splits import grouped_folds, holdout
from scipy.special import softmax


class Method(Protocol):
    def fit(self, pool: Pool, train: np.ndarray, val: np.ndarray) -> None: ...

    def predict_logits(self, pool: Pool, indices: np.ndarray) -> np.ndarray:
        """[N, K, C] logits (K network inputs pooled per image; K = 1 for whole-image methods)."""
        ...


@dataclass
class CVResult:
    name: str
    indices: np.ndarray  # pool positions evaluated (out of fold)
    y_true: np.ndarray
    logits: np.ndarray  # [N, K, C]: per patch (K = 1 in whole mode)
    temperatures: np.ndarray  # per evaluated sample (its fold's T)
    folds: np.ndarray  # fold id per evaluated sample
    seconds: float
    history: list[dict[str, list[float]]] = field(default_factory=list)
    thresholds: list[dict[str, float]] = field(default_factory=list)

    @property
    def probs_raw(self) -> np.ndarray:
        return pooled_probs(self.logits)

    @property
    def probs(self) -> np.ndarray:
        return softmax(self.logits / self.temperatures[:, None, None], axis=-1).mean(axis=1)

    def summary(self, n_boot: int = 1000, seed: int = 0) -> dict[str, object]:
        calibrated = bootstrap(self.y_true, self.probs, n_boot=n_boot, seed=seed)
        raw = bootstrap(self.y_true, self.probs_raw, n_boot=n_boot, seed=seed)
        calibrated["ece_before_calibration"] = raw["ece"]
        per_fold = [point_metrics(self.y_true[self.folds == k], self.probs[self.folds == k]) for k in np.unique(self.folds)]
        return {
            "method": self.name,
            "n_images": len(self.y_true),
            "n_folds": len(per_fold),
            "pooled_out_of_fold": calibrated,
            "across_folds": fold_spread(per_fold),
            "temperatures": [round(float(t), 4) for t in np.unique(self.temperatures)],
            "train_seconds": round(self.seconds, 1),
        }


def cross_validate(
    pool: Pool,
    make_method: Callable[[], Method],
    name: str,
    n_folds: int = 5,
    seed: int = 0,
    val_fraction: float = 0.2,
    operating: OperatingRule | float = 0.9,
    only_folds: int | None = None,
    log: Callable[[str], None] = print,
) -> CVResult:
    folds = grouped_folds(pool.strata, pool.groups, n_folds, seed)
    if only_folds:
        folds = folds[:only_folds]
    labels = pool.labels
    parts: dict[str, list[np.ndarray]] = {"idx": [], "logits": [], "t": [], "fold": []}
    histories: list[dict[str, list[float]]] = []
    thresholds: list[dict[str, float]] = []
    start = time.perf_counter()
    for k, (train, test) in enumerate(folds):
        fit_idx, val = holdout(train, pool.strata, pool.groups, val_fraction, seed + k)
        method = make_method()
        method.fit(pool, fit_idx, val)
        val_eval = pool.evaluable(val)
        test_eval = pool.evaluable(test)
        val_logits = method.predict_logits(pool, val_eval)
        temperature = fit_temperature(val_logits, labels[val_eval])
        thresholds.append(operating_thresholds(labels[val_eval], pooled_probs(val_logits, temperature), operating))
        logits = method.predict_logits(pool, test_eval)
        parts["idx"].append(test_eval)
        parts["logits"].append(logits)
        parts["t"].append(np.full(len(test_eval), temperature))
        parts["fold"].append(np.full(len(test_eval), k))
        histories.append(getattr(method, "history", {}))
        acc = float((pooled_probs(logits, temperature).argmax(1) == labels[test_eval]).mean())
        log(f"[{name}] fold {k + 1}/{len(folds)}: n_test={len(test_eval)} acc={acc:.3f} T={temperature:.2f} ({time.perf_counter() - start:.0f}s)")
    idx = np.concatenate(parts["idx"])
    return CVResult(
        name=name,
        indices=idx,
        y_true=labels[idx],
        logits=np.concatenate(parts["logits"]),
        temperatures=np.concatenate(parts["t"]),
        folds=np.concatenate(parts["fold"]),
        seconds=time.perf_counter() - start,
        history=histories,
        thresholds=thresholds,
    )


class TextureMethod:
    """Adapter: training/texture.py as a cross-validation Method (features computed once per pool)."""

    def __init__(self, features: np.ndarray, c: float = 0.1, seed: int = 0) -> None:
        self.features = features
        self.c = c
        self.seed = seed
        self.history: dict[str, list[float]] = {}

    def fit(self, pool: Pool, train: np.ndarray, val: np.ndarray) -> None:
        from osteogate.training.texture import fit_texture_model

        # Binary-source "osteoporosis" is ambiguous for a softmax model: keep their normals only.
        keep = np.array([i for i in train if pool.samples[i].source not in pool.binary or pool.samples[i].label == "normal"])
        self.model = fit_texture_model(self.features[keep], pool.labels[keep], self.c, self.seed)

    def predict_logits(self, pool: Pool, indices: np.ndarray) -> np.ndarray:
        from osteogate.training.texture import predict_proba_3

        # [N, 1, C]: one "patch" per image, like a whole-image network.
        return np.log(np.clip(predict_proba_3(self.model, self.features[indices]), 1e-7, 1.0))[:, None, :]
