"""Ingest on its own (real SQLite file, real spool): what is stored, what is a duplicate, what is
refused and with which status, and what is acknowledged without being stored."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from osteogate.gateway.receive.ingest import Ingestor
from osteogate.gateway.receive.tracker import StudyTracker
from osteogate.gateway.receive.validation import (
    CANNOT_UNDERSTAND,
    OUT_OF_RESOURCES,
    UID_CONFLICT,
    RejectedInstance,
    inflated_size,
)
from osteogate.gateway.store.db import Database, Instance, Study, StudyResult, StudyStatus
from osteogate.gateway.store.spool import Spool
from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from sqlalchemy import select

from tests.helpers import make_dataset


def encode(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.fixture
def ingestor(tmp_path: Path) -> Ingestor:
    db = Database(f"sqlite:///{tmp_path / 'test.db'}")
    db.create_schema()
    return Ingestor(db, Spool(tmp_path / "spool"), max_instance_bytes=2 * 2**20)


def rows(ingestor: Ingestor) -> list[tuple[str, int, StudyStatus, int]]:
    with ingestor.db.session() as session:
        return [(s.study_uid, s.version, s.status, s.instance_count) for s in session.execute(select(Study)).scalars()]


def in_syntax(ds: Dataset, syntax: str) -> bytes:
    """The same instance encoded in another transfer syntax (what a router may do)."""
    again = pydicom.dcmread(io.BytesIO(encode(ds)))
    if syntax == RLELossless:
        again.compress(RLELossless, generate_instance_uid=False)
        return encode(again)
    again.file_meta.TransferSyntaxUID = syntax
    if syntax == ExplicitVRBigEndian:
        # OW values are written as they are: swap the 16-bit pixels for big endian.
        again.PixelData = np.frombuffer(again.PixelData, "<u2").byteswap().tobytes()
        body = pydicom.filebase.DicomBytesIO()
        body.is_little_endian, body.is_implicit_VR = False, False
        pydicom.filewriter.write_dataset(body, again)
        out = io.BytesIO()
        out.write(b"\0" * 128 + b"DICM")
        pydicom.filewriter.write_file_meta_info(out, again.file_meta, enforce_standard=True)
        return out.getvalue() + body.getvalue()
    return encode(again)


# -- integrity ---------------------------------------------------------------------------------------------


def test_uid_already_held_by_another_study_or_patient_is_refused(ingestor: Ingestor) -> None:
    original = make_dataset(PatientID="PAT-A")
    ingestor.store(encode(original))
    stored_path = ingestor.spool.root / original.StudyInstanceUID
    before = sorted(p.read_bytes() for p in stored_path.rglob("*.dcm"))

    other_study = make_dataset(sop_uid=original.SOPInstanceUID, PatientID="PAT-B")
    with pytest.raises(RejectedInstance) as info:
        ingestor.store(encode(other_study))
    assert info.value.status == UID_CONFLICT and "another study" in info.value.reason

    other_patient = make_dataset(study_uid=original.StudyInstanceUID, series_uid=original.SeriesInstanceUID,
                                 sop_uid=original.SOPInstanceUID, PatientID="PAT-B", seed=7)
    with pytest.raises(RejectedInstance) as info:
        ingestor.store(encode(other_patient))
    assert info.value.status == UID_CONFLICT and "another patient" in info.value.reason

    # The first owner keeps its row and its file; nothing of the others was stored.
    assert rows(ingestor) == [(original.StudyInstanceUID, 1, StudyStatus.RECEIVING, 1)]
    assert sorted(p.read_bytes() for p in stored_path.rglob("*.dcm")) == before
    assert not (ingestor.spool.root / other_study.StudyInstanceUID).exists()
    assert (0xC000 <= UID_CONFLICT <= 0xCFFF)  # the permanent "cannot understand" family


@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, ExplicitVRBigEndian, RLELossless,
                                    DeflatedExplicitVRLittleEndian])
def test_same_instance_in_another_transfer_syntax_is_a_duplicate(ingestor: Ingestor, syntax: str) -> None:
    study_uid = generate_uid()
    original = make_dataset(study_uid=study_uid)
    ingestor.store(encode(original))
    assert StudyTracker(ingestor.db, stable_seconds=0).queue_stable_studies() == 1  # processed, say

    stored = ingestor.store(in_syntax(original, syntax))
    assert stored.duplicate and stored.outcome == "duplicate"
    assert "transfer syntax" in (stored.note or "")
    # No new version, no reopened study: no second SR.
    assert rows(ingestor) == [(study_uid, 1, StudyStatus.QUEUED, 1)]


def test_same_uids_with_other_pixels_replace_and_reopen(ingestor: Ingestor) -> None:
    original = make_dataset(seed=1)
    ingestor.store(encode(original))
    StudyTracker(ingestor.db, stable_seconds=0).queue_stable_studies()
    changed = make_dataset(study_uid=original.StudyInstanceUID, series_uid=original.SeriesInstanceUID,
                           sop_uid=original.SOPInstanceUID, seed=2)
    stored = ingestor.store(encode(changed))
    assert not stored.duplicate and stored.outcome == "stored"
    assert rows(ingestor) == [(original.StudyInstanceUID, 2, StudyStatus.RECEIVING, 1)]


# -- scope -----------------------------------------------------------------------------------------------


def _sr_like(study_uid: str, **attrs: object) -> Dataset:
    ds = make_dataset(study_uid=study_uid, modality="SR", SOPClassUID="1.2.840.10008.5.1.4.1.1.88.34")
    del ds.PixelData
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    return ds


def test_other_storage_classes_and_own_results_are_acknowledged_not_stored(ingestor: Ingestor) -> None:
    study_uid = generate_uid()
    ingestor.store(encode(make_dataset(study_uid=study_uid)))
    StudyTracker(ingestor.db, stable_seconds=0).queue_stable_studies()

    foreign_sr = ingestor.store(encode(_sr_like(study_uid, Manufacturer="Some PACS")))
    assert foreign_sr.outcome == "out_of_scope" and not foreign_sr.stored
    assert "Comprehensive 3D SR" in (foreign_sr.note or "")
    ct = make_dataset(study_uid=study_uid, modality="CT", SOPClassUID="1.2.840.10008.5.1.4.1.1.2")
    assert ingestor.store(encode(ct)).outcome == "out_of_scope"

    # Our own result card: a Secondary Capture (a class we do store) made by OsteoGate.
    card = make_dataset(study_uid=study_uid, SOPClassUID=str(SecondaryCaptureImageStorage), Modality="OT",
                        Manufacturer="OsteoGate")
    assert ingestor.store(encode(card)).outcome == "own_result"

    # Our SR, recognised by the UIDs recorded in study_results even without the manufacturer.
    with ingestor.db.session() as session:
        study = session.execute(select(Study)).scalar_one()
        ours = _sr_like(study_uid, Manufacturer="")
        session.add(StudyResult(study_id=study.id, job_id=study.jobs[0].id, version=1, status=StudyStatus.DONE,
                                model_name="m", model_version="1", model_sha256="0" * 64, backend="onnx",
                                sr_sop_instance_uid=ours.SOPInstanceUID, sr_series_uid=ours.SeriesInstanceUID))
    assert ingestor.store(encode(ours)).outcome == "own_result"

    assert rows(ingestor) == [(study_uid, 1, StudyStatus.QUEUED, 1)]
    with ingestor.db.session() as session:
        assert session.query(Instance).count() == 1
    assert len(list(ingestor.spool.root.rglob("*.dcm"))) == 1


# -- pixel data checks ----------------------------------------------------------------------------------


def test_uncompressed_ybr_full_422_secondary_capture_is_accepted(ingestor: Ingestor) -> None:
    """Two samples per pixel on the wire (Y Y Cb Cr per pair), not three: a valid SC."""
    rows_, cols = 32, 48
    ds = make_dataset(SOPClassUID=str(SecondaryCaptureImageStorage), Modality="OT")
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.PlanarConfiguration = 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.Rows, ds.Columns = rows_, cols
    for keyword in ("WindowCenter", "WindowWidth", "RescaleIntercept", "RescaleSlope", "RescaleType"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.PixelData = np.random.default_rng(0).integers(0, 255, rows_ * cols * 2, dtype=np.uint8).tobytes()
    assert ingestor.store(encode(ds)).outcome == "stored"
    short = make_dataset(SOPClassUID=str(SecondaryCaptureImageStorage), Modality="OT")
    short.PixelData = short.PixelData[:-1000]
    with pytest.raises(RejectedInstance):
        ingestor.store(encode(short))


# -- hostile encodings ---------------------------------------------------------------------------------------


def nested_sequences(depth: int) -> bytes:
    """A valid instance with an undefined-length sequence nested ``depth`` levels deep."""
    data = encode(make_dataset())
    sq = struct.pack("<HH", 0x0040, 0xA730) + b"SQ\x00\x00\xff\xff\xff\xff"
    item = struct.pack("<HH", 0xFFFE, 0xE000) + b"\xff\xff\xff\xff"
    ends = struct.pack("<HH", 0xFFFE, 0xE00D) + b"\0\0\0\0" + struct.pack("<HH", 0xFFFE, 0xE0DD) + b"\0\0\0\0"
    pos = data.find(b"\xe0\x7f\x10\x00")  # before Pixel Data: tags stay in ascending order
    return data[:pos] + (sq + item) * depth + ends * depth + data[pos:]


def deflated(ds: Dataset, extra_zeros: int = 0) -> bytes:
    """``ds`` deflated, with ``extra_zeros`` bytes of zero pixels appended to its Pixel Data."""
    body = io.BytesIO()
    plain = pydicom.dcmread(io.BytesIO(encode(ds)))
    header = encode(plain)
    meta_end = 144 + int(plain.file_meta.FileMetaInformationGroupLength)
    raw = header[meta_end:]
    pos = raw.find(b"\xe0\x7f\x10\x00")
    length = struct.unpack_from("<L", raw, pos + 8)[0] + extra_zeros
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    body.write(compressor.compress(raw[:pos + 8] + struct.pack("<L", length) + raw[pos + 12:]))
    zeros = bytes(1 << 20)
    for _ in range(extra_zeros // len(zeros)):
        body.write(compressor.compress(zeros))
    body.write(compressor.compress(bytes(extra_zeros % len(zeros))))
    body.write(compressor.flush())
    meta = plain.file_meta
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    out = io.BytesIO()
    out.write(b"\0" * 128 + b"DICM")
    pydicom.filewriter.write_file_meta_info(out, meta, enforce_standard=True)
    return out.getvalue() + body.getvalue()


def test_deflate_bomb_corrupt_deflate_and_deep_nesting(ingestor: Ingestor, tmp_path: Path) -> None:
    bomb = deflated(make_dataset(), extra_zeros=50 * 2**20)  # 50 MB of zeros: about 50 KB deflated
    assert len(bomb) < 200_000
    with pytest.raises(RejectedInstance) as info:
        ingestor.store(bomb)
    assert info.value.status == OUT_OF_RESOURCES and "inflates to more than 2 MB" in info.value.reason

    good = deflated(make_dataset())
    assert ingestor.store(good).outcome == "stored"
    corrupt = bytearray(good)
    start = 144 + int(pydicom.dcmread(io.BytesIO(good), stop_before_pixels=True).file_meta.FileMetaInformationGroupLength)
    corrupt[start] = 0x07  # first deflate block: BTYPE 11, reserved (PS3.5 A.5 / RFC 1951 3.2.3)
    with pytest.raises(RejectedInstance) as info:
        ingestor.store(bytes(corrupt))
    assert info.value.status == CANNOT_UNDERSTAND
    with pytest.raises(RejectedInstance) as info:
        ingestor.store(good[:-200])  # truncated deflate stream
    assert info.value.status == CANNOT_UNDERSTAND

    with pytest.raises(RejectedInstance) as info:
        ingestor.store(nested_sequences(300))
    assert info.value.status == CANNOT_UNDERSTAND and "nested" in info.value.reason
    assert ingestor.store(nested_sequences(5)).outcome == "stored"  # modest nesting is fine

    # The bounded inflater itself: stops at the limit, long before inflating everything.
    path = tmp_path / "bomb.dcm"
    path.write_bytes(bomb)
    meta_end = 144 + int(pydicom.filereader.read_file_meta_info(path).FileMetaInformationGroupLength)
    with pytest.raises(RejectedInstance):
        inflated_size(path, meta_end, 2**20)
    assert inflated_size(path, meta_end, 100 * 2**20) > 50 * 2**20
