"""Compressed-dimension bombs: a small, valid DICOM header over a codestream that claims a huge image.

Each bomb starts as a real 64x64 codestream (pydicom or dcmtk encoders) whose own header is then
rewritten: the JPEG SOF / JPEG-LS SOF55 height and width, the JPEG 2000 SIZ image and tile size, or
the RLE segment table. A decoder that trusts the codestream would allocate the claimed image
(30000 x 30000 x 4 bytes = 3.6 GB for OpenJPEG); model.codestream.check_pixel_budget refuses it first.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, get_frame
from pydicom.uid import JPEG2000Lossless, JPEGBaseline8Bit, JPEGLSLossless, RLELossless

from .datasets import make_dataset

BOMB_SIDE = 30000


def first_frame(ds: Dataset) -> bytes:
    return get_frame(ds.PixelData, 0, number_of_frames=1)


def replace_frame(ds: Dataset, frame: bytes) -> Dataset:
    ds.PixelData = encapsulate([frame])
    return ds


def _sof_offset(frame: bytes, markers: set[int]) -> int:
    """Offset of the first frame header marker among ``markers`` (JPEG / JPEG-LS marker walk)."""
    pos = 2
    while pos + 4 <= len(frame):
        marker = frame[pos + 1]
        if marker in markers:
            return pos
        pos += 2 + struct.unpack_from(">H", frame, pos + 2)[0]
    raise ValueError("no frame header")


def patch_jpeg_sof(frame: bytes, rows: int, columns: int, markers: set[int] | None = None) -> bytes:
    sofs = markers or {0xC0, 0xC1, 0xC2, 0xC3}
    pos = _sof_offset(frame, sofs)
    out = bytearray(frame)
    struct.pack_into(">HH", out, pos + 5, rows, columns)
    return bytes(out)


def patch_j2k_siz(frame: bytes, rows: int, columns: int) -> bytes:
    """SIZ: image size (Xsiz, Ysiz) and tile size (XTsiz, YTsiz, one tile) set to the claim."""
    out = bytearray(frame)
    struct.pack_into(">II", out, 8, columns, rows)
    struct.pack_into(">II", out, 24, columns, rows)
    return bytes(out)


def _small(seed: int = 5, bits: int = 16) -> Dataset:
    ds = make_dataset(size=(64, 64), seed=seed)
    if bits == 8:
        pixels = (ds.pixel_array >> 4).astype("uint8")
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
        ds.PixelData = pixels.tobytes()
    return ds


def jpeg_bomb(rows: int = BOMB_SIDE, columns: int = BOMB_SIDE) -> Dataset:
    """JPEG baseline, 64x64 header, SOF claiming rows x columns (needs dcmtk's dcmcjpeg)."""
    if shutil.which("dcmcjpeg") is None:
        raise FileNotFoundError("dcmcjpeg (dcmtk) not installed")
    with tempfile.TemporaryDirectory() as tmp:
        source, target = Path(tmp) / "in.dcm", Path(tmp) / "out.dcm"
        _small(bits=8).save_as(source, enforce_file_format=True)
        subprocess.run(["dcmcjpeg", "+eb", str(source), str(target)], check=True, capture_output=True, timeout=60)
        ds = pydicom.dcmread(target)
    assert ds.file_meta.TransferSyntaxUID == JPEGBaseline8Bit
    return replace_frame(ds, patch_jpeg_sof(first_frame(ds), rows, columns))


def jpeg_ls_bomb(rows: int = BOMB_SIDE, columns: int = BOMB_SIDE) -> Dataset:
    ds = _small()
    ds.compress(JPEGLSLossless)
    return replace_frame(ds, patch_jpeg_sof(first_frame(ds), rows, columns, {0xF7}))


def j2k_bomb(rows: int = BOMB_SIDE, columns: int = BOMB_SIDE) -> Dataset:
    ds = _small()
    ds.compress(JPEG2000Lossless)
    return replace_frame(ds, patch_j2k_siz(first_frame(ds), rows, columns))


def rle_bomb() -> Dataset:
    """RLE whose segment table describes 6 segments (3 samples x 2 bytes: a colour image) under a
    MONOCHROME2 header with SamplesPerPixel 1: the segments do not match the header."""
    ds = _small()
    ds.compress(RLELossless)
    frame = bytearray(first_frame(ds))
    count, *offsets = struct.unpack_from("<16I", frame, 0)
    assert count == 2
    extra = len(frame) - 64  # four more (tiny, valid) segments appended after the real two
    tail = b"\xff\x00" * 4
    new_offsets = offsets[:2] + [64 + extra + 2 * i for i in range(4)]
    struct.pack_into("<16I", frame, 0, 6, *new_offsets, *([0] * 9))
    return replace_frame(ds, bytes(frame) + tail)


BOMBS = {
    "JPEG SOF": jpeg_bomb,
    "JPEG-LS SOF55": jpeg_ls_bomb,
    "JPEG 2000 SIZ": j2k_bomb,
    "RLE segments": rle_bomb,
}
