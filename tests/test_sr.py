"""Result SR (gateway/report/sr.py): built from hand-made DX/CR headers and StudyAssessment objects, checked by
dciodvfy (dicom3tools), dsrdump and dsr2html (dcmtk) and read back through highdicom."""

from __future__ import annotations

import datetime
import html
import re
import subprocess
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from osteogate.gateway.report import wording as reporting
from osteogate.gateway.report.sr import (
    DISCLAIMER,
    PRIVATE_SCHEME,
    SERIES_DESCRIPTION,
    SkippedImage,
    StudyReport,
    build_result_sr,
    read_result,
    sr_summary,
)
from osteogate.model.assessment import Assessment, StudyAssessment
from osteogate.model.covariates import Covariates
from pydicom.dataset import Dataset

from tests.report_data import (
    ALGORITHM,
    ALL_INPUTS,
    COVARIATES,
    CR,
    DX,
    KNEE_P,
    NO_COVARIATES,
    OTHER_P,
    STUDY_P,
    UNDISCRIMINATING,
    assessed,
    dciodvfy_errors,
    image_result,
    knee_report,
    make_image,
    not_assessed,
    require,
    uid,
)

WHEN = datetime.datetime(2024, 1, 2, 11, 0, 0)


def build(report: StudyReport | None = None, **kwargs: object) -> hd.sr.Comprehensive3DSR:
    args: dict[str, object] = {
        "series_instance_uid": uid("sr-series"),
        "sop_instance_uid": uid("sr-1"),
        "instance_number": 1,
        "device_observer_uid": uid("device"),
        "institution_name": "Test Hospital",
        "content_datetime": WHEN,
    }
    args.update(kwargs)
    return build_result_sr(report or knee_report(), **args)  # type: ignore[arg-type]


def with_chest() -> StudyReport:
    chest = make_image(DX, "study-a", "series-dx", "chest", "CHEST")
    return knee_report(skipped=(SkippedImage(chest, "out of scope: CHEST"),))


def save(sr: Dataset, path: Path) -> Path:
    sr.save_as(path, enforce_file_format=True)
    return path


def dsrdump(path: Path) -> str:
    require("dsrdump")
    result = subprocess.run(["dsrdump", "+Pl", "+Pc", str(path)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout


def dsr2html_text(path: Path) -> str:
    require("dsr2html")
    result = subprocess.run(["dsr2html", str(path)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return html.unescape(re.sub(r"<[^>]+>", " ", result.stdout))


# -- validity ------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["assessed", "not assessed", "no covariates", "cr minimal"])
def test_sr_passes_dciodvfy(tmp_path: Path, case: str) -> None:
    if case == "assessed":
        report = with_chest()
    elif case == "not assessed":
        report = knee_report(study=not_assessed(), images=(image_result(not_assessed()),) * 2)
    elif case == "no covariates":
        report = knee_report(study=assessed("normal", OTHER_P, ("image",)), covariates=NO_COVARIATES)
    else:
        # CR without ImagerPixelSpacing / PatientOrientation / Type 2 attributes (issue #9).
        source = make_image(CR, "study-a", "series-cr", "bare", "KNEE", minimal=True)
        report = knee_report(sources=(source,), images=(image_result(not_assessed()),))
    assert dciodvfy_errors(save(build(report), tmp_path / "sr.dcm")) == []


def test_minimal_headers_still_valid(tmp_path: Path) -> None:
    """Sources lacking Type 2 attributes and Rows/Columns: no image library entry, still referenced."""
    source = make_image(DX, "study-a", "series-dx", "bare", "KNEE", minimal=True)
    sr = build(knee_report(sources=(source,)))
    assert "AccessionNumber" not in source  # the caller's header is not modified
    assert dciodvfy_errors(save(sr, tmp_path / "sr.dcm")) == []
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == uid("bare")


# -- what a reader sees ---------------------------------------------------------------------------


def test_dsrdump_reads_well(tmp_path: Path) -> None:
    dump = dsrdump(save(build(with_chest()), tmp_path / "sr.dcm"))
    assert "Comprehensive 3D SR Document" in dump
    assert "Completion Flag     : COMPLETE" in dump
    assert "Verification Flag   : UNVERIFIED" in dump
    assert SERIES_DESCRIPTION in dump
    # The plain-language summary comes before the image library and the measurements.
    summary = dump.index('"Summary")="DXA REFERRAL SUGGESTED - estimated T-score -1.8 (80 % interval -2.6 to -1.0), '
                         'osteopenia range.')
    assert summary < dump.index('"Image Library"') < dump.index('"Imaging Measurements"')
    # Whole percentages that add up to 100, never long decimals.
    assert '"Probability")="77" (%,UCUM,"%")' in dump
    assert not re.search(r'="\d+\.\d{3,}"', dump), "unrounded numbers in the SR"
    assert '"Associated finding")=(312894000,SCT,"Osteopenia")' in dump
    # The WHO category of the estimate and the decision, each its own coded item; never "Detected".
    assert '"WHO category of the estimated T-score")=(OSTEOPENIA-RANGE,99OSTEOGATE,' in dump
    assert '(111053,DCM,"Recommended Follow-up")=(DXA-REFERRAL,99OSTEOGATE,"DXA referral suggested")' in dump
    assert "Detected" not in dump
    assert '(72696002,SCT,"Knee")' in dump
    assert '(24028007,SCT,"Right")' in dump and '(7771000,SCT,"Left")' in dump
    assert '(51440002,SCT,"Right and left")' in dump  # the study: both knees
    # Inputs with standard codes and UCUM units.
    assert '(121033,DCM,"Subject Age")="67.4" (a,UCUM,"year")' in dump
    assert '(121032,DCM,"Subject Sex")=(F,DCM,"Female")' in dump
    assert '(29463-7,LN,"Body weight")="58" (kg,UCUM,"kg")' in dump
    assert '(8302-2,LN,"Body height")="1.62" (m,UCUM,"m")' in dump
    # The estimated T-score with its 80 % prediction interval.
    assert f'(T-SCORE-EST,{PRIVATE_SCHEME},"Estimated T-score")="-1.8"' in dump
    assert '"+, range of upper measurement uncertainty")="0.8"' in dump
    assert '"-, range of lower measurement uncertainty")="0.8"' in dump
    assert "80 % interval -2.6 to -1.0" in dump
    assert DISCLAIMER in dump and "not cleared for clinical use" in dump.lower()
    assert "Image not classified: out of scope: CHEST" in dump
    assert ALGORITHM.checkpoint_sha256 in dump


def test_dsr2html_shows_results_without_footnotes(tmp_path: Path) -> None:
    text = dsr2html_text(save(build(with_chest()), tmp_path / "sr.dcm"))
    assert "PRELIMINARY" in text
    # The decision and the estimate come first (right after the document header).
    first = text.index("DXA REFERRAL SUGGESTED - estimated T-score -1.8 (80 % interval -2.6 to -1.0), osteopenia range")
    assert first < text.index("Image Library") and first < text.index("Measurement Group")
    assert "Result: DXA referral suggested; estimated T-score -1.8 (80 % interval -2.6 to -1.0), osteopenia range; " \
           "T >= -1.0 10 %, osteopenia range 77 %, osteoporosis range 13 %" in text
    assert "Result: DXA referral suggested; osteoporosis range; T >= -1.0 13 %, osteopenia range 25 %, " \
           "osteoporosis range 62 %" in text
    assert f"Not assessed: {UNDISCRIMINATING}" in text
    # Long decimals other than UIDs (dotted digit runs) would be unrounded numbers.
    assert not re.search(r"(?<![\d.])\d+\.\d{3,}(?![\d.])", text), "unrounded numbers"


def test_header_dates_and_flags(tmp_path: Path) -> None:
    sr = pydicom.dcmread(save(build(), tmp_path / "sr.dcm"))
    assert (sr.SeriesDate, sr.SeriesTime) == ("20240102", "110000")
    assert (sr.ContentDate, sr.ContentTime) == ("20240102", "110000")
    assert sr.PreliminaryFlag == "PRELIMINARY"
    assert sr.CompletionFlag == "COMPLETE" and sr.VerificationFlag == "UNVERIFIED"
    assert sr.SeriesNumber == 9901 and sr.InstitutionName == "Test Hospital"
    assert [item.CodingSchemeDesignator for item in sr.CodingSchemeIdentificationSequence] == [PRIVATE_SCHEME]


def test_not_assessed_never_claims(tmp_path: Path) -> None:
    report = knee_report(study=not_assessed(), images=(image_result(not_assessed()),) * 2, covariates=NO_COVARIATES)
    path = save(build(report), tmp_path / "sr.dcm")
    dump = dsrdump(path)
    assert "Detected" not in dump and "Not detected" not in dump and "Recommended Follow-up" not in dump
    assert "Probability" not in dump and "T-score" not in dump
    assert f"Not assessed: {UNDISCRIMINATING}" in dump
    assert '"Summary")="NOT ASSESSED - ' in dump
    assert "missing: age, sex, weight, height" in dump
    reading = read_result(pydicom.dcmread(path))
    assert [g.assessed for g in reading.groups] == [False, False, False]
    assert all(g.label is None and not g.percent for g in reading.groups)


def test_inputs_differ_with_and_without_demographics(tmp_path: Path) -> None:
    """Same images, with and without header covariates: the SRs differ in the inputs items."""
    with_covariates = knee_report()
    without = knee_report(study=assessed("normal", OTHER_P, ("image",)), covariates=NO_COVARIATES)
    first = read_result(pydicom.dcmread(save(build(with_covariates), tmp_path / "a.dcm")))
    second = read_result(pydicom.dcmread(save(build(without), tmp_path / "b.dcm")))
    assert first.groups[0].inputs == {"age": "67.4 y", "weight": "58 kg", "height": "1.62 m", "sex": "female"}
    assert second.groups[0].inputs == {}
    assert "Inputs used: image, age, sex, weight, height" in first.groups[0].comments
    assert "Inputs used: image; missing: age, sex, weight, height" in second.groups[0].comments
    assert "PatientAge, PatientBirthDate absent" in second.groups[0].comments  # the covariates' note
    assert "Inputs used: image; missing: age, sex, weight, height." in second.summary


def test_covariate_items_only_for_inputs_used(tmp_path: Path) -> None:
    """A result that used age and sex only records those two values, and says the rest is missing."""
    report = knee_report(study=assessed("osteopenia", STUDY_P, ("image", "age", "sex")))
    reading = read_result(pydicom.dcmread(save(build(report), tmp_path / "sr.dcm")))
    assert reading.groups[0].inputs == {"age": "67.4 y", "sex": "female"}
    assert "Inputs used: image, age, sex; missing: weight, height" in reading.groups[0].comments


def test_highdicom_round_trip(tmp_path: Path) -> None:
    report = with_chest()
    sr = hd.sr.srread(save(build(report), tmp_path / "sr.dcm"))
    knee_r, knee_l = report.sources
    assert isinstance(sr, hd.sr.Comprehensive3DSR)
    assert sr.StudyInstanceUID == knee_r.StudyInstanceUID
    assert sr.PatientID == knee_r.PatientID and sr.AccessionNumber == knee_r.AccessionNumber
    assert sr.SeriesDescription == SERIES_DESCRIPTION and sr.Manufacturer == "OsteoGate"
    assert "PredecessorDocumentsSequence" not in sr

    measurement_report = hd.sr.MeasurementReport.from_sequence(sr.content)
    groups = measurement_report.get_image_measurement_groups()
    assert [g.tracking_identifier for g in groups] == ["study result", "image 1 (knee, right)", "image 2 (knee, left)"]
    assert groups[0].source_images == []  # study level: applies to all images
    assert [g.source_images[0].referenced_sop_instance_uid for g in groups[1:]] == [
        knee_r.SOPInstanceUID, knee_l.SOPInstanceUID]
    evaluations = {e.name.meaning: e.value.meaning for e in groups[1].get_qualitative_evaluations()}
    assert evaluations == {"WHO category of the estimated T-score": "Osteoporosis range (T-score -2.5 or below)",
                           "Recommended Follow-up": "DXA referral suggested"}
    assert groups[2].get_qualitative_evaluations() == []  # not assessed: no evaluation at all
    [observer] = measurement_report.get_observer_contexts()
    assert observer.observer_identifying_attributes.uid == uid("device")

    reading = read_result(pydicom.dcmread(tmp_path / "sr.dcm"))
    assert reading.groups[0].percent == {"normal": 10.0, "osteopenia": 77.0, "osteoporosis": 13.0}
    # The NUM's uncertainty range reproduces the printed interval exactly (one rounding).
    assert reading.groups[0].t_score == -1.8 and reading.groups[0].t_interval == report.assessment.study.t_score_interval
    assert reading.groups[0].label == "osteopenia" and reading.groups[0].decision == "DXA referral suggested"
    assert reading.groups[1].label == "osteoporosis" and reading.groups[2].label is None


def test_stable_image_numbering(tmp_path: Path) -> None:
    """Images are numbered by InstanceNumber, then SOPInstanceUID, whatever order they came in."""
    a = make_image(DX, "study-a", "s", "a", "KNEE", "R", number=3)
    b = make_image(DX, "study-a", "s", "b", "KNEE", "L", number=1)
    c = make_image(DX, "study-a", "s", "c", "KNEE", number=3)
    d = make_image(DX, "study-a", "s", "d", "KNEE")
    del d.InstanceNumber
    sources = (a, b, c, d)
    probabilities = {"osteoporosis": KNEE_P, "normal": OTHER_P, "osteopenia": STUDY_P}
    results = tuple(image_result(assessed(label, probabilities[label], ("image",)))
                    for label in ("osteoporosis", "normal", "osteopenia", "osteoporosis"))
    report = knee_report(sources=sources, images=results)
    reading = read_result(pydicom.dcmread(save(build(report), tmp_path / "sr.dcm")))
    numbered = [g.identifier for g in reading.groups[1:]]
    third = "a" if str(a.SOPInstanceUID) < str(c.SOPInstanceUID) else "c"
    assert numbered[0] == "image 1 (knee, left)"  # b: InstanceNumber 1
    assert reading.groups[1].label == "normal"
    assert numbered[3] == "image 4 (knee)"  # d: no InstanceNumber, last
    assert (reading.groups[2].label == "osteoporosis") == (third == "a")
    # The same input in another order gives the same SR content.
    again = knee_report(sources=tuple(reversed(sources)), images=tuple(reversed(results)))
    assert [g.identifier for g in read_result(pydicom.dcmread(save(build(again), tmp_path / "b.dcm"))).groups] == \
        [g.identifier for g in reading.groups]


@pytest.mark.parametrize(
    ("attributes", "expected"),
    [
        ({"ImageLaterality": "B"}, "Right and left"),
        ({"Laterality": "L"}, "Left"),
        ({"ImageLaterality": "R", "Laterality": "L"}, "Right"),  # the image's own side wins
        ({"ImageLaterality": "U"}, None),
        ({"ViewPosition": "LL"}, None),  # a projection, not a side: never guessed
        ({}, None),
    ],
)
def test_laterality_never_guessed(tmp_path: Path, attributes: dict[str, str], expected: str | None) -> None:
    source = make_image(DX, "study-a", "s", "x", "KNEE")
    for keyword, value in attributes.items():
        setattr(source, keyword, value)
    report = knee_report(sources=(source,), images=(image_result(assessed("normal", OTHER_P, ("image",))),))
    reading = read_result(pydicom.dcmread(save(build(report), tmp_path / "sr.dcm")))
    for group in reading.groups:
        assert group.sites == ("Knee " + expected if expected else "Knee")


def test_spine_segment_and_mixed_sides(tmp_path: Path) -> None:
    spine = make_image(CR, "study-a", "s", "spine", "LSPINE")
    report = StudyReport(
        StudyAssessment("spine", assessed("normal", OTHER_P, ("age", "sex")),
                        (image_result(not_assessed("the spine image head is untrained on real data"),
                                      region="spine"),), COVARIATES),
        (spine,), ALGORITHM)
    path = save(build(report), tmp_path / "sr.dcm")
    dump = dsrdump(path)
    assert '(122496007,SCT,"Lumbar spine")' in dump
    assert "the spine image head is untrained on real data" in dump
    assert dciodvfy_errors(path) == []


def test_predecessor_referenced(tmp_path: Path) -> None:
    first = build()
    second = build(sop_instance_uid=uid("sr-2"), instance_number=2, predecessor=first)
    reread = pydicom.dcmread(save(second, tmp_path / "sr2.dcm"))
    [study] = reread.PredecessorDocumentsSequence
    [series] = study.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == first.SeriesInstanceUID
    assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == first.SOPInstanceUID
    assert reread.InstanceNumber == 2


def test_findings_from_two_studies_rejected() -> None:
    other = make_image(CR, "study-b", "series-b", "other", "KNEE")
    with pytest.raises(ValueError, match="studies"):
        build(knee_report(sources=(knee_report().sources[0], other)))
    with pytest.raises(ValueError, match="studies"):
        build(knee_report(skipped=(SkippedImage(other, "out of scope"),)))
    with pytest.raises(ValueError, match="studies"):
        build(predecessor=build(knee_report(sources=(other,), images=(image_result(not_assessed()),))))


def test_invalid_inputs_rejected() -> None:
    with pytest.raises(ValueError, match="image result"):
        build(StudyReport(StudyAssessment("knee", not_assessed(), (), COVARIATES), (), ALGORITHM))
    with pytest.raises(ValueError, match="keys"):
        build(knee_report(study=Assessment(True, label="normal", probabilities={"normal": 1.0})))
    with pytest.raises(ValueError, match="label"):
        build(knee_report(study=Assessment(True, label="fracture", probabilities=KNEE_P)))
    with pytest.raises(ValueError, match="aligned|source headers"):
        StudyReport(StudyAssessment("knee", not_assessed(), (image_result(not_assessed()),), COVARIATES), (), ALGORITHM)


def test_summary_text(tmp_path: Path) -> None:
    text = sr_summary(pydicom.dcmread(save(build(with_chest()), tmp_path / "sr.dcm")))
    print(text)
    lines = text.splitlines()
    assert "PRELIMINARY" in lines[1]
    assert lines[2].startswith("Summary: DXA REFERRAL SUGGESTED - estimated T-score -1.8 (80 % interval -2.6 to -1.0), "
                               "osteopenia range.")
    assert any("OsteoGate fused knee model" in line and ALGORITHM.checkpoint_sha256 in line for line in lines)
    [study] = [line for line in lines if line.startswith("study result")]
    assert "Knee Right and left" in study
    assert ": DXA referral suggested; osteopenia range (T >= -1.0 10 %, osteopenia range 77 %, " \
           "osteoporosis range 13 %)" in study
    assert "T-score -1.8 (80 % interval -2.6 to -1.0)" in study and "age 67.4 y" in study
    [image_2] = [line for line in lines if line.startswith("image 2 (knee, left)")]
    assert f"not assessed: {UNDISCRIMINATING}" in image_2
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


# -- wording (pure) ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("probabilities", "expected"),
    [
        ({"normal": 1 / 3, "osteopenia": 1 / 3, "osteoporosis": 1 / 3}, {"normal": 34, "osteopenia": 33,
                                                                        "osteoporosis": 33}),
        (STUDY_P, {"normal": 20, "osteopenia": 72, "osteoporosis": 8}),
        ({"normal": 0.995, "osteopenia": 0.004, "osteoporosis": 0.001}, {"normal": 100, "osteopenia": 0,
                                                                         "osteoporosis": 0}),
        ({"normal": 0.0, "osteopenia": 0.0, "osteoporosis": 0.0}, {"normal": 0, "osteopenia": 0, "osteoporosis": 0}),
    ],
)
def test_percentages_add_up(probabilities: dict[str, float], expected: dict[str, int]) -> None:
    rounded = reporting.percentages(probabilities)
    assert rounded == expected
    assert sum(rounded.values()) in (0, 100)
    for name, value in rounded.items():
        assert abs(value - 100 * probabilities[name]) < 1 or sum(probabilities.values()) == 0


def test_headlines_never_reassure() -> None:
    below = reporting.headline(assessed("normal", OTHER_P))
    assert below.startswith("BELOW REFERRAL THRESHOLD - ") and "cannot rule out low bone density" in below
    assert "normal" not in below.lower()
    assert reporting.headline(assessed("osteoporosis", KNEE_P)).startswith("DXA REFERRAL SUGGESTED - ")
    assert reporting.headline(not_assessed()) == f"NOT ASSESSED - {UNDISCRIMINATING}"
    summary = reporting.summary_text(StudyAssessment("knee", not_assessed("x"), (), Covariates()))
    assert summary.startswith("NOT ASSESSED - x.") and "not a diagnosis" in summary
    assert reporting.inputs_phrase(assessed("normal", OTHER_P, ALL_INPUTS)) == \
        "Inputs used: image, age, sex, weight, height"
