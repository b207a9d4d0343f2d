"""model/covariates.py: every DICOM age form, dates, units, and every bad value -> missing with a reason."""

from __future__ import annotations

import warnings
from datetime import date
from pathlib import Path

import pydicom
import pytest
from osteogate.model.covariates import (
    Covariates,
    covariates_from_dataset,
    covariates_from_values,
    parse_age,
    parse_date,
    parse_height,
    parse_sex,
    parse_weight,
)
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, generate_uid


def raw_dataset(**values: tuple[str, bytes]) -> Dataset:
    """A dataset holding raw (unconverted) elements, as pydicom has them right after reading a file:
    malformed values can be stored this way and are only converted (or fail) on access."""
    ds = Dataset()
    for keyword, (vr, value) in values.items():
        tag = Tag(keyword)
        ds[tag] = RawDataElement(tag, vr, len(value), value, 0, True, True)
    return ds


@pytest.mark.parametrize(("text", "years"), [
    ("065Y", 65.0), ("780M", 65.0), ("052W", 52 * 7 / 365.25), ("010D", 10 / 365.25),
    ("065y", 65.0), ("65Y", 65.0), (" 65 Y", 65.0), ("65", 65.0), ("064.5", 64.5), (71, 71.0), (71.5, 71.5),
    ("120Y", 120.0), ("001D", 1 / 365.25),
])
def test_age_every_as_form(text, years):
    value, note = parse_age(text)
    assert note is None
    assert value == pytest.approx(years, abs=1e-3)


@pytest.mark.parametrize(("text", "fragment"), [
    ("121Y", "implausible"), ("999Y", "implausible"), (-3, "implausible"), ("000Y", "unknown"), (0, "unknown"),
    ("abcY", "not a DICOM age"), ("65X", "not a DICOM age"), ("6 5Y", "not a DICOM age"), (float("nan"), "finite"),
    ("1000D", "not a DICOM age"),  # AS has three digits
])
def test_age_bad_values_are_missing_with_reason(text, fragment):
    value, note = parse_age(text)
    assert value is None and fragment in note


def test_age_blank_is_missing_without_note():
    assert parse_age("") == (None, None)
    assert parse_age(None) == (None, None)
    assert parse_age("   ") == (None, None)


@pytest.mark.parametrize(("text", "expected"), [
    ("19610519", date(1961, 5, 19)), ("1961.05.19", date(1961, 5, 19)), (date(2000, 1, 2), date(2000, 1, 2)),
    ("19.05.1961", None), ("1961-05-19", None), ("19610230", None), ("", None), ("1961051", None), (None, None),
])
def test_parse_date(text, expected):
    assert parse_date(text) == expected


def header(**values: object) -> Dataset:
    ds = Dataset()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


def test_age_from_birth_date_and_each_reference_date():
    base = {"PatientBirthDate": "19610519"}
    for reference in ("StudyDate", "AcquisitionDate", "ContentDate"):
        cov = covariates_from_dataset(header(**base, **{reference: "20260518"}))
        assert cov.age_years == 64.0  # birthday tomorrow: still 64
        assert any(reference in n for n in cov.notes)
        cov = covariates_from_dataset(header(**base, **{reference: "20260519"}))
        assert cov.age_years == 65.0
    # StudyDate wins over the others; a malformed StudyDate is skipped with a note.
    cov = covariates_from_dataset(header(**base, StudyDate="20260601", AcquisitionDate="20300601"))
    assert cov.age_years == 65.0
    cov = covariates_from_dataset(raw_dataset(PatientBirthDate=("DA", b"19610519"), StudyDate=("DA", b"01.06.2026"),
                                              AcquisitionDate=("DA", b"20300601")))
    assert cov.age_years == 69.0
    assert any("StudyDate" in n and "not a DICOM date" in n for n in cov.notes)


def test_patient_age_wins_over_dates_and_bad_age_falls_back_to_dates():
    cov = covariates_from_dataset(header(PatientAge="070Y", PatientBirthDate="19610519", StudyDate="20260601"))
    assert cov.age_years == 70.0
    cov = covariates_from_dataset(raw_dataset(PatientAge=("AS", b"70 years"), PatientBirthDate=("DA", b"19610519"),
                                              StudyDate=("DA", b"20260601")))
    assert cov.age_years == 65.0
    assert any(n.startswith("PatientAge:") for n in cov.notes)


@pytest.mark.parametrize(("birth", "study", "fragment"), [
    (b"19.05.1961", b"20260601", "PatientBirthDate '19.05.1961' is not a DICOM date"),
    (b"19610519", b"", "no usable study"),
    (b"19610519", b"2026-06-01", "no usable study"),
    (b"20300101", b"20260601", "implausible"),  # born after the study
    (b"18000101", b"20260601", "implausible"),
])
def test_malformed_dates_are_missing_with_reason(birth, study, fragment):
    cov = covariates_from_dataset(raw_dataset(PatientBirthDate=("DA", birth), StudyDate=("DA", study)))
    assert cov.age_years is None
    assert any(fragment in n for n in cov.notes), cov.notes


@pytest.mark.parametrize(("text", "expected", "noted"), [
    ("M", "M", False), ("F", "F", False), ("f ", "F", False), ("O", None, False), ("", None, False),
    ("FEMALE", "F", False), ("X", None, True), ("MF", None, True), (None, None, False),
])
def test_sex(text, expected, noted):
    value, note = parse_sex(text)
    assert value == expected
    assert (note is not None) == noted


@pytest.mark.parametrize(("value", "expected", "fragment"), [
    ("72.5", 72.5, None), (72.5, 72.5, None), ("72,5", 72.5, None), ("0", None, "zero or negative"),
    ("-70", None, "zero or negative"), ("1.5", None, "implausible"), ("70000", None, "implausible"),
    ("heavy", None, "not a number"), ("nan", None, "not a number"), ("inf", None, "not a number"), ("", None, None),
])
def test_weight(value, expected, fragment):
    weight, note = parse_weight(value)
    assert weight == expected
    assert (fragment is None and note is None) or (fragment and fragment in note)


@pytest.mark.parametrize(("value", "expected", "fragment"), [
    ("1.65", 1.65, None), (1.65, 1.65, None), ("165", 1.65, "centimetres"), ("165.5", 1.655, "centimetres"),
    ("0", None, "zero or negative"), ("-1.6", None, "zero or negative"), ("16.5", None, "implausible"),
    ("1650", None, "implausible"), ("0.2", None, "implausible"), ("tall", None, "not a number"), ("", None, None),
])
def test_height(value, expected, fragment):
    height, note = parse_height(value)
    assert height == expected
    assert (fragment is None and note is None) or (fragment and fragment in note)


def test_bmi_outside_range_drops_weight_and_height():
    cov = covariates_from_values(age=60, sex="F", weight_kg=300, height_m=1.2)  # BMI 208
    assert cov.weight_kg is None and cov.height_m is None and cov.age_years == 60
    assert any("BMI" in n for n in cov.notes)
    cov = covariates_from_values(weight_kg=30, height_m=2.0)  # BMI 7.5
    assert cov.bmi is None and any("BMI" in n for n in cov.notes)
    cov = covariates_from_values(weight_kg=70, height_m=1.75)
    assert cov.bmi == pytest.approx(22.857, abs=1e-3) and cov.notes == ()


def test_full_header_and_properties():
    ds = header(PatientAge="067Y", PatientSex="F", PatientWeight="61.5", PatientSize="1.62")
    cov = covariates_from_dataset(ds)
    assert cov == Covariates(age_years=67.0, sex="F", weight_kg=61.5, height_m=1.62)
    assert cov.present == ("age", "sex", "weight", "height") and cov.missing == ()
    assert covariates_from_dataset(Dataset()).missing == ("age", "sex", "weight", "height")
    assert covariates_from_dataset(Dataset()).notes == ()
    cm = covariates_from_dataset(header(PatientSize="162"))
    assert cm.height_m == 1.62 and cm.notes == ("PatientSize: height 162 read as centimetres (1.62 m)",)


def test_bad_header_values_never_raise(tmp_path: Path):
    """Every attribute malformed at once, through a real file round trip: no exception, all missing."""
    ds = raw_dataset(
        PatientAge=("AS", b"sixty"), PatientSex=("CS", b"?? "), PatientWeight=("DS", b"x7"),
        PatientSize=("DS", b"1..6"), PatientBirthDate=("DA", b"19.05.1961"), StudyDate=("DA", b"yesterday "),
    )
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    path = tmp_path / "bad.dcm"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(path, enforce_file_format=True)
        read = pydicom.dcmread(path)
        cov = covariates_from_dataset(read)
    assert cov.present == ()
    joined = " | ".join(cov.notes)
    for fragment in ("PatientAge", "PatientSex", "PatientWeight", "PatientSize", "PatientBirthDate"):
        assert fragment in joined


def test_conversion_errors_on_access_fall_back_to_raw_text(monkeypatch):
    """With pydicom's strict reading mode a malformed DS raises on access: still no exception."""
    from pydicom import config

    monkeypatch.setattr(config.settings, "reading_validation_mode", config.RAISE)
    ds = raw_dataset(PatientWeight=("DS", b"x7"), PatientAge=("AS", b"65"), PatientSize=("DS", b"1.70"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cov = covariates_from_dataset(ds)
    assert cov.weight_kg is None and any("PatientWeight" in n for n in cov.notes)
    assert cov.age_years == 65.0 and cov.height_m == 1.70


def test_odd_python_types_never_raise():
    ds = Dataset()
    for bad in (object(), ["a", "b"], b"\xff\xfe", 3 + 4j, True):
        cov = covariates_from_values(age=bad, sex=bad, weight_kg=bad, height_m=bad)
        assert isinstance(cov, Covariates)
    assert covariates_from_dataset(ds) == Covariates()
    assert covariates_from_dataset(object()) == Covariates()


def test_values_from_a_manifest_row():
    cov = covariates_from_values(age="56", sex="F", weight_kg="68.0", height_m="1.524")
    assert cov == Covariates(age_years=56.0, sex="F", weight_kg=68.0, height_m=1.524)
    empty = covariates_from_values(age="", sex="", weight_kg="", height_m="")
    assert empty.present == () and empty.notes == ()
    dated = covariates_from_values(birth_date="19610519", reference_date="20260601")
    assert dated.age_years == 65.0


def test_out_of_range_patient_age_falls_back_to_the_birth_and_study_dates() -> None:
    """PatientAge 120Y on a 40-year-old (issue 16): the dates are the second source, used when
    PatientAge is out of the validated range; a plausible PatientAge still wins."""
    from osteogate.model.gate import with_age_fallback
    from pydicom import Dataset

    ds = Dataset()
    ds.PatientAge, ds.PatientBirthDate, ds.StudyDate = "120Y", "19840101", "20240102"
    read = covariates_from_dataset(ds)
    assert read.age_years == 120.0 and read.age_fallback == (40.0, "age from PatientBirthDate and StudyDate")
    used, note = with_age_fallback(read, {"age": [17, 107]})
    assert used.age_years == 40.0
    assert note == ("PatientAge 120 y is outside the validated range 17-107: age from PatientBirthDate and "
                    "StudyDate (40 y) used")
    ds.PatientAge = "070Y"  # in range: PatientAge wins, the dates are not consulted
    assert with_age_fallback(covariates_from_dataset(ds), {"age": [17, 107]}) == (covariates_from_dataset(ds), None)
