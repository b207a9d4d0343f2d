"""Sample files and in-memory DICOM instances for tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from osteogate.sample_dicom.make_samples import Sample, build_dataset
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

REPO_ROOT = Path(__file__).resolve().parents[2]
SAMPLE_DIR = REPO_ROOT / "sample_dicom"


def sample_files() -> list[Path]:
    """All shipped sample DICOM files (sample_dicom/*.dcm), sorted by name."""
    return sorted(SAMPLE_DIR.glob("*.dcm"))


def sample_file(name: str) -> Path:
    """One sample by file name (``"knee_j2k.dcm"``) or stem (``"knee_j2k"``)."""
    path = SAMPLE_DIR / (name if name.endswith(".dcm") else f"{name}.dcm")
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: run python sample_dicom/make_samples.py")
    return path


def make_dataset(
    *,
    modality: str = "DX",
    body_part: str = "KNEE",
    study_description: str = "XR KNEE 1 VIEW",
    series_description: str = "KNEE AP",
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    size: tuple[int, int] = (64, 64),
    monochrome1: bool = False,
    seed: int | None = None,
    **overrides: object,
) -> Dataset:
    """A small valid DX (or CR) instance with fresh random UIDs unless given.

    The named arguments choose the things that must stay mutually consistent (SOP class follows
    `modality`, AnatomicRegionSequence follows `body_part`, file meta follows the UIDs);
    `overrides` then set any other DICOM keyword verbatim (``PatientID="X"``, ``SeriesNumber=3``;
    a value of None deletes the element). Pixels are 12-bit noise over a gradient, seeded by
    `seed` (default: derived from the SOP Instance UID, so distinct instances differ).
    """
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    sop_uid = sop_uid or generate_uid()
    rng = np.random.default_rng(seed if seed is not None else int(sop_uid.replace(".", "")[-12:]))
    rows, cols = size
    gradient = np.linspace(400, 3600, cols)[None, :].repeat(rows, axis=0)
    # Mild noise: distinct per instance, yet RLE/JPEG-LS compress it clearly below raw size
    # (noisier pixels made RLE output length collide with the raw length and pydicom warn).
    pixels = np.clip(gradient + rng.normal(0, 40, (rows, cols)), 0, 4095).astype(np.uint16)
    spec = Sample(
        filename=f"{sop_uid}.dcm",
        modality=modality,
        body_part=body_part,
        study_label="test",
        study_description=study_description,
        series_description=series_description,
        series_number=1,
        instance_number=1,
        patient_name="Test^Patient",
        patient_id="TEST0001",
        accession="TESTACC0001",
        laterality="R" if body_part == "KNEE" else "",
        view_position="AP",
        pixel_spacing_mm=0.3,
        monochrome1=monochrome1,
    )
    ds = build_dataset(spec, pixels)
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.SOPInstanceUID = sop_uid
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    if not body_part:
        del ds.BodyPartExamined  # "no body part at all" is a case region detection must handle
    for keyword, value in overrides.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    # Keep file meta in step with overridden identifiers, or the file would be inconsistent.
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def write_dataset(ds: Dataset, path: Path) -> Path:
    """Write `ds` as a DICOM Part 10 file (parents created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
