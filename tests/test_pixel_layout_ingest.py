"""Pixel data whose layout contradicts the header (issue 19 item 14, ingest half), through the
Ingestor (real SQLite and spool): the codestream's size against Rows in JPEG, JPEG-LS and JPEG
2000; RLE (no size in its header) stored and then not assessed; correct offset tables (Basic, 3
frames, Extended) stored. Native lengths and wrong offset tables: tests/test_pixel_layout.py.

Refused at C-STORE with a permanent failure status (0xA900, "does not match SOP class": resending
cannot help) where the header, the item table or the codestream's own header shows it; otherwise
decoded as "not assessed" with the reason (PixelDecodeError), never a crash.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pydicom
import pytest
from osteogate.gateway.receive.ingest import Ingestor
from osteogate.gateway.receive.validation import DATASET_DOES_NOT_MATCH_SOP_CLASS, RejectedInstance
from osteogate.gateway.store.db import Database
from osteogate.gateway.store.spool import Spool
from osteogate.model.codestream import PixelDecodeError
from osteogate.model.pixels import dataset_to_image
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, encapsulate_extended
from pydicom.uid import (
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

from tests.helpers import make_dataset
from tests.helpers.bombs import jpeg_bomb
from tests.test_ingest_integrity import encode


@pytest.fixture
def ingestor(tmp_path: Path) -> Ingestor:
    db = Database(f"sqlite:///{tmp_path / 'test.db'}")
    db.create_schema()
    return Ingestor(db, Spool(tmp_path / "spool"), max_instance_bytes=2 * 2**20)


def refused(ingestor: Ingestor, encoded: bytes) -> RejectedInstance:
    with pytest.raises(RejectedInstance) as caught:
        ingestor.store(encoded)
    return caught.value


# -- Rows x Columns against the pixel data length --------------------------------------------------


def _compressed(syntax: str) -> Dataset:
    ds = make_dataset(size=(64, 64), seed=4)
    if syntax == "jpeg":
        try:
            return jpeg_bomb(64, 64)  # JPEG baseline of a 64x64 image, its SOF untouched
        except FileNotFoundError:
            pytest.skip("dcmcjpeg (dcmtk) not installed")
    ds.compress(syntax)
    return ds


@pytest.mark.parametrize("syntax", ["jpeg", JPEGLSLossless, JPEG2000Lossless], ids=str)
@pytest.mark.parametrize("rows", [32, 128])
def test_codestream_size_disagreeing_with_rows_is_refused(ingestor: Ingestor, syntax: str, rows: int) -> None:
    ds = _compressed(syntax)
    ds.Rows = rows
    exc = refused(ingestor, encode(ds))
    assert exc.status == DATASET_DOES_NOT_MATCH_SOP_CLASS
    assert "64x64" in exc.reason and f"64x{rows}" in exc.reason  # codestream vs header, both named


@pytest.mark.parametrize("rows", [32, 128])
def test_rle_rows_disagreeing_is_not_assessed_at_decode(ingestor: Ingestor, rows: int) -> None:
    """An RLE header carries no image size: stored, and the decoder says why it cannot read it
    (pylibjpeg-rle panics on such segments: that must be a reason, not a crashed worker)."""
    ds = _compressed(RLELossless)
    ds.Rows = rows
    stored = ingestor.store(encode(ds))
    spooled = pydicom.dcmread(ingestor.spool.absolute(ingestor.spool.instance_path(
        stored.study_uid, ds.SeriesInstanceUID, stored.sop_instance_uid)))
    with pytest.raises(PixelDecodeError, match="RLE"):
        dataset_to_image(spooled, 256)


# -- offset tables ------------------------------------------------------------------------------------


def _frames(syntax: str, count: int) -> tuple[Dataset, list[bytes]]:
    """A ``count``-frame 64x64 instance in ``syntax`` and its encoded frames."""
    ds = make_dataset(size=(64, 64), seed=6)
    pixels = np.stack([ds.pixel_array + i for i in range(count)]) if count > 1 else ds.pixel_array
    ds.NumberOfFrames = count
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.compress(syntax)
    frames = [pydicom.encaps.get_frame(ds.PixelData, i, number_of_frames=count) for i in range(count)]
    return ds, frames


def _with_bot(ds: Dataset, frames: list[bytes], table: list[int] | None = None,
              fragments_per_frame: int = 1) -> bytes:
    data = bytearray(encapsulate(frames, fragments_per_frame=fragments_per_frame, has_bot=True))
    if table is not None:
        data[4:8] = struct.pack("<I", 4 * len(table))
        data = data[:8] + struct.pack(f"<{len(table)}I", *table) + data[8 + 4 * len(frames):]
    ds.PixelData = bytes(data)
    return encode(ds)


@pytest.mark.parametrize("syntax", [JPEG2000Lossless, JPEGLSLossless, RLELossless], ids=str)
def test_correct_offset_tables_are_stored(ingestor: Ingestor, syntax: str) -> None:
    ds, frames = _frames(syntax, 1)
    assert ingestor.store(_with_bot(ds, frames)).stored
    ds, frames = _frames(syntax, 3)
    assert ingestor.store(_with_bot(ds, frames)).stored
    ds, frames = _frames(syntax, 2)
    ds.PixelData, ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths = encapsulate_extended(frames)
    assert ingestor.store(encode(ds)).stored
