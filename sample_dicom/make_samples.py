"""Generate the small, de-identified sample DICOM files shipped in sample_dicom/.

Run: ``python sample_dicom/make_samples.py [--source /work/shared/datasets/knee-xray] [--out DIR]``

Knee pixels are derived from four m7md_knee3class JPEGs, downscaled to <= 512 px on the long
side and rescaled to 12 bits; spine and chest pixels are synthetic (numpy). Everything is
deterministic: UIDs are ``2.25.<int>`` values hashed from fixed labels, dates are fixed and the
random generators are seeded, so re-running rewrites byte-identical files (same library
versions). The knee set is never copied: only these small derived images are written.
"""

from __future__ import annotations

import argparse
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
)

HERE = Path(__file__).resolve().parent
DEFAULT_SOURCE = Path("/work/shared/datasets/knee-xray")

DX_PRESENTATION = UID("1.2.840.10008.5.1.4.1.1.1.1")  # Digital X-Ray Image Storage - For Presentation
CR_IMAGE = UID("1.2.840.10008.5.1.4.1.1.1")  # Computed Radiography Image Storage

# A fixed ImplementationClassUID keeps the file meta independent of the pydicom version, so
# the files stay byte-identical when the generator is re-run after a library upgrade.
IMPLEMENTATION_CLASS_UID = UID("2.25.191370384718232146011352733917562468593")
IMPLEMENTATION_VERSION = "OSTEOGATE_SMPL1"
MANUFACTURER = "OsteoGate sample generator"
MAX_STORED = 4095  # BitsStored 12


def fixed_uid(label: str) -> UID:
    """Deterministic UID under the 2.25 (UUID-derived) root: 128 bits of sha256(label).

    Hashing a human-readable label (not a counter) keeps UIDs stable when samples are added.
    """
    digest = hashlib.sha256(f"osteogate-sample/{label}".encode()).digest()
    return UID(f"2.25.{int.from_bytes(digest[:16], 'big')}")


def code_item(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


ANATOMY = {
    "KNEE": code_item("72696002", "SCT", "Knee"),
    "LSPINE": code_item("122496007", "SCT", "Lumbar spine"),
    "CHEST": code_item("51185008", "SCT", "Chest"),
}

VIEWS = {
    "AP": code_item("399348003", "SCT", "antero-posterior"),
    "PA": code_item("399260004", "SCT", "postero-anterior"),
}


@dataclass(frozen=True)
class Sample:
    """What distinguishes one sample file; everything else is common boilerplate."""

    filename: str
    modality: str  # DX or CR
    body_part: str
    study_label: str  # samples sharing a study_label form one study
    study_description: str
    series_description: str
    series_number: int
    instance_number: int
    patient_name: str
    patient_id: str
    accession: str
    laterality: str  # R, L, or "" when unpaired (spine, chest)
    view_position: str
    pixel_spacing_mm: float
    monochrome1: bool = False
    j2k: bool = False


@dataclass(frozen=True)
class Demographics:
    """Patient module (Type 2 birth date and sex, empty when unknown) and Patient Study module
    (Type 3 age, weight, size: absent when None) values of a sample."""

    birth_date: str = ""
    sex: str = ""
    age: str | None = None  # AS, e.g. "040Y"
    weight_kg: str | None = None  # DS
    height_m: str | None = None  # DS, metres as the standard says


# Knee samples carry the age, sex, weight and height of their source image's row in the public
# m7md patient table (no identifiers there); birth dates are invented to match the age on the
# study date (2024-01-15). knee_mono1.dcm deliberately carries none: the demo shows both cases.
DEMOGRAPHICS: dict[str, Demographics] = {
    "knee_dx.dcm": Demographics("19830610", "M", "040Y", "74", "1.615"),
    "knee_dx_2.dcm": Demographics("19830610", "M", "040Y", "74", "1.615"),  # same patient and study
    "knee_j2k.dcm": Demographics("19590302", "M", "064Y", "70", "1.585"),
    "knee_mono1.dcm": Demographics(),
    "spine_cr.dcm": Demographics("19551120", "F", "068Y", "61", "1.58"),
    "chest_dx.dcm": Demographics("19680905", "M", "055Y", "82", "1.78"),
}
# In-memory test instances built from other Sample values keep the generator's old defaults.
DEFAULT_DEMOGRAPHICS = Demographics("19600101", "F")


def set_demographics(ds: Dataset, demographics: Demographics) -> None:
    ds.PatientBirthDate = demographics.birth_date
    ds.PatientSex = demographics.sex
    for keyword, value in (("PatientAge", demographics.age), ("PatientWeight", demographics.weight_kg),
                           ("PatientSize", demographics.height_m)):
        if value is not None:
            setattr(ds, keyword, value)


# ---------------------------------------------------------------------------------- pixels


def knee_pixels(source: Path, relpath: str, long_side: int = 512) -> np.ndarray:
    """8-bit knee JPEG -> 12-bit uint16 array, long side downscaled to `long_side`."""
    with Image.open(source / relpath) as im:
        gray = im.convert("L")
        scale = long_side / max(gray.size)
        size = (max(1, round(gray.width * scale)), max(1, round(gray.height * scale)))
        # LANCZOS is deterministic for a given Pillow version and keeps bone edges crisp.
        small = gray.resize(size, Image.Resampling.LANCZOS)
    arr = np.asarray(small, dtype=np.float64)
    return np.round(arr * (MAX_STORED / 255.0)).astype(np.uint16)


def _smooth(img: np.ndarray, passes: int = 2) -> np.ndarray:
    """Cheap separable box blur (no scipy dependency) to soften synthetic edges."""
    out = img
    for _ in range(passes):
        out = (np.roll(out, 1, 0) + out + np.roll(out, -1, 0)) / 3.0
        out = (np.roll(out, 1, 1) + out + np.roll(out, -1, 1)) / 3.0
    return out


def _to12(img: np.ndarray, rng: np.random.Generator, noise: float = 0.015) -> np.ndarray:
    img = img + rng.normal(0.0, noise, img.shape)
    return np.round(np.clip(img, 0.0, 1.0) * MAX_STORED).astype(np.uint16)


def spine_pixels(height: int = 512, width: int = 320, seed: int = 7) -> np.ndarray:
    """Synthetic AP lumbar spine: soft-tissue body, five vertebral bodies with pedicles,
    darker intervertebral discs, iliac crests at the bottom. Bright = bone (MONOCHROME2)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    cx = width / 2.0
    # Soft tissue: a broad horizontal gradient (the abdomen is thicker in the middle).
    img = 0.18 + 0.22 * np.exp(-(((xx - cx) / (0.45 * width)) ** 2))
    top, disc, body_h = 0.06 * height, 0.028 * height, 0.152 * height
    for i in range(5):
        y0 = top + i * (body_h + disc)
        yc = y0 + body_h / 2
        half_w = (0.13 + 0.012 * i) * width  # lower lumbar bodies are wider
        # Rounded-rectangle vertebral body (superellipse), cortical rim slightly brighter.
        r = (np.abs((xx - cx) / half_w) ** 4 + np.abs((yy - yc) / (body_h / 2)) ** 4) ** 0.25
        img += np.where(r < 1.0, 0.28 + 0.10 * (r > 0.86), 0.0)
        # Trabecular texture inside the body.
        img += np.where(r < 0.86, rng.normal(0.0, 0.025, img.shape), 0.0)
        # Pedicles: two small bright ovals at the upper corners.
        for side in (-1, 1):
            px, py = cx + side * 0.72 * half_w, y0 + 0.32 * body_h
            pr = ((xx - px) / (0.16 * half_w)) ** 2 + ((yy - py) / (0.17 * body_h)) ** 2
            img += np.where(pr < 1.0, 0.12, 0.0)
        # Spinous process: a faint teardrop on the midline.
        sp = ((xx - cx) / (0.05 * width)) ** 2 + ((yy - (yc + 0.1 * body_h)) / (0.22 * body_h)) ** 2
        img += np.where(sp < 1.0, 0.07, 0.0)
        # Transverse processes.
        tp = (np.abs(yy - (y0 + 0.4 * body_h)) < 0.07 * body_h) & (np.abs(xx - cx) < 2.1 * half_w)
        img += np.where(tp & (np.abs(xx - cx) > half_w), 0.08, 0.0)
    # Iliac crests: two bright arcs in the lower corners.
    for side in (-1, 1):
        ex, ey = cx + side * 0.52 * width, 1.05 * height
        e = ((xx - ex) / (0.42 * width)) ** 2 + ((yy - ey) / (0.3 * height)) ** 2
        img += np.where(e < 1.0, 0.16 + 0.08 * (e > 0.8), 0.0)
    return _to12(_smooth(img), rng)


def chest_pixels(height: int = 384, width: int = 384, seed: int = 11) -> np.ndarray:
    """Synthetic PA chest: dark lung fields, bright mediastinum and heart, rib arcs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    cx = width / 2.0
    img = np.full((height, width), 0.62)
    for side in (-1, 1):
        lx, ly = cx + side * 0.22 * width, 0.47 * height
        lung = ((xx - lx) / (0.17 * width)) ** 2 + ((yy - ly) / (0.36 * height)) ** 2
        img = np.where(lung < 1.0, 0.22, img)
        # Ribs: arcs inside each lung, a few brighter bands.
        for k in range(8):
            ry = 0.16 * height + k * 0.085 * height
            arc = ry + 0.0018 * (xx - lx) ** 2 / (1 + 0.004 * width)
            band = (np.abs(yy - arc) < 0.012 * height) & (lung < 1.05)
            img = img + np.where(band, 0.12, 0.0)
    heart = ((xx - cx - 0.05 * width) / (0.17 * width)) ** 2 + ((yy - 0.66 * height) / (0.15 * height)) ** 2
    img = np.where(heart < 1.0, 0.6, img)
    spine = np.abs(xx - cx) < 0.05 * width
    img = img + np.where(spine, 0.08, 0.0)
    return _to12(_smooth(img), rng)


# -------------------------------------------------------------------------------- datasets


def build_dataset(s: Sample, pixels: np.ndarray) -> Dataset:
    """A complete DX / CR instance (file meta included) for sample `s` with 12-bit `pixels`.

    Also used by tests/helpers/datasets.py so that in-memory test instances carry the same
    modules as the shipped samples.
    """
    sop_class = DX_PRESENTATION if s.modality == "DX" else CR_IMAGE
    study_uid = fixed_uid(f"study/{s.study_label}")
    series_uid = fixed_uid(f"series/{s.study_label}/{s.series_number}")
    sop_uid = fixed_uid(f"instance/{s.filename}")

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["DERIVED", "PRIMARY"]  # derived: downscaled/synthetic, not an acquisition
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = "20240115"
    ds.StudyTime = "093000"
    ds.SeriesTime = f"0931{s.series_number:02d}"
    ds.ContentTime = ds.AcquisitionTime = f"0931{s.series_number:02d}"
    ds.AccessionNumber = s.accession
    ds.Modality = s.modality
    ds.Manufacturer = MANUFACTURER
    ds.InstitutionName = "OsteoGate Demo"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = s.study_description
    ds.SeriesDescription = s.series_description
    ds.ManufacturerModelName = "make_samples.py"
    ds.DerivationDescription = (
        "Synthetic image generated with numpy"
        if s.body_part != "KNEE"
        else "Downscaled from an 8-bit public knee radiograph JPEG, rescaled to 12 bits"
    )
    ds.PatientName = s.patient_name
    ds.PatientID = s.patient_id
    set_demographics(ds, DEMOGRAPHICS.get(s.filename, DEFAULT_DEMOGRAPHICS))
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "Fake demo identity; pixels derived or synthetic"
    ds.BodyPartExamined = s.body_part
    ds.ViewPosition = s.view_position
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = s.accession[-4:]
    ds.SeriesNumber = s.series_number
    ds.InstanceNumber = s.instance_number
    ds.PatientOrientation = ["L", "F"] if s.body_part != "CHEST" else ["R", "F"]
    # Image Laterality only: series-level Laterality is 2C and must be absent when it is set.
    ds.ImageLaterality = s.laterality or "U"
    if s.body_part in ANATOMY:
        # Test datasets may use other (or empty) body parts to exercise region detection.
        ds.AnatomicRegionSequence = Sequence([ANATOMY[s.body_part]])
    ds.ImagerPixelSpacing = [f"{s.pixel_spacing_mm:.3f}"] * 2
    ds.PixelSpacing = [f"{s.pixel_spacing_mm:.3f}"] * 2
    ds.KVP = "65" if s.body_part == "KNEE" else "85"
    ds.BurnedInAnnotation = "NO"

    stored = (MAX_STORED - pixels).astype(np.uint16) if s.monochrome1 else pixels
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if s.monochrome1 else "MONOCHROME2"
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    # VOI window over the occupied 12-bit range (window on stored values, before the
    # MONOCHROME1 display inversion -- exactly what a viewer applies).
    lo, hi = int(stored.min()), int(stored.max())
    ds.WindowCenter = str(round((lo + hi) / 2))
    ds.WindowWidth = str(max(2, hi - lo))
    ds.VOILUTFunction = "LINEAR"
    ds.LossyImageCompression = "00"

    if s.modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.PixelIntensityRelationship = "LIN"
        ds.PixelIntensityRelationshipSign = 1  # higher value = more attenuation (brighter bone)
        ds.PresentationLUTShape = "INVERSE" if s.monochrome1 else "IDENTITY"
        ds.DetectorType = "SCINTILLATOR"
        ds.AcquisitionContextSequence = Sequence()
        ds.PositionerType = "COLUMN"
        if s.view_position in VIEWS:
            ds.ViewCodeSequence = Sequence([VIEWS[s.view_position]])
        ds.PixelSpacingCalibrationType = "GEOMETRY"
        ds.PixelSpacingCalibrationDescription = "Nominal spacing chosen by the sample generator"
    ds.PixelData = stored.tobytes()
    ds["PixelData"].VR = "OW"

    if s.j2k:
        # Lossless JPEG 2000 via pylibjpeg-openjpeg; pixel values round-trip exactly. Keep the
        # fixed SOP Instance UID (compress() would mint a random one and break determinism).
        ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg", generate_instance_uid=False)
    return ds


SAMPLES: list[tuple[Sample, str]] = [
    (
        Sample("knee_dx.dcm", "DX", "KNEE", "knee-a", "XR KNEE 2 VIEWS RIGHT", "KNEE AP", 1, 1,
               "Demo^Knee", "DEMO0001", "DEMOACC0001", "R", "AP", 0.3),
        "m7md_knee3class/normal/N1.jpg",
    ),
    (
        Sample("knee_dx_2.dcm", "DX", "KNEE", "knee-a", "XR KNEE 2 VIEWS RIGHT", "KNEE AP 2", 2, 1,
               "Demo^Knee", "DEMO0001", "DEMOACC0001", "R", "AP", 0.3),
        "m7md_knee3class/normal/N11.jpg",
    ),
    (
        Sample("spine_cr.dcm", "CR", "LSPINE", "spine-a", "XR LUMBAR SPINE 2 VIEWS", "LSPINE AP", 1, 1,
               "Demo^Spine", "DEMO0002", "DEMOACC0002", "", "AP", 0.35),
        "synthetic:spine",
    ),
    (
        Sample("knee_j2k.dcm", "DX", "KNEE", "knee-j2k", "XR KNEES BILATERAL AP", "KNEES AP J2K", 1, 1,
               "Demo^KneeJ2K", "DEMO0003", "DEMOACC0003", "B", "AP", 0.3, j2k=True),
        "m7md_knee3class/osteopenia/OP16.jpg",
    ),
    (
        Sample("knee_mono1.dcm", "CR", "KNEE", "knee-mono1", "XR KNEE 1 VIEW LEFT", "KNEE AP MONO1", 1, 1,
               "Demo^KneeMono", "DEMO0004", "DEMOACC0004", "L", "AP", 0.3, monochrome1=True),
        "m7md_knee3class/osteoporosis/OS25.jpg",
    ),
    (
        Sample("chest_dx.dcm", "DX", "CHEST", "chest-a", "XR CHEST PA", "CHEST PA", 1, 1,
               "Demo^Chest", "DEMO0005", "DEMOACC0005", "", "PA", 0.9),
        "synthetic:chest",
    ),
]


def generate(source: Path, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for sample, origin in SAMPLES:
        if origin == "synthetic:spine":
            pixels = spine_pixels()
        elif origin == "synthetic:chest":
            pixels = chest_pixels()
        else:
            pixels = knee_pixels(source, origin)
        ds = build_dataset(sample, pixels)
        path = out / sample.filename
        ds.save_as(path, enforce_file_format=True)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="knee-xray dataset root")
    parser.add_argument("--out", type=Path, default=HERE, help="output directory (default: sample_dicom/)")
    args = parser.parse_args(argv)
    for path in generate(args.source, args.out):
        print(f"{path}  {path.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
