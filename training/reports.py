"""PNG plots (confusion matrix, ROC curves, reliability diagram, training curves) and JSON writing."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display on servers or CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from osteogate.model.taxonomy import CLASSES  # noqa: E402
from osteogate.training.metrics import low_bmd_score  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay, RocCurveDisplay, confusion_matrix  # noqa: E402


def write_json(path: Path, data: object) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    return path


def plot_confusion(path: Path, y_true: np.ndarray, probs: np.ndarray, title: str = "") -> Path:
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    matrix = confusion_matrix(y_true, probs.argmax(axis=1), labels=list(range(len(CLASSES))))
    ConfusionMatrixDisplay(matrix, display_labels=list(CLASSES)).plot(ax=ax, colorbar=False, cmap="Blues")
    ax.set_title(title or "Confusion matrix")
    return _save(fig, path)


def plot_label_confusion(path: Path, y_true: np.ndarray, panels: dict[str, np.ndarray], title: str = "") -> Path:
    """panels: name -> predicted class indices (e.g. most probable class and reported label), side by side."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 4.2), squeeze=False)
    for ax, (name, predicted) in zip(axes[0], panels.items(), strict=True):
        matrix = confusion_matrix(y_true, predicted, labels=list(range(len(CLASSES))))
        ConfusionMatrixDisplay(matrix, display_labels=list(CLASSES)).plot(ax=ax, colorbar=False, cmap="Blues")
        ax.set_title(name, fontsize=9)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def plot_roc(path: Path, curves: dict[str, tuple[np.ndarray, np.ndarray]], title: str = "",
             points: dict[str, tuple[tuple[float, float], tuple[float, float]]] | None = None) -> Path:
    """curves: name -> (y_true 3-class, probs); draws low-BMD and osteoporosis ROC for each.
    points: name -> ((sensitivity, specificity) of the low-BMD label, (same) of the osteoporosis
    label): the operating points actually reported, marked on both panels."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2))
    for name, pair in (points or {}).items():
        for ax, (sensitivity, specificity) in zip(axes, pair, strict=True):
            ax.plot([1 - specificity], [sensitivity], "k*", markersize=11, zorder=5,
                    label=f"operating point, {name}: sens {sensitivity:.2f} / spec {specificity:.2f}")
    for name, (y, probs) in curves.items():
        for ax, (target, y_bin, score) in zip(axes, (
            ("low BMD (osteopenia+osteoporosis)", (y >= 1).astype(int), low_bmd_score(probs)),
            ("osteoporosis", (y == 2).astype(int), probs[:, 2]),
        ), strict=True):
            if 0 < y_bin.sum() < len(y_bin):
                RocCurveDisplay.from_predictions(y_bin, score, name=name, ax=ax)
            ax.set_title(f"ROC: {target}", fontsize=9)
    for ax in axes:
        ax.plot([0, 1], [0, 1], ":", color="grey")
        ax.set_xlabel("1 - specificity", fontsize=8)
        ax.set_ylabel("sensitivity", fontsize=8)
        ax.legend(fontsize=6, loc="lower right")
    fig.suptitle(title)
    return _save(fig, path)


def plot_reliability(path: Path, y_true: np.ndarray, probs_by_name: dict[str, np.ndarray], n_bins: int = 10) -> Path:
    """Top-label reliability diagram (accuracy vs confidence per equal-width bin)."""
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    edges = np.linspace(0, 1, n_bins + 1)
    for name, probs in probs_by_name.items():
        confidence = probs.max(axis=1)
        correct = probs.argmax(axis=1) == y_true
        bins = np.minimum((confidence * n_bins).astype(int), n_bins - 1)
        xs, ys = [], []
        for b in range(n_bins):
            if (bins == b).any():
                xs.append(confidence[bins == b].mean())
                ys.append(correct[bins == b].mean())
        ax.plot(xs, ys, "o-", label=name)
    ax.plot(edges, edges, ":", color="grey", label="perfect")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title("Reliability diagram")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_training_curves(path: Path, histories: Sequence[dict[str, list[float]]], title: str = "",
                         labels: Sequence[str] | None = None) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    labels = list(labels) if labels else [f"fold {k + 1}" for k in range(len(histories))]
    for history, label in zip(histories, labels, strict=False):
        if history.get("train_loss"):
            axes[0].plot(range(1, len(history["train_loss"]) + 1), history["train_loss"], label=label)
        if history.get("val_score"):
            axes[1].plot(range(1, len(history["val_score"]) + 1), history["val_score"], label=label)
    axes[0].set_title("training loss")
    axes[1].set_title("validation score (mean AUC low BMD, osteoporosis)")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7)
    fig.suptitle(title)
    return _save(fig, path)


def plot_t_scores(path: Path, t_true: np.ndarray, estimates: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
                  cut: float = -1.0) -> Path:
    """Estimated vs densitometry T-score (out of fold) with 80 % prediction intervals, one panel each."""
    fig, axes = plt.subplots(1, max(1, len(estimates)), figsize=(4.4 * max(1, len(estimates)), 4.2), squeeze=False)
    low_end, high_end = float(np.min(t_true)) - 0.5, float(np.max(t_true)) + 0.5
    for ax, (name, (mu, low, high)) in zip(axes[0], estimates.items(), strict=False):
        ax.errorbar(t_true, mu, yerr=[mu - low, high - mu], fmt="o", ms=3, alpha=0.5, elinewidth=0.6)
        ax.plot([low_end, high_end], [low_end, high_end], ":", color="grey")
        for value in (cut, -2.5):
            ax.axhline(value, color="red", lw=0.5, ls="--")
            ax.axvline(value, color="red", lw=0.5, ls="--")
        ax.set_xlabel("densitometry T-score")
        ax.set_ylabel("estimated T-score (80 % PI)")
        ax.set_title(name, fontsize=8)
    return _save(fig, path)


def _save(fig: plt.Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
