"""Result SR (gateway/sr.py): built from hand-made DX/CR headers, checked by dciodvfy (dicom3tools),
dsrdump (dcmtk) and highdicom's own TID 1500 parser."""

from __future__ import annotations

import datetime
import hashlib
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from osteogate.gateway.sr import (
    DISCLAIMER,
    SERIES_DESCRIPTION,
    AlgorithmInfo,
    ImageFinding,
    SkippedImage,
    build_result_sr,
    sr_summary,
)
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian

DX = UID("1.2.840.10008.5.1.4.1.1.1.1")  # Digital X-Ray Image Storage - For Presentation
CR = UID("1.2.840.10008.5.1.4.1.1.1")  # Computed Radiography Image Storage
STUDY = "study-a"
ALGORITHM = AlgorithmInfo(
    name="OsteoGate EfficientNet-B0",
    version="1.2.0",
    checkpoint_sha256=hashlib.sha256(b"test checkpoint").hexdigest(),
)
KNEE_P = {"normal": 0.125, "osteopenia": 0.25, "osteoporosis": 0.625}
SPINE_P = {"normal": 0.5, "osteopenia": 0.375, "osteoporosis": 0.125}
STUDY_P = {"normal": 0.25, "osteopenia": 0.5, "osteoporosis": 0.25}


def uid(label: str) -> UID:
    digest = hashlib.sha256(f"osteogate-test-sr/{label}".encode()).digest()
    return UID(f"2.25.{int.from_bytes(digest[:16], 'big')}")


def make_image(
    sop_class: UID,
    study: str,
    series: str,
    instance: str,
    body_part: str,
    laterality: str = "",
    *,
    minimal: bool = False,
) -> Dataset:
    """A small radiograph with valid patient/study/series/image modules.

    `minimal` drops Type 2 attributes (accession, referring physician, birth date...) and the
    pixel module, as some modalities and header-only spool reads do.
    """
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = uid(instance)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = uid(instance)
    ds.StudyInstanceUID = uid(study)
    ds.SeriesInstanceUID = uid(series)
    ds.Modality = "DX" if sop_class == DX else "CR"
    ds.PatientName = "Test^Patient"
    ds.PatientID = "TEST0001"
    ds.StudyDate = "20240102"
    ds.StudyTime = "101500"
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.BodyPartExamined = body_part
    if laterality:
        ds.ImageLaterality = laterality
    if minimal:
        return ds
    ds.PatientBirthDate = "19600101"
    ds.PatientSex = "F"
    ds.AccessionNumber = "ACC1"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "XR test"
    ds.Manufacturer = "Test"
    ds.PatientOrientation = ["L", "F"]
    ds.ImagerPixelSpacing = [0.2, 0.2]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = 8
    ds.Columns = 6
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = np.arange(48, dtype=np.uint16).tobytes()
    return ds


@pytest.fixture
def knee() -> Dataset:
    return make_image(DX, STUDY, "series-dx", "knee", "KNEE", "R")


@pytest.fixture
def spine() -> Dataset:
    # Same study, another series and SOP class: one SR must reference both.
    return make_image(CR, STUDY, "series-cr", "spine", "LSPINE")


@pytest.fixture
def chest() -> Dataset:
    return make_image(DX, STUDY, "series-dx", "chest", "CHEST")


def build(knee: Dataset, spine: Dataset, chest: Dataset, **kwargs: object) -> hd.sr.Comprehensive3DSR:
    findings = [
        ImageFinding(source=knee, region="knee", probabilities=KNEE_P, label="osteoporosis"),
        ImageFinding(source=spine, region="spine", probabilities=SPINE_P, label="normal"),
    ]
    args: dict[str, object] = {
        "series_instance_uid": uid("sr-series"),
        "sop_instance_uid": uid("sr-1"),
        "instance_number": 1,
        "skipped": [SkippedImage(source=chest, reason="out of scope: CHEST")],
        "study_label": "osteopenia",
        "study_probabilities": STUDY_P,
        "device_observer_uid": uid("device"),
        "institution_name": "Test Hospital",
        "content_datetime": datetime.datetime(2024, 1, 2, 11, 0, 0),
    }
    args.update(kwargs)
    return build_result_sr(findings, ALGORITHM, **args)  # type: ignore[arg-type]


def save(sr: Dataset, path: Path) -> Path:
    sr.save_as(path, enforce_file_format=True)
    return path


def require(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)}")


def dciodvfy(path: Path) -> list[str]:
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=30)
    lines = (result.stdout + result.stderr).splitlines()
    for line in lines:
        print(line)  # warnings are informative; shown with pytest -s or on failure
    return lines


def test_sr_passes_dciodvfy(tmp_path: Path, knee: Dataset, spine: Dataset, chest: Dataset) -> None:
    require("dciodvfy")
    lines = dciodvfy(save(build(knee, spine, chest), tmp_path / "sr.dcm"))
    assert not [line for line in lines if line.startswith("Error")]


def test_minimal_headers_still_valid(tmp_path: Path) -> None:
    """Sources lacking Type 2 attributes and Rows/Columns: no image library, still valid."""
    require("dciodvfy")
    source = make_image(DX, STUDY, "series-dx", "bare", "KNEE", minimal=True)
    sr = build_result_sr(
        [ImageFinding(source, "knee", KNEE_P, "osteoporosis")],
        ALGORITHM,
        series_instance_uid=uid("sr-series"),
        sop_instance_uid=uid("sr-min"),
        instance_number=1,
    )
    assert "AccessionNumber" not in source  # the caller's header is not modified
    lines = dciodvfy(save(sr, tmp_path / "sr.dcm"))
    assert not [line for line in lines if line.startswith("Error")]
    assert sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[
        0
    ].ReferencedSOPInstanceUID == uid("bare")


def test_dsrdump_shows_findings(tmp_path: Path, knee: Dataset, spine: Dataset, chest: Dataset) -> None:
    require("dsrdump")
    path = save(build(knee, spine, chest), tmp_path / "sr.dcm")
    result = subprocess.run(["dsrdump", "+Pl", str(path)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    dump = result.stdout
    assert "Comprehensive 3D SR Document" in dump
    assert "Completion Flag     : COMPLETE" in dump
    assert "Verification Flag   : UNVERIFIED" in dump
    assert SERIES_DESCRIPTION in dump
    for value in (*KNEE_P.values(), *SPINE_P.values(), *STUDY_P.values()):
        assert f'"Probability")="{value}"' in dump
    assert '(72696002,SCT,"Knee")' in dump
    assert '(24028007,SCT,"Right")' in dump
    assert '(122496007,SCT,"Lumbar spine")' in dump
    assert '"Associated finding")=(64859006,SCT,"Osteoporosis")' in dump
    assert '"Osteoporosis")=(260373001,SCT,"Detected")' in dump
    assert DISCLAIMER in dump
    assert "Image not classified: out of scope: CHEST" in dump
    assert ALGORITHM.checkpoint_sha256 in dump


def test_highdicom_round_trip(tmp_path: Path, knee: Dataset, spine: Dataset, chest: Dataset) -> None:
    sr = hd.sr.srread(save(build(knee, spine, chest), tmp_path / "sr.dcm"))
    assert isinstance(sr, hd.sr.Comprehensive3DSR)
    assert sr.StudyInstanceUID == knee.StudyInstanceUID
    assert sr.PatientID == knee.PatientID and sr.AccessionNumber == knee.AccessionNumber
    assert sr.SeriesDescription == SERIES_DESCRIPTION
    assert sr.Manufacturer == "OsteoGate"
    assert sr.CompletionFlag == "COMPLETE" and sr.VerificationFlag == "UNVERIFIED"
    assert (sr.ContentDate, sr.ContentTime) == ("20240102", "110000")
    assert sr.SeriesNumber == 9901 and sr.InstitutionName == "Test Hospital"
    assert "PredecessorDocumentsSequence" not in sr

    report = hd.sr.MeasurementReport.from_sequence(sr.content)
    groups = report.get_image_measurement_groups()
    assert [g.tracking_identifier for g in groups] == ["image 1 (knee)", "image 2 (spine)", "study summary"]

    for group, source, expected in zip(groups, (knee, spine), (KNEE_P, SPINE_P), strict=False):
        [image] = group.source_images
        assert image.referenced_sop_instance_uid == source.SOPInstanceUID
        assert image.referenced_sop_class_uid == source.SOPClassUID
        values = [
            m.value for m in group.get_measurements(name=hd.sr.CodedConcept("122157", "DCM", "Probability"))
        ]
        assert values == pytest.approx(list(expected.values()))
    assert groups[2].source_images == []  # study level: applies to all images

    evaluations = {e.name.meaning: e.value.meaning for e in groups[0].get_qualitative_evaluations()}
    assert evaluations == {"Osteoporosis": "Detected", "Osteopenia": "Not detected"}
    evaluations = {e.name.meaning: e.value.meaning for e in groups[2].get_qualitative_evaluations()}
    assert evaluations == {"Osteoporosis": "Not detected", "Osteopenia": "Detected"}

    [observer] = report.get_observer_contexts()
    assert observer.observer_type.value == "121007"  # Device
    assert observer.observer_identifying_attributes.uid == uid("device")

    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == knee.StudyInstanceUID
    referenced = {
        sop.ReferencedSOPInstanceUID
        for series in evidence.ReferencedSeriesSequence
        for sop in series.ReferencedSOPSequence
    }
    assert referenced == {knee.SOPInstanceUID, spine.SOPInstanceUID}
    assert len(evidence.ReferencedSeriesSequence) == 2


def test_predecessor_referenced(tmp_path: Path, knee: Dataset, spine: Dataset, chest: Dataset) -> None:
    first = build(knee, spine, chest)
    second = build(knee, spine, chest, sop_instance_uid=uid("sr-2"), instance_number=2, predecessor=first)
    reread = pydicom.dcmread(save(second, tmp_path / "sr2.dcm"))
    [study] = reread.PredecessorDocumentsSequence
    assert study.StudyInstanceUID == knee.StudyInstanceUID
    [series] = study.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == first.SeriesInstanceUID
    assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == first.SOPInstanceUID
    assert reread.InstanceNumber == 2


def test_findings_from_two_studies_rejected(knee: Dataset, chest: Dataset) -> None:
    other = make_image(CR, "study-b", "series-b", "other", "LSPINE")
    with pytest.raises(ValueError, match="studies"):
        build(knee, other, chest)
    with pytest.raises(ValueError, match="studies"):
        build(knee, knee, other)  # a skipped image of another study
    with pytest.raises(ValueError, match="studies"):
        build(knee, knee, chest, predecessor=build(other, other, other, skipped=[]))


def test_invalid_inputs_rejected(knee: Dataset, spine: Dataset, chest: Dataset) -> None:
    with pytest.raises(ValueError):
        build_result_sr(
            [], ALGORITHM, series_instance_uid=uid("s"), sop_instance_uid=uid("i"), instance_number=1
        )
    bad = {"normal": 0.5, "osteopenia": 0.5}
    with pytest.raises(ValueError, match="keys"):
        build(knee, spine, chest, study_probabilities=bad)
    with pytest.raises(ValueError, match="label"):
        build(knee, spine, chest, study_label="fracture")
    with pytest.raises(ValueError, match="together"):
        build(knee, spine, chest, study_label=None)


def test_summary_text(tmp_path: Path, knee: Dataset, spine: Dataset, chest: Dataset) -> None:
    text = sr_summary(pydicom.dcmread(save(build(knee, spine, chest), tmp_path / "sr.dcm")))
    print(text)
    lines = text.splitlines()
    assert any("OsteoGate EfficientNet-B0" in line and ALGORITHM.checkpoint_sha256 in line for line in lines)
    [knee_line] = [line for line in lines if line.startswith("image 1 (knee)")]
    assert "Knee Right" in knee_line and ": osteoporosis" in knee_line and "osteoporosis 0.625" in knee_line
    [spine_line] = [line for line in lines if line.startswith("image 2 (spine)")]
    assert "Lumbar spine" in spine_line and ": normal" in spine_line and "normal 0.500" in spine_line
    [study_line] = [line for line in lines if line.startswith("study summary")]
    assert ": osteopenia" in study_line
    assert "Skipped: out of scope: CHEST" in lines
    assert DISCLAIMER in lines
    assert "Test^Patient" not in text and "TEST0001" not in text


def test_summary_falls_back_for_other_sr() -> None:
    """An SR highdicom cannot read as TID 1500 is still summarised item by item."""
    ds = Dataset()
    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = [hd.sr.CodedConcept("18748-4", "LN", "Diagnostic imaging report")]
    ds.ContinuityOfContent = "SEPARATE"
    ds.ContentSequence = [
        hd.sr.TextContentItem(
            name=hd.sr.CodedConcept("121106", "DCM", "Comment"),
            value="free text",
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
    ]
    assert "Comment: free text" in sr_summary(ds)
