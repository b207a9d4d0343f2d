"""Stratified, grouped splits (scikit-learn StratifiedGroupKFold).

A group (patient / duplicate cluster from training/dedup.py) is never on two sides of a split.
Oversampling and augmentation happen later, inside the training part only.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from sklearn.model_selection import GroupKFold, StratifiedGroupKFold


class SplitError(ValueError):
    pass


def grouped_folds(
    strata: Sequence[str], groups: Sequence[int], n_splits: int, seed: int = 0
) -> list[tuple[np.ndarray, np.ndarray]]:
    """k (train_idx, test_idx) pairs over positions 0..n-1, stratified by `strata`, grouped by `groups`."""
    groups_array = np.asarray(groups)
    n_groups = len(np.unique(groups_array))
    if n_splits < 2:
        raise SplitError("need at least 2 folds")
    if n_groups < n_splits:
        raise SplitError(f"only {n_groups} independent groups: cannot make {n_splits} folds")
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    positions = np.arange(len(groups_array))
    with warnings.catch_warnings():
        # "least populated class has only k members": expected with rare classes; folds stay grouped.
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        try:
            return [(train, test) for train, test in splitter.split(positions, np.asarray(strata), groups_array)]
        except ValueError:
            # Every stratum smaller than n_splits (tiny inner splits): grouping matters more than
            # stratification, so fall back to plain grouped folds.
            plain = GroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
            return [(train, test) for train, test in plain.split(positions, groups=groups_array)]


def holdout(
    indices: np.ndarray, strata: Sequence[str], groups: Sequence[int], fraction: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Split `indices` (positions into strata/groups) into (train, held-out) with ~fraction held out."""
    indices = np.asarray(indices)
    n_groups = len(np.unique(np.asarray(groups)[indices]))
    # Small pools: fewer folds (a larger held-out share) rather than failing.
    n_splits = max(2, min(round(1.0 / fraction), n_groups))
    sub_strata = [strata[i] for i in indices]
    sub_groups = [groups[i] for i in indices]
    train, held = grouped_folds(sub_strata, sub_groups, n_splits, seed)[0]
    return indices[train], indices[held]


def stratum(label: str, source: str, binary: set[str]) -> str:
    """Stratify on the label as its source means it, so binary and 3-class labels stay balanced."""
    return f"{label}|binary" if source in binary else label
