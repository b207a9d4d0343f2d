"""The training pool: samples + cached pixels + duplicate groups + conflict rule, built once."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from osteogate.model.taxonomy import CLASSES
from osteogate.training.cache import ImageCache
from osteogate.training.data import Sample, binary_sources, class_counts, load_samples, target_masks
from osteogate.training.dedup import (
    DedupResult,
    file_sha256,
    group_duplicates,
    perceptual_hash,
    pixel_sha256,
    resolve_conflicts,
)
from osteogate.training.splits import stratum


@dataclass
class Pool:
    """Kept samples (after the conflict rule) with their pixels and group ids."""

    samples: list[Sample]
    images: list[np.ndarray]  # uint8 HxW, long side <= working size
    groups: np.ndarray
    file_hashes: list[str]
    binary: set[str]
    dedup: DedupResult
    all_samples: list[Sample]

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def strata(self) -> list[str]:
        return [stratum(s.label, s.source, self.binary) for s in self.samples]

    @property
    def masks(self) -> np.ndarray:
        return target_masks(self.samples, self.binary)

    @property
    def labels(self) -> np.ndarray:
        return np.array([CLASSES.index(s.label) for s in self.samples])

    def evaluable(self, indices: Sequence[int] | None = None) -> np.ndarray:
        """Positions whose label is a true 3-class label (binary-source samples are train-only)."""
        indices = np.arange(len(self)) if indices is None else np.asarray(indices)
        return np.array([i for i in indices if self.samples[i].source not in self.binary], dtype=int)

    def summary(self) -> dict[str, object]:
        """Training data summary for the model card; the hash pins the exact files and labels."""
        digest = hashlib.sha256()
        for sample, file_hash in sorted(zip(self.samples, self.file_hashes, strict=True), key=lambda x: x[1]):
            digest.update(f"{file_hash}:{sample.label}:{sample.region}:{sample.source}\n".encode())
        sources: dict[str, dict[str, int]] = {}
        for sample in self.samples:
            sources.setdefault(sample.source, dict.fromkeys(CLASSES, 0))[sample.label] += 1
        return {
            "images": len(self.samples),
            "images_in_pool": len(self.all_samples),
            "groups": int(len(np.unique(self.groups))),
            "class_counts": class_counts(self.samples),
            "sources": sources,
            "binary_sources": sorted(self.binary),
            "regions": sorted({s.region for s in self.samples}),
            "label_conflicts": len(self.dedup.conflicts),
            "dropped_images": int((~self.dedup.keep).sum()),
            "data_sha256": digest.hexdigest(),
        }


def build_pool(
    data: Path,
    working_size: int,
    cache_dir: Path | None = None,
    phash_distance: int = 4,
    conflict_policy: str = "resolve",
    progress: bool = False,
) -> Pool:
    samples = load_samples(Path(data))
    cache = ImageCache(working_size, cache_dir)
    iterator: Sequence[Sample] = samples
    if progress:
        from tqdm import tqdm

        iterator = tqdm(samples, desc="decode", unit="img")
    images = [cache.get(s.path) for s in iterator]
    file_hashes = [file_sha256(s.path) for s in samples]
    pixel_hashes = [pixel_sha256(image) for image in images]
    phashes = np.stack([perceptual_hash(image) for image in images])
    binary = binary_sources(samples)
    groups, links = group_duplicates(samples, file_hashes, pixel_hashes, phashes, phash_distance)
    keep, conflicts = resolve_conflicts(samples, groups, binary, conflict_policy)
    dedup = DedupResult(groups, keep, links["exact"], links["near"], links["manifest"], conflicts)
    kept = np.nonzero(keep)[0]
    return Pool(
        samples=[samples[i] for i in kept],
        images=[images[i] for i in kept],
        groups=groups[kept],
        file_hashes=[file_hashes[i] for i in kept],
        binary=binary,
        dedup=dedup,
        all_samples=list(samples),
    )
