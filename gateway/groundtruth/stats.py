"""The statistics of the site's validation, in numpy only (no scikit-learn at serving time).

Every figure with an interval is bootstrapped over PATIENTS, not studies: one patient's knees and
repeat films are not independent evidence, and resampling studies would make the interval too
narrow. Seeds are fixed so the same pairs always give the same report. A figure that cannot be
computed (one class only, too few pairs) is ``None`` with the reason, never an exception.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

# Fewer pairs than this, or fewer than MIN_PER_CLASS of either class, is "not enough evidence".
MIN_PAIRS = 10
MIN_PER_CLASS = 2
NOT_ENOUGH = "not enough evidence"


@dataclass(frozen=True)
class Figure:
    """One figure with its 95 % patient-bootstrap interval, or why there is none."""

    value: float | None
    ci: tuple[float, float] | None = None
    n: int = 0
    note: str | None = None  # "not enough evidence: ..." when value is None

    @property
    def known(self) -> bool:
        return self.value is not None

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"value": None if self.value is None else round(self.value, 4),
                                  "ci": None if self.ci is None else [round(self.ci[0], 4), round(self.ci[1], 4)],
                                  "n": self.n}
        if self.note:
            out["note"] = self.note
        return out

    def text(self, digits: int = 2) -> str:
        if self.value is None:
            return self.note or NOT_ENOUGH
        if self.ci is None:
            return f"{self.value:.{digits}f}"
        return f"{self.value:.{digits}f} [{self.ci[0]:.{digits}f}, {self.ci[1]:.{digits}f}]"


def auc(y: np.ndarray, score: np.ndarray) -> float | None:
    """ROC-AUC (Mann-Whitney, ties counted half); None when only one class is present.

    Parameters
    ----------
    y : ndarray of bool
        True for the positive class.
    score : ndarray of float
        Higher means more likely positive.
    """
    y = np.asarray(y, dtype=bool)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = _average_ranks(np.asarray(score, dtype=float))
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    ranks = np.empty(values.size, dtype=float)
    # Tied values share the mean of their ranks (1-based).
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_values)) + 1]
    ends = np.r_[starts[1:], values.size]
    for start, end in zip(starts, ends, strict=True):
        ranks[order[start:end]] = (start + end + 1) / 2
    return ranks


def roc_curve(y: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False and true positive rates at every distinct threshold (for the plot)."""
    y = np.asarray(y, dtype=bool)
    order = np.argsort(-np.asarray(score, dtype=float), kind="mergesort")
    s = np.asarray(score, dtype=float)[order]
    yy = y[order]
    distinct = np.r_[np.flatnonzero(np.diff(s)), yy.size - 1]
    tps = np.cumsum(yy)[distinct]
    fps = (distinct + 1) - tps
    tpr = np.r_[0.0, tps / max(int(y.sum()), 1)]
    fpr = np.r_[0.0, fps / max(int((~y).sum()), 1)]
    return fpr, tpr


def proportion(hits: np.ndarray) -> float | None:
    """Mean of a boolean array; None when empty."""
    return float(np.mean(hits)) if hits.size else None


def reliability(y: np.ndarray, p: np.ndarray, bins: int = 10) -> list[dict[str, float]]:
    """Equal-width reliability bins: mean predicted, observed frequency and count per bin."""
    y = np.asarray(y, dtype=float)
    p = np.asarray(p, dtype=float)
    index = np.clip((p * bins).astype(int), 0, bins - 1)
    out = []
    for b in range(bins):
        mask = index == b
        if mask.any():
            out.append({"low": b / bins, "high": (b + 1) / bins, "predicted": float(p[mask].mean()),
                        "observed": float(y[mask].mean()), "n": int(mask.sum())})
    return out


def ece(y: np.ndarray, p: np.ndarray, bins: int = 10) -> float | None:
    """Expected calibration error of P(positive): count-weighted |observed - predicted| over bins."""
    if np.asarray(y).size == 0:
        return None
    table = reliability(y, p, bins)
    total = sum(b["n"] for b in table)
    return float(sum(b["n"] * abs(b["observed"] - b["predicted"]) for b in table) / total)


def pearson(a: np.ndarray, b: np.ndarray) -> float | None:
    """Pearson correlation; None with fewer than 3 values or no spread."""
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    if a.size < 3 or np.std(a) == 0 or np.std(b) == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def bland_altman(estimate: np.ndarray, truth: np.ndarray) -> dict[str, float] | None:
    """Bias (estimate - DXA) and 95 % limits of agreement (bias +- 1.96 SD)."""
    diff = np.asarray(estimate, dtype=float) - np.asarray(truth, dtype=float)
    if diff.size < 3:
        return None
    bias = float(diff.mean())
    sd = float(diff.std(ddof=1))
    return {"bias": bias, "sd": sd, "loa_low": bias - 1.96 * sd, "loa_high": bias + 1.96 * sd, "n": int(diff.size)}


Metric = Callable[[np.ndarray], "float | None"]  # indices of the pairs in a resample -> figure


class PatientBootstrap:
    """Resamples patients with replacement; each resample takes all of a drawn patient's pairs.

    Parameters
    ----------
    patients : sequence of str
        The patient (hash) of each pair, in pair order.
    n_boot : int
        Number of resamples (1000 for reports; fewer for the gate's frequent refresh).
    seed : int
        Fixed, so the same pairs give the same intervals.
    """

    def __init__(self, patients: Sequence[str], n_boot: int = 1000, seed: int = 20261203) -> None:
        groups: dict[str, list[int]] = {}
        for i, patient in enumerate(patients):
            groups.setdefault(patient, []).append(i)
        self.groups = [np.asarray(v, dtype=int) for v in groups.values()]
        self.n_pairs = len(patients)
        self.n_boot = n_boot
        self.seed = seed
        self._draws: list[np.ndarray] | None = None

    def draws(self, progress: Callable[[int, int], None] | None = None) -> list[np.ndarray]:
        """The resamples (pair indices), drawn once and shared by every figure (paired intervals)."""
        if self._draws is None:
            rng = np.random.default_rng(self.seed)
            k = len(self.groups)
            out = []
            for b in range(self.n_boot):
                chosen = rng.integers(0, k, size=k)
                out.append(np.concatenate([self.groups[c] for c in chosen]) if k else np.empty(0, dtype=int))
                if progress and (b + 1) % max(1, self.n_boot // 10) == 0:
                    progress(b + 1, self.n_boot)
            self._draws = out
        return self._draws

    def figure(self, metric: Metric, indices: np.ndarray, *, note: str | None = None) -> Figure:
        """The metric on ``indices`` with a 95 % percentile interval over patient resamples.

        Each resample is restricted to ``indices`` (a subgroup keeps its own pairs); resamples where
        the metric is undefined (one class drawn) are left out; with fewer than half defined the
        interval is not given.
        """
        if note is not None:
            return Figure(None, None, int(indices.size), note)
        value = metric(indices)
        if value is None:
            return Figure(None, None, int(indices.size), NOT_ENOUGH)
        keep = np.zeros(self.n_pairs, dtype=bool)
        keep[indices] = True
        values = []
        for draw in self.draws():
            sample = draw[keep[draw]]
            if sample.size:
                v = metric(sample)
                if v is not None and np.isfinite(v):
                    values.append(v)
        if len(values) < self.n_boot / 2:
            return Figure(value, None, int(indices.size), "interval not given: too few resamples defined")
        lo, hi = np.percentile(values, [2.5, 97.5])
        return Figure(value, (float(lo), float(hi)), int(indices.size))
