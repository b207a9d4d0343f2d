"""Leakage guard: exact and near-duplicate detection over the whole pool, label-conflict rule.

Every copy of one film must land on the same side of every split, otherwise a model is graded
on images it trained on. Groups are the union (union-find) of: manifest group ids, identical file
bytes (sha256), identical decoded pixels, and perceptual hashes (imagehash.phash) within a
Hamming distance. A group whose members disagree is a *label conflict*; the rule is:

* policy "resolve" (default): members from 3-class sources win over binary sources (binary
  "osteoporosis" means low BMD, so it is compatible with 3-class osteopenia/osteoporosis); the
  binary copies are dropped (same pixels, noisier label). If the 3-class members still disagree,
  or a binary-only group disagrees, the whole group is dropped.
* policy "drop": every conflicting group is dropped.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from osteogate.training.data import Sample


class UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]  # path halving keeps trees flat
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def labels(self) -> np.ndarray:
        """Dense group index per element, numbered by first appearance."""
        roots: dict[int, int] = {}
        return np.array([roots.setdefault(self.find(i), len(roots)) for i in range(len(self.parent))], dtype=int)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def pixel_sha256(image: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(image).tobytes() + str(image.shape).encode()).hexdigest()


def perceptual_hash(image: np.ndarray, hash_size: int = 8) -> np.ndarray:
    """64-bit DCT perceptual hash (imagehash.phash) of a uint8 or [0, 1] float image, as bools."""
    import imagehash
    from PIL import Image

    array = image if image.dtype == np.uint8 else np.clip(image * 255.0, 0, 255).astype(np.uint8)
    return np.asarray(imagehash.phash(Image.fromarray(array), hash_size=hash_size).hash, dtype=bool).ravel()


def near_duplicate_pairs(hashes: np.ndarray, max_distance: int) -> list[tuple[int, int]]:
    """Pairs (i < j) whose perceptual hashes differ in at most max_distance bits."""
    if len(hashes) < 2 or max_distance < 0:
        return []
    bits = hashes.astype(np.uint8)
    # Hamming distance matrix via dot products: n is small (thousands), this is one matmul.
    ones = bits.sum(axis=1)
    distance = ones[:, None] + ones[None, :] - 2 * (bits.astype(np.int32) @ bits.T.astype(np.int32))
    i, j = np.nonzero(np.triu(distance <= max_distance, k=1))
    return list(zip(i.tolist(), j.tolist(), strict=True))


@dataclass
class Conflict:
    group: int
    members: list[int]
    labels: dict[str, list[str]]  # source -> labels
    action: str  # "resolved to <label>" | "dropped"


@dataclass
class DedupResult:
    groups: np.ndarray  # dense group index per sample (of the full pool)
    keep: np.ndarray  # bool per sample after the conflict rule
    exact_pairs: int
    near_pairs: int
    manifest_links: int
    conflicts: list[Conflict] = field(default_factory=list)

    @property
    def n_groups(self) -> int:
        return len(set(self.groups[self.keep].tolist()))

    def duplicate_groups(self) -> int:
        _, counts = np.unique(self.groups, return_counts=True)
        return int((counts > 1).sum())


def group_duplicates(
    samples: Sequence[Sample],
    file_hashes: Sequence[str],
    pixel_hashes: Sequence[str],
    phashes: np.ndarray,
    max_distance: int = 4,
) -> tuple[np.ndarray, dict[str, int]]:
    """Union of all duplicate evidence -> dense group index per sample, plus link counts."""
    finder = UnionFind(len(samples))
    counts = {"exact": 0, "near": 0, "manifest": 0}

    def link_equal(keys: Sequence[str], kind: str) -> None:
        first: dict[str, int] = {}
        for index, key in enumerate(keys):
            if not key:
                continue
            if key in first:
                if finder.find(first[key]) != finder.find(index):
                    counts[kind] += 1
                finder.union(first[key], index)
            else:
                first[key] = index

    link_equal([s.group for s in samples], "manifest")
    link_equal(list(file_hashes), "exact")
    link_equal(list(pixel_hashes), "exact")
    for i, j in near_duplicate_pairs(phashes, max_distance):
        if finder.find(i) != finder.find(j):
            counts["near"] += 1
        finder.union(i, j)
    return finder.labels(), counts


def resolve_conflicts(
    samples: Sequence[Sample], groups: np.ndarray, binary: set[str], policy: str = "resolve"
) -> tuple[np.ndarray, list[Conflict]]:
    """Apply the module's conflict rule. Returns (keep mask, conflicts)."""
    if policy not in ("resolve", "drop"):
        raise ValueError(f"conflict policy must be 'resolve' or 'drop', not {policy!r}")
    keep = np.ones(len(samples), dtype=bool)
    conflicts: list[Conflict] = []
    for group in np.unique(groups):
        members = np.nonzero(groups == group)[0].tolist()
        if len({samples[i].label for i in members}) <= 1:
            continue
        by_source: dict[str, list[str]] = {}
        for i in members:
            by_source.setdefault(samples[i].source, []).append(samples[i].label)
        full = [i for i in members if samples[i].source not in binary]
        full_labels = {samples[i].label for i in full}
        if policy == "resolve" and len(full_labels) == 1:
            for i in members:
                keep[i] = i in full
            action = f"resolved to {full_labels.pop()}"
        else:
            keep[members] = False
            action = "dropped"
        conflicts.append(Conflict(int(group), members, by_source, action))
    return keep, conflicts
