"""Issue #9: valid radiographs are always screened, whatever optional attribute is absent or malformed.

The source header is fuzzed (hypothesis: attributes deleted or given malformed raw values, written to a
file and read back as the worker reads it) and the SR and the result card must still be made and be
dciodvfy-clean. The cases the issue names (CR without ImagerPixelSpacing, empty PatientOrientation,
PatientBirthDate "19.05.1961") also go through the real worker: ingest, classify, SR and card.
"""

from __future__ import annotations

import os
import struct
import warnings
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from osteogate.gateway.core.config import load_settings
from osteogate.gateway.operate.preflight import ClassifierCache
from osteogate.gateway.receive.ingest import Ingestor
from osteogate.gateway.receive.tracker import StudyTracker
from osteogate.gateway.report.card import build_result_card
from osteogate.gateway.report.publisher import ReportPublisher
from osteogate.gateway.report.sr import build_result_sr, read_result
from osteogate.gateway.store.db import Database, Job, JobStatus, ResultObject, Study, StudyResult, StudyStatus
from osteogate.gateway.store.spool import Spool
from osteogate.gateway.work.decoding import header_only as _header_only
from osteogate.gateway.work.worker import ClassifierWorker
from osteogate.model.covariates import covariates_from_dataset
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import correct_ambiguous_vr, write_data_element, write_file_meta_info
from pydicom.tag import Tag
from sqlalchemy import select

from tests.helpers import make_dataset, write_dataset
from tests.report_data import (
    CR,
    DX,
    OTHER_P,
    assessed,
    dciodvfy_errors,
    image_result,
    knee_report,
    make_image,
    not_assessed,
    uid,
)

# Optional (Type 2 or 3) attributes a modality may leave out or fill badly.
OPTIONAL = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge", "PatientWeight", "PatientSize",
    "StudyDate", "StudyTime", "AccessionNumber", "ReferringPhysicianName", "StudyID", "StudyDescription",
    "SeriesNumber", "InstanceNumber", "ImagerPixelSpacing", "PatientOrientation", "ImageLaterality",
    "Laterality", "ViewPosition", "BodyPartExamined", "Manufacturer", "InstitutionName", "SpecificCharacterSet",
    "SeriesDate", "ContentDate", "AcquisitionDate", "Rows", "Columns",
)
MALFORMED = (
    b"", b" ", b"19.05.1961", b"abc", b"-1", b"99999999999999999", b"1e400", b"nan", b"1\\2\\3", b"\xc3\x84^\xc3\x96",
    b"x" * 70, b"0Y", b"065", b"25:61:99", b"\\", b"^^^^^^", b"2024-01-02", b"\x00\x01", b"B", b"U", b"ISO_IR 999",
)


def _encode(base: Dataset, changes: dict[str, bytes | None]) -> bytes:
    """The file bytes of ``base`` with attributes deleted (None) or replaced by raw bytes.

    Written element by element: pydicom's writer converts every value (and rightly refuses, say, a
    charset with a NUL in it), but a modality's bytes reach us unconverted."""
    raw = {Tag(tag_for_keyword(k)): v for k, v in changes.items()}
    base = correct_ambiguous_vr(base.copy(), True)  # PixelData: OB or OW, decided by BitsAllocated
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    fp.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(fp, base.file_meta)
    for tag in sorted(set(base.keys()) | set(raw)):
        if tag not in raw:
            write_data_element(fp, base[tag])
            continue
        value = raw[tag]
        if value is None:
            continue
        if tag == 0x00080005:
            value = value.replace(b"\x00", b"")  # a NUL charset makes the file unreadable: refused at ingest
        vr = dictionary_VR(tag)
        if vr == "US":
            value = (value + b"\x00\x00")[:2]  # any two bytes: zero rows, 65535 columns...
        elif len(value) % 2:
            value += b" "
        fp.write(struct.pack("<HH2sH", tag.group, tag.elem, vr.encode(), len(value)) + value)
    return fp.getvalue()


def fuzzed(base: Dataset, changes: dict[str, bytes | None]) -> Dataset:
    """``base`` with the changes, read back as the worker reads it (header only)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _header_only(pydicom.dcmread(BytesIO(_encode(base, changes))))


changes_strategy = st.dictionaries(
    st.sampled_from(OPTIONAL), st.one_of(st.none(), st.sampled_from(MALFORMED)), min_size=1, max_size=12,
)


def _make_both(source: Dataset, tmp_path: Path, name: str) -> tuple[Path, Path]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        covariates = covariates_from_dataset(source)  # the model's parser: never raises on a bad header
        results = (image_result(assessed("normal", OTHER_P, ("image",))),)
        report = knee_report(sources=(source,), images=results, covariates=covariates)
        sr = build_result_sr(report, series_instance_uid=uid("fz-s"), sop_instance_uid=uid(f"fz-{name}"),
                             instance_number=1)
        card = build_result_card(report, series_instance_uid=uid("fz-c"), sop_instance_uid=uid(f"fzc-{name}"),
                                 instance_number=1)
    sr_path, card_path = tmp_path / f"{name}-sr.dcm", tmp_path / f"{name}-card.dcm"
    sr.save_as(sr_path, enforce_file_format=True)
    card.save_as(card_path, enforce_file_format=True)
    return sr_path, card_path


# A fixed sample in `make test`; OSTEOGATE_FUZZ_EXAMPLES=500 explores new cases (random seed).
FUZZ_EXAMPLES = int(os.environ.get("OSTEOGATE_FUZZ_EXAMPLES", "0"))


@settings(max_examples=FUZZ_EXAMPLES or 40, deadline=None, derandomize=not FUZZ_EXAMPLES,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=changes_strategy, cr=st.booleans())
def test_fuzzed_source_header_still_gives_valid_sr_and_card(tmp_path: Path, changes: dict[str, bytes | None],
                                                            cr: bool) -> None:
    base = make_image(CR if cr else DX, "study-a", "series", "fuzz", "KNEE", "R")
    source = fuzzed(base, changes)
    sr_path, card_path = _make_both(source, tmp_path, "case")
    errors = dciodvfy_errors(sr_path) + dciodvfy_errors(card_path)
    assert errors == [], f"{changes}: {errors}"
    reading = read_result(pydicom.dcmread(sr_path))
    assert reading.groups[0].assessed and reading.groups[1].identifier.startswith("image 1")


@pytest.mark.parametrize(
    "changes",
    [
        {"ImagerPixelSpacing": None},
        {"PatientOrientation": b""},
        {"PatientBirthDate": b"19.05.1961"},
        {"PatientSex": b"X", "PatientAge": b"65 years", "PatientSize": b"165", "PatientWeight": b"-3"},
        {"ImageLaterality": b"\\", "Laterality": b"RL", "InstanceNumber": b"one"},
        {"StudyDate": b"2024-01-02", "StudyTime": b"25:61:99", "PatientName": b"x" * 70},
    ],
    ids=["cr-no-pixel-spacing", "empty-orientation", "dotted-birth-date", "bad-covariates", "bad-laterality",
         "bad-dates-long-name"],
)
def test_named_cases(tmp_path: Path, changes: dict[str, bytes | None]) -> None:
    source = fuzzed(make_image(CR, "study-a", "series", "named", "KNEE", "L"), changes)
    for path in _make_both(source, tmp_path, "named"):
        assert dciodvfy_errors(path) == []


@pytest.mark.parametrize(
    "overrides",
    [
        {"ImagerPixelSpacing": None, "PatientOrientation": ""},
        {"PatientBirthDate": "19.05.1961", "PatientAge": None},
    ],
    ids=["cr-without-spacing-empty-orientation", "dotted-birth-date"],
)
def test_worker_screens_valid_cr(tmp_path: Path, tiny_model: Path, overrides: dict[str, object]) -> None:
    """Through the real worker: the study is done, with an SR and a result card, never failed."""
    db = Database(f"sqlite:///{tmp_path / 'gw.db'}")
    db.migrate()
    spool, reports = Spool(tmp_path / "spool"), Spool(tmp_path / "reports")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = make_dataset(modality="CR", **overrides)
        data = write_dataset(ds, tmp_path / "in.dcm").read_bytes()
    Ingestor(db, spool).store(data, calling_ae="TEST")
    StudyTracker(db, 0).queue_stable_studies()
    settings_ = load_settings(environ={}, overrides={"storage": {"data_dir": str(tmp_path), "min_free_mb": 0},
                                                     "model": {"path": str(tiny_model)}})
    worker = ClassifierWorker(settings_, db, spool, ReportPublisher(settings_, reports), ClassifierCache(settings_))
    assert worker.run_once()
    with db.session() as session:
        study = session.execute(select(Study)).scalar_one()
        job = session.execute(select(Job)).scalar_one()
        assert (study.status, job.status) == (StudyStatus.DONE, JobStatus.DONE), job.error
        kinds = session.execute(select(ResultObject.kind).join(StudyResult).order_by(ResultObject.position)).scalars()
        assert list(kinds) == ["sr", "card"]
        paths = [reports.absolute(p) for p in session.execute(select(ResultObject.path)).scalars()]
    for path in paths:
        assert dciodvfy_errors(path) == []
    db.dispose()


def test_not_assessed_with_fuzzed_header(tmp_path: Path) -> None:
    source = fuzzed(make_image(DX, "study-a", "s", "na", "KNEE"), {"PatientAge": b"abc", "Rows": None})
    report = knee_report(sources=(source,), images=(image_result(not_assessed()),), study=not_assessed())
    sr = build_result_sr(report, series_instance_uid=uid("x"), sop_instance_uid=uid("y"), instance_number=1)
    sr.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    assert dciodvfy_errors(tmp_path / "sr.dcm") == []
