"""A simulated hospital for ground-truth tests and docs: knee films from the shared dataset sent
as DICOM studies of made-up patients, and their DXA T-scores as the RIS would send them (HL7
ORU^R01) or export them (CSV).

Images are read from ``../shared/datasets/knee-xray`` at test time and written to a temporary
folder; nothing is copied into the repository. Callers skip when the folder is missing
(``dataset_dir()`` returns None).
"""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

from osteogate.sample_dicom.make_samples import (
    Demographics,
    Sample,
    build_dataset,
    knee_pixels,
    set_demographics,
)

from tests.helpers.mllp_client import oru_message

# ../shared/datasets/knee-xray beside the repository (tests/helpers/site.py -> repo -> its parent).
DATASET = Path(__file__).resolve().parents[2].parent / "shared" / "datasets" / "knee-xray"
HIP_T_SCORE = ("38264-8", "DXA Hip [T-score]")


def dataset_dir() -> Path | None:
    """The shared knee dataset with its manifest, or None where this machine has none."""
    return DATASET if (DATASET / "manifest.csv").is_file() else None


@dataclass(frozen=True)
class SitePatient:
    """One simulated patient: a knee film (its manifest row) and a DXA some days from it."""

    patient_id: str
    issuer: str
    image: str  # path relative to the dataset folder
    age: int
    sex: str
    weight_kg: float
    height_m: float
    t_score: float
    study_date: date
    dxa_date: date


def site_patients(dataset: Path, count: int, *, seed: int = 17, issuer: str = "SITE_A",
                  first_study: date = date(2025, 3, 3), max_gap_days: int = 200) -> list[SitePatient]:
    """``count`` patients from distinct films (one per duplicate group) of the 3-class table."""
    with (dataset / "manifest.csv").open(newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["source"] == "m7md_knee3class" and r["t_score"]]
    groups: dict[str, dict[str, str]] = {}
    for row in rows:
        groups.setdefault(row["duplicate_group"], row)
    rng = random.Random(seed)
    chosen = rng.sample(sorted(groups.values(), key=lambda r: r["path"]), count)
    patients = []
    for number, row in enumerate(chosen, start=1):
        study_day = first_study + timedelta(days=7 * number)
        patients.append(SitePatient(
            patient_id=f"SIM{number:05d}", issuer=issuer, image=row["path"], age=int(float(row["age"])),
            sex=row["sex"], weight_kg=float(row["weight_kg"]), height_m=float(row["height_m"]),
            t_score=float(row["t_score"]), study_date=study_day,
            dxa_date=study_day + timedelta(days=rng.randint(-max_gap_days, max_gap_days))))
    return patients


def write_studies(dataset: Path, patients: list[SitePatient], out: Path, *, long_side: int = 384) -> list[Path]:
    """One single-image DX knee study per patient (real pixels, made-up identity) under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for patient in patients:
        sample = Sample(f"{patient.patient_id}.dcm", "DX", "KNEE", f"site/{patient.issuer}/{patient.patient_id}",
                        "XR KNEE AP", "KNEE AP", 1, 1, f"Sim^{patient.patient_id}", patient.patient_id,
                        f"ACC{patient.patient_id}", "R", "AP", 0.3)
        ds = build_dataset(sample, knee_pixels(dataset, patient.image, long_side=long_side))
        birth = date(patient.study_date.year - patient.age, 1, 1)
        set_demographics(ds, Demographics(birth.strftime("%Y%m%d"), patient.sex, f"{patient.age:03d}Y",
                                          f"{patient.weight_kg:g}", f"{patient.height_m:g}"))
        ds.IssuerOfPatientID = patient.issuer
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = patient.study_date.strftime("%Y%m%d")
        path = out / sample.filename
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def oru_messages(patients: list[SitePatient]) -> list[str]:
    """The RIS's ORU^R01 for each patient's DXA: the manifest T-score as a total-hip T-score."""
    return [oru_message(p.patient_id, p.dxa_date.strftime("%Y%m%d"), [(*HIP_T_SCORE, f"{p.t_score:.2f}")],
                        issuer=p.issuer, control_id=f"DXA{p.patient_id}", sex=p.sex)
            for p in patients]


def dxa_csv(patients: list[SitePatient], path: Path) -> Path:
    """The same results as a CSV export (``osteogate dxa import``)."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["patient_id", "issuer_of_patient_id", "dxa_date", "site", "t_score"])
        for p in patients:
            writer.writerow([p.patient_id, p.issuer, p.dxa_date.strftime("%Y%m%d"), "Total hip", f"{p.t_score:.2f}"])
    return path
