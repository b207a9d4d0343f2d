"""Small generated datasets for tests and for exercising spine support (no real spine set exists).

Each image is a dark background with a bright "bone" block whose trabecular texture depends on the
class: dense fine texture (normal), sparser (osteopenia), coarse and dark (osteoporosis). That is
learnable in a few steps, which is what a pipeline test needs; it says nothing about real data.

The 3-class images also carry a T-score within their class's WHO band and covariates that follow
it (older and lighter with lower T-scores, as on real data), so the fusion stage has something to
fit; binary-source images have none. The DICOM image carries its demographics in the header only
(PatientAge, PatientSex, PatientWeight, PatientSize), the manifest columns stay empty for it.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from osteogate.model.taxonomy import CLASSES

_DENSITY = {"normal": 0.85, "osteopenia": 0.6, "osteoporosis": 0.35}
_T_BAND = {"normal": (-0.9, 1.0), "osteopenia": (-2.4, -1.1), "osteoporosis": (-3.6, -2.6)}
COVARIATE_COLUMNS = ["age", "sex", "weight_kg", "height_m", "t_score"]


def synthetic_covariates(label: str, rng: np.random.Generator) -> dict[str, str]:
    """T-score in the label's band; age and weight follow it with noise."""
    t = rng.uniform(*_T_BAND[label])
    age = float(np.clip(52 - 14 * (t + 1.5) + rng.normal(0, 5), 20, 95))
    height = float(rng.normal(1.66, 0.08))
    weight = float(np.clip(72 + 6 * t + rng.normal(0, 8), 40, 120))
    return {"age": f"{age:.0f}", "sex": str(rng.choice(["F", "M"])), "weight_kg": f"{weight:.1f}",
            "height_m": f"{height:.3f}", "t_score": f"{t:.2f}"}


def synthetic_image(label: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 size x size image of the given class."""
    image = rng.normal(20, 5, (size, size))
    top, bottom, left, right = size // 8, size - size // 8, size // 6, size - size // 6
    density = _DENSITY[label]
    block = rng.random((bottom - top, right - left)) < density
    image[top:bottom, left:right] = 90 + 140 * block * density + rng.normal(0, 8, block.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def write_dicom(path: Path, pixels: np.ndarray, body_part: str = "KNEE", demographics: dict[str, str] | None = None) -> None:
    """Minimal 16-bit MONOCHROME2 DX instance (12 bits stored), readable by model/pixels.py."""
    from pydicom.dataset import Dataset as DicomDataset
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = DicomDataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.BodyPartExamined = body_part
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = (pixels.astype(np.uint16) * 16).tobytes()  # 8-bit values spread over 12 bits
    if demographics:
        ds.PatientAge = f"{int(demographics['age']):03d}Y"
        ds.PatientSex = demographics["sex"]
        ds.PatientWeight = demographics["weight_kg"]
        ds.PatientSize = demographics["height_m"]
    ds.save_as(path, enforce_file_format=True)


def make_synthetic_dataset(
    root: Path, per_class: int = 6, size: int = 96, spine: int = 2, binary: int = 0, seed: int = 0, dicom: bool = True
) -> Path:
    """Write PNGs (+ one DICOM, + `spine` spine images, + `binary` binary-source images) and a manifest.

    Returns the manifest path. Every image is its own group except one deliberate exact duplicate.
    """
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(seed)
    covariate_rng = np.random.default_rng(seed + 1)  # separate stream: the images do not change with it
    rows: list[dict[str, str]] = []

    def add(label: str, region: str, source: str, suffix: str = ".png") -> Path:
        folder = root / region / label
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{source}_{len(rows):03d}{suffix}"
        pixels = synthetic_image(label, size, rng)
        covariates = synthetic_covariates(label, covariate_rng) if source != "synthetic_binary" else {}
        row = {"path": str(path.relative_to(root)), "label": label, "region": region, "source": source, **covariates}
        if suffix == ".dcm":
            write_dicom(path, pixels, region.upper(), covariates)
            row.update({name: "" for name in COVARIATE_COLUMNS[:-1]})  # from the header only
        else:
            Image.fromarray(pixels).save(path)
        rows.append(row)
        return path

    for label in CLASSES:
        for _ in range(per_class):
            add(label, "knee", "synthetic3")
    for k in range(spine):
        add(CLASSES[k % len(CLASSES)], "spine", "synthetic3")
    for k in range(binary):
        add("normal" if k % 2 == 0 else "osteoporosis", "knee", "synthetic_binary")
    if dicom:
        add("osteoporosis", "knee", "synthetic3", ".dcm")
    # One exact copy under a new name: the leakage guard must put both in one group.
    first = root / rows[0]["path"]
    copy = first.with_name("copy_of_" + first.name)
    copy.write_bytes(first.read_bytes())
    rows.append({**rows[0], "path": str(copy.relative_to(root))})
    manifest = root / "manifest.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "label", "region", "source", *COVARIATE_COLUMNS],
                                restval="")
        writer.writeheader()
        writer.writerows(rows)
    return manifest
