"""Training data: samples from a manifest CSV or a `region/label/*` folder layout, label targets.

Labels are `normal`, `osteopenia`, `osteoporosis`. A *binary source* only knows normal vs
osteoporosis; its "osteoporosis" is really "low bone density" (the knee-xray README notes that
many such images are T-score osteopenia), so its target is the SET {osteopenia, osteoporosis}
and the loss (training/engine.py) maximises the probability of the set, never guessing which.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CLASSES: tuple[str, ...] = ("normal", "osteopenia", "osteoporosis")
REGIONS: tuple[str, ...] = ("knee", "spine")
LOW_BMD: tuple[str, ...] = ("osteopenia", "osteoporosis")
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".dcm", ".dicom"})


@dataclass(frozen=True)
class Sample:
    """One image of the pool. `group` is an optional patient/duplicate id from the manifest."""

    path: Path
    label: str
    region: str = "knee"
    group: str = ""
    source: str = "default"


class DataError(ValueError):
    """Bad manifest or folder layout (message is shown to the user as is)."""


def _check(sample: Sample, where: str) -> Sample:
    if sample.label not in CLASSES:
        raise DataError(f"{where}: label {sample.label!r} is not one of {', '.join(CLASSES)}")
    if sample.region not in REGIONS:
        raise DataError(f"{where}: region {sample.region!r} is not one of {', '.join(REGIONS)}")
    return sample


def load_manifest(path: Path, default_region: str = "knee") -> list[Sample]:
    """Read a manifest CSV: columns path, label, and optionally region, group/patient_id/duplicate_group, source.

    Relative paths are resolved against the manifest's folder.
    """
    path = Path(path)
    samples: list[Sample] = []
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        columns = set(reader.fieldnames or [])
        if not {"path", "label"} <= columns:
            raise DataError(f"{path}: a manifest needs at least the columns 'path' and 'label'")
        group_column = next((c for c in ("group", "patient_id", "duplicate_group") if c in columns), None)
        for line, row in enumerate(reader, start=2):
            file_path = Path(row["path"])
            if not file_path.is_absolute():
                file_path = path.parent / file_path
            sample = Sample(
                path=file_path,
                label=row["label"].strip().lower(),
                region=(row.get("region") or default_region).strip().lower(),
                group=(row.get(group_column) or "").strip() if group_column else "",
                source=(row.get("source") or "default").strip(),
            )
            samples.append(_check(sample, f"{path}:{line}"))
    return samples


def scan_folder(root: Path, default_region: str = "knee") -> list[Sample]:
    """Read a `region/label/*` layout (or `label/*`, which takes `default_region`)."""
    root = Path(root)
    samples: list[Sample] = []
    top = sorted(p for p in root.iterdir() if p.is_dir())
    if top and all(p.name in REGIONS for p in top):
        label_dirs = [(region_dir.name, d) for region_dir in top for d in sorted(region_dir.iterdir()) if d.is_dir()]
    else:
        label_dirs = [(default_region, d) for d in top]
    for region, label_dir in label_dirs:
        for file_path in sorted(label_dir.iterdir()):
            if file_path.is_file() and file_path.suffix.lower() in IMAGE_SUFFIXES:
                sample = Sample(path=file_path, label=label_dir.name.lower(), region=region, source=root.name)
                samples.append(_check(sample, str(file_path)))
    return samples


def load_samples(data: Path, default_region: str = "knee") -> list[Sample]:
    """A manifest CSV, or a folder holding `manifest.csv`, or a folder layout."""
    data = Path(data)
    if not data.exists():
        raise DataError(f"{data}: no such file or folder")
    if data.is_file():
        samples = load_manifest(data, default_region)
    elif (data / "manifest.csv").is_file():
        samples = load_manifest(data / "manifest.csv", default_region)
    else:
        samples = scan_folder(data, default_region)
    if not samples:
        raise DataError(f"{data}: no images found")
    return samples


def binary_sources(samples: Iterable[Sample]) -> set[str]:
    """Sources that never use `osteopenia` while the pool does: their labels are binary.

    If no source uses osteopenia, the whole pool is binary-labelled and treated as 3-class with an
    empty middle class (nothing to disambiguate).
    """
    by_source: dict[str, set[str]] = {}
    for sample in samples:
        by_source.setdefault(sample.source, set()).add(sample.label)
    if not any("osteopenia" in labels for labels in by_source.values()):
        return set()
    return {source for source, labels in by_source.items() if "osteopenia" not in labels}


def target_mask(label: str, binary: bool) -> np.ndarray:
    """Boolean [n_classes] mask of the classes a label allows (see module docstring)."""
    mask = np.zeros(len(CLASSES), dtype=bool)
    if binary and label == "osteoporosis":
        mask[[CLASSES.index(c) for c in LOW_BMD]] = True
    else:
        mask[CLASSES.index(label)] = True
    return mask


def target_masks(samples: Sequence[Sample], binary: set[str]) -> np.ndarray:
    return np.stack([target_mask(s.label, s.source in binary) for s in samples]) if samples else np.zeros((0, 3), bool)


def class_counts(samples: Iterable[Sample]) -> dict[str, int]:
    counts = dict.fromkeys(CLASSES, 0)
    for sample in samples:
        counts[sample.label] += 1
    return counts
