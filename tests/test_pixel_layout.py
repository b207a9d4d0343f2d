"""Issue 19 item 14 (ingest half): pixel data whose layout disagrees with its header.

Rows x Columns against the Pixel Data length in every native transfer syntax, and encapsulated
Pixel Data whose Basic / Extended Offset Tables or fragment count do not fit the frames. Each is
refused by the receiver's checks (the C-STORE status class 0xA9xx, "does not match SOP class")
with a one-line reason and, if one was stored before these checks, reported by the decoder as a
PixelDecodeError (the worker's "not assessed" with that reason) - never an exception of another
kind. Datasets are built and round-tripped through Part 10 bytes here; nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import io
import struct

import numpy as np
import pydicom
import pytest
from osteogate.gateway.receive.validation import DATASET_DOES_NOT_MATCH_SOP_CLASS, RejectedInstance, validate
from osteogate.model.fragments import fragment_table_problem
from osteogate.model.pixels import PixelDecodeError, dataset_to_image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, encapsulate_extended
from pydicom.pixels import get_encoder
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

ROWS, COLS = 64, 48
PIXELS = (np.arange(ROWS * COLS) % 4000).astype(np.uint16).reshape(ROWS, COLS)


def header(syntax: str, rows: int = ROWS, cols: int = COLS, frames: int = 1) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # DX
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientID = "DX", "layout"
    ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, cols, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if frames > 1:
        ds.NumberOfFrames = frames
    return ds


def reread(ds: Dataset) -> Dataset:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return pydicom.dcmread(buffer)


def assert_refused_then_not_assessed(ds: Dataset, words: str) -> None:
    ds = reread(ds)
    with pytest.raises(RejectedInstance) as refused:
        validate(ds)
    assert refused.value.status == DATASET_DOES_NOT_MATCH_SOP_CLASS and words in str(refused.value)
    # What the worker does with such a file stored before these checks: "not assessed" with the
    # reason (PixelDecodeError); a decoder that reads the first frame only may succeed. Anything
    # else (another exception, a panic) fails the test.
    with contextlib.suppress(PixelDecodeError):
        dataset_to_image(ds, 32)


NATIVE = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian]


@pytest.mark.filterwarnings("ignore:The number of bytes of pixel data:UserWarning")  # pydicom on the lie itself
@pytest.mark.parametrize("syntax", NATIVE, ids=lambda s: s.name)
@pytest.mark.parametrize(("rows", "factor"), [(ROWS // 2, 1.0), (ROWS, 4.0), (ROWS * 2, 1.0), (ROWS, 0.5)],
                         ids=["rows-half", "data-x4", "rows-double", "data-half"])
def test_native_rows_columns_must_match_the_pixel_data_length(syntax, rows, factor):
    """Before the fix, more bytes than Rows x Columns were accepted: the wrong image was scored."""
    ds = header(syntax, rows=rows)
    data = PIXELS.byteswap().tobytes() if syntax == ExplicitVRBigEndian else PIXELS.tobytes()
    ds.PixelData = (data * 4)[: int(len(data) * factor)]
    ds["PixelData"].VR = "OW"
    assert_refused_then_not_assessed(ds, "Pixel Data is")


@pytest.mark.parametrize("syntax", NATIVE, ids=lambda s: s.name)
def test_native_exact_length_still_accepted(syntax):
    ds = header(syntax)
    ds.PixelData = PIXELS.byteswap().tobytes() if syntax == ExplicitVRBigEndian else PIXELS.tobytes()
    ds["PixelData"].VR = "OW"
    validate(reread(ds))


def frame(syntax: str) -> bytes:
    return get_encoder(syntax).encode(
        PIXELS, rows=ROWS, columns=COLS, samples_per_pixel=1, bits_allocated=16, bits_stored=12,
        pixel_representation=0, photometric_interpretation="MONOCHROME2", number_of_frames=1)


ENCAPSULATED = [RLELossless, JPEG2000Lossless, JPEGLSLossless]


def bot_wrong_single(ds: Dataset, one: bytes) -> None:
    data = bytearray(encapsulate([one], has_bot=True))
    struct.pack_into("<I", data, 8, 10**6)
    ds.PixelData = bytes(data)


def bot_past_data(ds: Dataset, one: bytes) -> None:
    ds.NumberOfFrames = 2
    data = bytearray(encapsulate([one, one], has_bot=True))
    struct.pack_into("<I", data, 12, 10**6)
    ds.PixelData = bytes(data)


def bot_mid_fragment(ds: Dataset, one: bytes) -> None:
    ds.NumberOfFrames = 2
    data = bytearray(encapsulate([one, one], has_bot=True))
    struct.pack_into("<I", data, 12, 8)
    ds.PixelData = bytes(data)


def eot_offsets_wrong(ds: Dataset, one: bytes) -> None:
    ds.NumberOfFrames = 2
    data, offsets, lengths = encapsulate_extended([one, one])
    offsets = bytearray(offsets)
    struct.pack_into("<Q", offsets, 0, 10**6)
    ds.PixelData, ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths = data, bytes(offsets), lengths


def eot_lengths_wrong(ds: Dataset, one: bytes) -> None:
    ds.NumberOfFrames = 2
    data, offsets, lengths = encapsulate_extended([one, one])
    lengths = bytearray(lengths)
    struct.pack_into("<Q", lengths, 0, 10**6)
    ds.PixelData, ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths = data, offsets, bytes(lengths)


def fewer_fragments_than_frames(ds: Dataset, one: bytes) -> None:
    ds.NumberOfFrames = 3
    ds.PixelData = encapsulate([one, one])


@pytest.mark.parametrize("syntax", ENCAPSULATED, ids=lambda s: s.name)
@pytest.mark.parametrize(("corrupt", "words"), [
    (bot_wrong_single, "Basic Offset Table"), (bot_past_data, "Basic Offset Table"),
    (bot_mid_fragment, "Basic Offset Table"), (eot_offsets_wrong, "Extended Offset Table"),
    (eot_lengths_wrong, "Extended Offset Table"), (fewer_fragments_than_frames, "fragment(s) for 3 frames"),
], ids=lambda v: getattr(v, "__name__", ""))
def test_wrong_offset_tables_refused_at_c_store(syntax, corrupt, words):
    """Before the fix all but the mid-fragment offset were accepted and failed (or decoded the
    wrong bytes) at decode time."""
    ds = header(syntax)
    corrupt(ds, frame(syntax))
    assert_refused_then_not_assessed(ds, words)
    with pytest.raises(PixelDecodeError, match=words.split("(")[0]):
        dataset_to_image(reread(ds), 32)


@pytest.mark.parametrize("syntax", ENCAPSULATED, ids=lambda s: s.name)
def test_consistent_offset_tables_pass(syntax):
    one = frame(syntax)
    ds = header(syntax, frames=2)
    ds.PixelData = encapsulate([one, one], has_bot=True)
    assert fragment_table_problem(reread(ds)) is None
    ds = header(syntax, frames=2)
    ds.PixelData, ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths = encapsulate_extended([one, one])
    assert fragment_table_problem(reread(ds)) is None
    validate(reread(ds))
    assert dataset_to_image(reread(ds), 32).shape[0] == 32


def test_rle_with_fewer_rows_than_encoded_is_not_assessed_not_a_panic():
    """pylibjpeg-rle panics (pyo3 PanicException, a BaseException) when the frame holds more than
    Rows x Columns; before the fix it escaped ``except Exception`` and killed the decoding thread."""
    ds = header(RLELossless, rows=ROWS // 2)
    ds.PixelData = encapsulate([frame(RLELossless)])
    with pytest.raises(PixelDecodeError, match="cannot decode pixel data"):
        dataset_to_image(reread(ds), 32)


def test_layout_lies_refused_over_a_real_association(tmp_path, tiny_model):
    """`osteogate serve` answers each with 0xA900, stores none of them, keeps the good one and
    still answers C-ECHO afterwards."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    from tests.gateway_harness import GatewayProcess
    from tests.helpers import dcmtk_available
    from tests.test_bombs import _send

    if not dcmtk_available("storescu", "storescp", "echoscu"):
        pytest.skip("dcmtk missing")
    good = header(ExplicitVRLittleEndian)
    good.PixelData = PIXELS.tobytes()
    good["PixelData"].VR = "OW"
    long_native = header(ExplicitVRLittleEndian, rows=ROWS // 2)
    long_native.PixelData = PIXELS.tobytes()
    long_native["PixelData"].VR = "OW"
    bot = header(JPEG2000Lossless)
    bot_past_data(bot, frame(JPEG2000Lossless))
    eot = header(JPEGLSLossless)
    eot_offsets_wrong(eot, frame(JPEGLSLossless))
    files = {}
    for name, ds in {"good": good, "long_native": long_native, "bot": bot, "eot": eot}.items():
        files[name] = tmp_path / f"{name}.dcm"
        ds.save_as(files[name], enforce_file_format=True)
    with GatewayProcess(tmp_path / "gw", model=tiny_model) as gw:
        statuses = {name: _send(gw.port, path)[0] for name, path in files.items()}
        echo = AE(ae_title="ECHOER")
        echo.add_requested_context(Verification)
        assoc = echo.associate("127.0.0.1", gw.port, ae_title="OSTEOGATE")
        assert assoc.is_established
        assert int(assoc.send_c_echo().Status) == 0
        assoc.release()
        assert gw.proc is not None and gw.proc.poll() is None
        crashes = [e for e in gw.events() if e.get("event") == "instance_store_failed"]
    assert statuses == {"good": 0, "long_native": 0xA900, "bot": 0xA900, "eot": 0xA900}, statuses
    assert crashes == []
    assert len(list((tmp_path / "gw" / "spool").rglob("*.dcm"))) == 1
