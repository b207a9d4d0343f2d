"""End to end: modality (storescu) -> osteogate serve -> PACS (storescp) with the SR and the result card.

The same image sent twice, once with the patient's age, sex, weight and height in the header and once
without, through a checkpoint whose card shows discrimination only for situations with age: the first
study is assessed from its covariates, the second is "not assessed" (the image alone sits at chance),
and their SRs differ in the inputs items. Then replay makes version 2 of both objects, and resend
sends both again to another PACS.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pydicom
import pytest
from osteogate.gateway.report.sr import read_result
from osteogate.gateway.store.db import Database, ResultObject, Study, StudyResult
from osteogate.model.taxonomy import CLASSES
from pydicom.uid import SecondaryCaptureImageStorage
from sqlalchemy import select

from tests.gateway_harness import GatewayProcess
from tests.helpers import StoreSCP, make_dataset, storescu, write_dataset
from tests.report_data import dciodvfy_errors, fused_checkpoint, require

SR_PATTERN, CARD_PATTERN = "SR*.dcm", "SC*.dcm"
DEMOGRAPHICS = {"PatientAge": "071Y", "PatientSex": "F", "PatientWeight": "62", "PatientSize": "1.60"}
NO_DEMOGRAPHICS = {"PatientAge": None, "PatientSex": "", "PatientWeight": None, "PatientSize": None,
                   "PatientBirthDate": ""}


@pytest.fixture(scope="module")
def fused_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fused_checkpoint(tmp_path_factory.mktemp("fused") / "fused.safetensors")


def by_study(paths: list[Path]) -> dict[str, Path]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID): p for p in paths}


def test_demographics_change_the_inputs_and_versions_travel_together(
        tmp_path: Path, fused_model: Path, dcmtk_pacs: StoreSCP) -> None:
    require("storescu", "storescp", "dsrdump", "dciodvfy")
    work = tmp_path / "in"
    # The same pixels (same seed) in two studies: only the header covariates differ.
    with_demo = make_dataset(seed=7, **DEMOGRAPHICS)
    without = make_dataset(seed=7, **NO_DEMOGRAPHICS)
    assert with_demo.PixelData == without.PixelData
    files = [write_dataset(with_demo, work / "with.dcm"), write_dataset(without, work / "without.dcm")]
    second_pacs = StoreSCP(tmp_path / "pacs2", ae_title="PACS2").start()
    try:
        with GatewayProcess(tmp_path / "gw", model=fused_model,
                            destinations=[f"PACS@127.0.0.1:{dcmtk_pacs.port}"]) as gw:
            assert storescu(files, "127.0.0.1", gw.port, "OSTEOGATE").returncode == 0
            srs = by_study(dcmtk_pacs.wait_for_files(SR_PATTERN, count=2, timeout=120))
            cards = by_study(dcmtk_pacs.wait_for_files(CARD_PATTERN, count=2, timeout=60))
            show_with = gw.cli("show", with_demo.StudyInstanceUID).stdout
            show_without = gw.cli("show", without.StudyInstanceUID).stdout
            rows = {r["study_uid"]: r for r in gw.studies()}
            # Version 2: replay makes a new SR and a new card; resend sends both to another PACS.
            gw.cli("replay", with_demo.StudyInstanceUID)
            both = dcmtk_pacs.wait_for_files(SR_PATTERN, count=3, timeout=120)
            dcmtk_pacs.wait_for_files(CARD_PATTERN, count=3, timeout=60)
            resend = gw.cli("resend", with_demo.StudyInstanceUID, "--to", f"PACS2@127.0.0.1:{second_pacs.port}")
            resent = second_pacs.wait_for_files("*.dcm", count=2, timeout=60)
    finally:
        second_pacs.stop()
    study_with, study_without = str(with_demo.StudyInstanceUID), str(without.StudyInstanceUID)

    # Both objects of both studies are valid DICOM, in the source studies.
    assert set(srs) == set(cards) == {study_with, study_without}
    for path in [*srs.values(), *cards.values()]:
        assert dciodvfy_errors(path) == []

    # With demographics: assessed from the covariates (the card's image-only figures are at chance).
    assessed = read_result(pydicom.dcmread(srs[study_with]))
    study = assessed.groups[0]
    assert study.assessed and study.label in CLASSES and sum(study.percent.values()) == 100
    assert study.inputs == {"age": "71 y", "sex": "female", "weight": "62 kg", "height": "1.6 m"}
    assert "Inputs used: age, sex, weight, height" in study.comments
    assert study.t_score is not None and study.t_interval is not None
    assert any(c.startswith("Validation (grouped cross-validation") for c in study.comments)
    assert not assessed.groups[1].assessed  # the image alone shows no discrimination
    # One decision, the estimate and its interval first; what was read; the head's own name.
    low, high = (f"{v:+.1f}".replace("+0.0", "0.0").replace("-0.0", "0.0") for v in study.t_interval)
    assert study.decision in ("DXA referral suggested", "below the referral threshold")
    assert f"{low} to {high})" in assessed.summary.split("; ")[0]  # the NUM's interval, as printed
    assert "from age, sex, weight and height in the header; the radiograph was not used" in assessed.summary
    assert assessed.algorithm.startswith("osteogate-test-covariates ")
    # Without: not assessed, never Detected, and the SR says which inputs were missing.
    declined = read_result(pydicom.dcmread(srs[study_without]))
    assert [g.assessed for g in declined.groups] == [False, False]
    assert declined.groups[0].inputs == {}
    assert any("missing: age, sex, weight, height" in c for c in declined.groups[0].comments)
    assert declined.summary.startswith("NOT ASSESSED - ")
    dump = subprocess.run(["dsrdump", "+Pl", str(srs[study_without])], capture_output=True, text=True).stdout
    assert "Detected" not in dump and "Probability" not in dump
    # The two SRs differ in the inputs items.
    assert study.inputs != declined.groups[0].inputs
    assert [c for c in study.comments if c.startswith("Inputs")] != \
        [c for c in declined.groups[0].comments if c.startswith("Inputs")]

    # show and studies say the same.
    assert "inputs used: age, sex, weight, height" in show_with and "estimated T-score" in show_with
    assert f"80 % interval {low} to {high}" in show_with and study.decision in show_with
    assert "normal" not in show_with.lower().replace("abnormal", "")
    assert "result card" in show_with
    assert "NOT ASSESSED: " in show_without and "missing: age, sex, weight, height" in show_without
    assert rows[study_without]["label"] == "not assessed" and rows[study_with]["assessed"] is True

    # SQL: probabilities keyed by class, the T-score interval, inputs, and the ordered objects.
    db = Database(f"sqlite:///{tmp_path / 'gw' / 'osteogate.db'}")
    try:
        with db.session() as session:
            results = {r.study.study_uid: r for r in session.execute(select(StudyResult).join(Study)).scalars()
                       if r.version == 1}
            first = results[study_with]
            assert set(first.probabilities) == set(CLASSES) and first.assessed is True
            assert first.t_score_low < first.t_score < first.t_score_high
            assert first.inputs_used == ["age", "sex", "weight", "height"] and first.inputs_missing == []
            assert results[study_without].assessed is False and results[study_without].probabilities is None
            assert results[study_without].inputs_missing == ["age", "sex", "weight", "height"]
            objects = session.execute(select(ResultObject).join(StudyResult).join(Study)
                                      .where(Study.study_uid == study_with)
                                      .order_by(StudyResult.version, ResultObject.position)).scalars().all()
            assert [(o.result.version, o.kind) for o in objects] == [(1, "sr"), (1, "card"), (2, "sr"), (2, "card")]
            assert objects[1].series_uid == objects[3].series_uid  # one card series across versions
            assert objects[1].sop_class_uid == SecondaryCaptureImageStorage
    finally:
        db.dispose()

    # Version 2 of the card: same series, InstanceNumber 2; the SR names its predecessor.
    cards_v2 = [pydicom.dcmread(p) for p in dcmtk_pacs.files(CARD_PATTERN)]
    versions = sorted((int(c.InstanceNumber), c.SeriesInstanceUID) for c in cards_v2
                      if c.StudyInstanceUID == study_with)
    assert [v for v, _ in versions] == [1, 2] and versions[0][1] == versions[1][1]
    sr_v2 = next(pydicom.dcmread(p) for p in both if pydicom.dcmread(p, stop_before_pixels=True).get(
        "InstanceNumber") == 2)
    assert "PredecessorDocumentsSequence" in sr_v2
    # Resend: the newest SR and its card, together, to the other PACS.
    assert sorted(str(pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber) for p in resent) == ["2", "2"]
    assert {pydicom.dcmread(p, stop_before_pixels=True).Modality for p in resent} == {"SR", "OT"}
    assert "sent" in resend.stdout
    json.dumps(rows)  # the listing stays JSON-serialisable with the new fields


def test_implausible_age_falls_back_and_show_gives_the_sr_reason(
        tmp_path: Path, fused_model: Path, dcmtk_pacs: StoreSCP) -> None:
    """PatientAge 120Y on a 40-year-old (issue 16): the age comes from the birth and study dates,
    and `show` states the same reason as the SR (the card draws the same notes)."""
    require("storescu", "storescp")
    ds = make_dataset(seed=11, PatientAge="120Y", PatientBirthDate="19840101", StudyDate="20240102",
                      PatientSex="M", PatientWeight="74", PatientSize="1.61")
    path = write_dataset(ds, tmp_path / "in" / "old.dcm")
    with GatewayProcess(tmp_path / "gw", model=fused_model,
                        destinations=[f"PACS@127.0.0.1:{dcmtk_pacs.port}"]) as gw:
        assert storescu([path], "127.0.0.1", gw.port, "OSTEOGATE").returncode == 0
        [sr_path] = dcmtk_pacs.wait_for_files(SR_PATTERN, count=1, timeout=120)
        show = gw.cli("show", ds.StudyInstanceUID).stdout
    study = read_result(pydicom.dcmread(sr_path)).groups[0]
    note = ("PatientAge 120 y is outside the validated range 17-107: age from PatientBirthDate and StudyDate "
            "(40 y) used")
    assert note in study.comments and study.inputs["age"] == "40 y"
    assert f"note: {note}" in show
