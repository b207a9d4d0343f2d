"""Training data: samples from a manifest CSV or a `region/label/*` folder layout, label targets.

Covariates (age, sex, weight, height) and the densitometry `t_score` come from the manifest's
optional columns `age, sex, weight_kg, height_m, t_score` (any may be empty). For DICOM files the
covariates come from the header through model/covariates.py, the same code serving uses; a value
the header lacks is taken from the manifest.

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
from osteogate.model.covariates import Covariates, covariates_from_dataset, covariates_from_values
from osteogate.model.taxonomy import CLASSES, LOW_BMD_CLASSES, REGIONS

LOW_BMD = LOW_BMD_CLASSES
COVARIATE_COLUMNS = ("age", "sex", "weight_kg", "height_m")
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".dcm", ".dicom"})


@dataclass(frozen=True)
class Sample:
    """One image of the pool. `group` is an optional patient/duplicate id from the manifest."""

    path: Path
    label: str
    region: str = "knee"
    group: str = ""
    source: str = "default"
    covariates: Covariates = Covariates()
    t_score: float | None = None  # densitometry T-score: a label, never an input


def _t_score(text: str | None, where: str) -> float | None:
    text = (text or "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError as exc:
        raise DataError(f"{where}: t_score {text!r} is not a number") from exc
    if not -10.0 <= value <= 10.0:
        raise DataError(f"{where}: t_score {value} is outside -10..10")
    return value


def header_covariates(path: Path) -> Covariates | None:
    """Covariates from a DICOM file's header (pixels not read), or None for other files."""
    if path.suffix.lower() not in (".dcm", ".dicom"):
        try:
            with path.open("rb") as handle:
                handle.seek(128)
                if handle.read(4) != b"DICM":
                    return None
        except OSError:
            return None
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:  # noqa: BLE001 - an unreadable header has no covariates; decoding reports the file
        return Covariates(notes=("DICOM header unreadable",))
    return covariates_from_dataset(ds)


def merge_covariates(header: Covariates | None, manifest: Covariates) -> Covariates:
    """Header values first (what serving sees), the manifest's for what the header lacks."""
    if header is None:
        return manifest
    return Covariates(
        age_years=header.age_years if header.age_years is not None else manifest.age_years,
        sex=header.sex if header.sex is not None else manifest.sex,
        weight_kg=header.weight_kg if header.weight_kg is not None else manifest.weight_kg,
        height_m=header.height_m if header.height_m is not None else manifest.height_m,
        notes=header.notes + manifest.notes,
    )


class DataError(ValueError):
    """Bad manifest or folder layout (message is shown to the user as is)."""


class MissingData(DataError, FileNotFoundError):
    """The data folder or manifest named does not exist (exit 66, not 65)."""


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
            where = f"{path}:{line}"
            manifest_covariates = covariates_from_values(*(row.get(c) for c in COVARIATE_COLUMNS))
            sample = Sample(
                path=file_path,
                label=row["label"].strip().lower(),
                region=(row.get("region") or default_region).strip().lower(),
                group=(row.get(group_column) or "").strip() if group_column else "",
                source=(row.get("source") or "default").strip(),
                covariates=merge_covariates(header_covariates(file_path) if file_path.is_file() else None,
                                            manifest_covariates),
                t_score=_t_score(row.get("t_score"), where),
            )
            samples.append(_check(sample, where))
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
                sample = Sample(path=file_path, label=label_dir.name.lower(), region=region, source=root.name,
                                covariates=header_covariates(file_path) or Covariates())
                samples.append(_check(sample, str(file_path)))
    return samples


def load_samples(data: Path, default_region: str = "knee") -> list[Sample]:
    """A manifest CSV, or a folder holding `manifest.csv`, or a folder layout."""
    data = Path(data)
    if not data.exists():
        raise MissingData(f"{data}: no such file or folder")
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
        mask[[CLASSES.index(c) for c in LOW_BMD_CLASSES]] = True
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
