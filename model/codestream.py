"""Encapsulated pixel data, read without decoding: what each frame's codestream says about itself.

The codestream's OWN header (JPEG SOF, JPEG-LS SOF55, JPEG 2000 SIZ, RLE segment table) is parsed
(``read_codestream_info``) and checked against the dataset's Rows/Columns/SamplesPerPixel and
against the decoded-pixel budget (``check_pixel_budget``): a 64x64 header over a 30000x30000
codestream is refused in microseconds, not decoded for 24 s. Used by the decoder
(model/pixels.py) before anything is decoded and by the gateway at C-STORE time
(gateway/receive/integrity.py). Pure parsing: nothing here decodes pixels.
"""

from __future__ import annotations

import contextlib
import struct
from dataclasses import dataclass

import pydicom
from osteogate.model.fragments import fragment_table_problem
from pydicom.dataset import Dataset
from pydicom.uid import UID

# Decoded-pixel budget of one frame. The largest CR/DX detectors and stitched long-leg images are
# ~25 Mpx; 32 Mpx of 16-bit samples plus the float32 working copies is ~330 MB of transient memory,
# which keeps `osteogate serve` well under its 1 GB goal. Anything above is refused, not decoded.
MAX_DECODED_PIXELS = 32 * 1024 * 1024
RLE_SYNTAX_UID = "1.2.840.10008.1.2.5"



class PixelDecodeError(ValueError):
    """The instance has no usable image (missing/undecodable pixels, unsupported syntax, absurd size)."""


# -- codestream headers (pure parsing, no decoding) ---------------------------------------------

JPEG_SYNTAXES = {"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57",
                 "1.2.840.10008.1.2.4.70"}
JPEG_LS_SYNTAXES = {"1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"}
JPEG_2000_SYNTAXES = {"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.201",
                      "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203"}
RLE_SYNTAX = RLE_SYNTAX_UID

# ITU-T T.81 Table B.1: SOFn markers (C4 DHT, C8 JPG and CC DAC share the range but are not SOFs).
_JPEG_PROCESSES = {0xC0: "baseline", 0xC1: "extended", 0xC2: "progressive", 0xC3: "lossless",
                   0xC5: "differential sequential", 0xC6: "differential progressive",
                   0xC7: "differential lossless", 0xC9: "extended arithmetic",
                   0xCA: "progressive arithmetic", 0xCB: "lossless arithmetic",
                   0xCD: "differential sequential arithmetic", 0xCE: "differential progressive arithmetic",
                   0xCF: "differential lossless arithmetic", 0xF7: "JPEG-LS"}
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"


@dataclass(frozen=True)
class CodestreamInfo:
    """What a frame's codestream says about itself (not what the DICOM header claims)."""

    kind: str  # "jpeg", "jpeg-ls", "jpeg2000", "rle"
    rows: int | None  # None for RLE: its header has no dimensions (the DICOM header's are used)
    columns: int | None
    components: int  # samples per pixel (RLE: segments / bytes per sample)
    precision: int  # bits per sample (RLE: BitsAllocated)
    process: str = ""  # JPEG: the SOF process ("baseline", "lossless", ...)
    signed: bool = False  # JPEG 2000 Ssiz sign bit
    levels: int = 0  # JPEG 2000: fewest wavelet decomposition levels (COD/COC): the deepest reduce
    reversible: bool = True  # JPEG 2000: 5/3 reversible wavelet (COD), else 9/7 irreversible


def _u16(data: bytes, pos: int) -> int:
    return struct.unpack_from(">H", data, pos)[0]


_HEADER_NAMES = {"jpeg": "JPEG SOF", "jpeg-ls": "JPEG-LS SOF55", "jpeg2000": "JPEG 2000 SIZ", "rle": "RLE header"}


def _jpeg_info(data: bytes, kind: str) -> CodestreamInfo:
    """JPEG (T.81) or JPEG-LS (T.87): walk the marker segments up to the first SOFn / SOF55."""
    name = "JPEG-LS" if kind == "jpeg-ls" else "JPEG"
    if data[:2] != b"\xff\xd8":
        raise PixelDecodeError(f"{name} codestream does not start with SOI")
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            raise PixelDecodeError(f"{name} codestream corrupt: no marker at byte {pos}")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # TEM, RSTn: no length
            pos += 2
            continue
        if marker in (0xDA, 0xD9):
            break  # SOS or EOI before any frame header
        length = _u16(data, pos + 2)
        if length < 2:
            raise PixelDecodeError(f"{name} codestream corrupt: marker segment length {length}")
        if marker in _JPEG_PROCESSES:
            if pos + 10 > len(data) or length < 8:
                raise PixelDecodeError(f"{name} frame header truncated")
            precision, rows, columns, components = data[pos + 4], _u16(data, pos + 5), _u16(data, pos + 7), data[pos + 9]
            if rows == 0:  # height given later by a DNL marker: the decoder would trust that instead
                raise PixelDecodeError(f"{name} frame header without a height (DNL) is not supported")
            return CodestreamInfo(kind, rows, columns, components, precision, _JPEG_PROCESSES[marker])
        pos += 2 + length
    raise PixelDecodeError(f"{name} codestream has no frame header (SOF) before its scan")


def _j2k_codestream(data: bytes) -> bytes:
    """The raw J2K codestream: DICOM wants it bare, some senders wrap it in a JP2 file ('jp2c' box)."""
    if not data.startswith(_JP2_SIGNATURE):
        return data
    pos = 0
    while pos + 8 <= len(data):
        length, box = struct.unpack_from(">I4s", data, pos)
        header = 8
        if length == 1:
            if pos + 16 > len(data):
                break
            length, header = struct.unpack_from(">Q", data, pos + 8)[0], 16
        elif length == 0:
            length = len(data) - pos
        if box == b"jp2c":
            return data[pos + header:pos + length]
        if length < header:
            break
        pos += length
    raise PixelDecodeError("JP2 file without a codestream box")


def _j2k_info(data: bytes) -> CodestreamInfo:
    """JPEG 2000 (T.800 Annex A): SIZ right after SOC, then COD/COC for the decomposition levels."""
    data = _j2k_codestream(data)
    if data[:4] != b"\xff\x4f\xff\x51" or len(data) < 4 + 38:
        raise PixelDecodeError("JPEG 2000 codestream does not start with SOC + SIZ")
    siz = 4  # first byte after the SIZ marker (Lsiz)
    lsiz = _u16(data, siz)
    xsiz, ysiz, xosiz, yosiz = struct.unpack_from(">4I", data, siz + 4)
    components = _u16(data, siz + 36)
    if components < 1 or lsiz != 38 + 3 * components or len(data) < siz + lsiz:
        raise PixelDecodeError("JPEG 2000 SIZ marker corrupt")
    ssiz, xrsiz, yrsiz = data[siz + 38], data[siz + 39], data[siz + 40]
    if xsiz <= xosiz or ysiz <= yosiz or xrsiz == 0 or yrsiz == 0:
        raise PixelDecodeError("JPEG 2000 SIZ marker gives an empty image")
    columns = -(-xsiz // xrsiz) - (-(-xosiz // xrsiz))  # component 0 size, T.800 B.2
    rows = -(-ysiz // yrsiz) - (-(-yosiz // yrsiz))
    levels: int | None = None
    reversible = True
    pos = siz + lsiz
    while pos + 4 <= len(data):  # main header: marker segments up to the first tile (SOT)
        marker, length = _u16(data, pos), _u16(data, pos + 2)
        if marker == 0xFF90 or length < 2:
            break
        if marker == 0xFF52 and pos + 14 <= len(data):
            # COD: Lcod Scod SGcod(4) SPcod = levels, code-block w, h, style, transformation, ...
            levels = data[pos + 9] if levels is None else min(levels, data[pos + 9])
            reversible = data[pos + 13] == 1
        elif marker == 0xFF53:  # COC: Lcoc Ccoc(1 or 2) Scoc SPcoc(levels, ...)
            offset = pos + 4 + (1 if components < 257 else 2) + 1
            if offset < len(data):
                levels = data[offset] if levels is None else min(levels, data[offset])
        pos += 2 + length
    return CodestreamInfo("jpeg2000", rows, columns, components, (ssiz & 0x7F) + 1, signed=bool(ssiz & 0x80),
                          levels=levels or 0, reversible=reversible)


def _rle_info(data: bytes, bits_allocated: int, frame_length: int | None = None) -> CodestreamInfo:
    """RLE (PS3.5 Annex G): a 64-byte header, segment count then 15 offsets."""
    if len(data) < 64:
        raise PixelDecodeError("RLE frame shorter than its 64-byte header")
    count, *offsets = struct.unpack_from("<16I", data, 0)
    if not 1 <= count <= 15:
        raise PixelDecodeError(f"RLE header gives {count} segments (1 to 15 allowed)")
    used = offsets[:count]
    end = frame_length if frame_length is not None else len(data)
    if used[0] != 64 or any(b <= a for a, b in zip(used, used[1:], strict=False)) or used[-1] >= end:
        raise PixelDecodeError("RLE segment offsets corrupt")
    per_sample = max(1, bits_allocated // 8)
    if count % per_sample:
        raise PixelDecodeError(f"RLE header gives {count} segments, not a multiple of {per_sample} "
                               f"(BitsAllocated {bits_allocated})")
    return CodestreamInfo("rle", None, None, count // per_sample, bits_allocated)


def read_codestream_info(syntax: str, frame: bytes, bits_allocated: int = 16,
                         frame_length: int | None = None) -> CodestreamInfo | None:
    """Parse the header of one encapsulated frame; None for a syntax this module does not parse
    (deflate, video, ...). Pure: reads at most the main header, never decodes. ``frame`` may be the
    frame's first bytes only; ``frame_length`` is then the whole frame's length (RLE offsets).

    Parameters
    ----------
    syntax : str
        Transfer Syntax UID of the frame.
    frame : bytes
        The frame's bytes (or its first bytes).
    bits_allocated : int
        BitsAllocated of the dataset (RLE segments per sample).
    frame_length : int or None
        The whole frame's length when ``frame`` is only its head.

    Returns
    -------
    CodestreamInfo or None
        Size, components and precision the codestream declares; None for an unparsed syntax.

    Raises
    ------
    PixelDecodeError
        When the header is malformed or truncated.
    """
    syntax = str(syntax)
    if syntax in JPEG_2000_SYNTAXES:
        return _j2k_info(frame)
    if syntax in JPEG_LS_SYNTAXES:
        return _jpeg_info(frame, "jpeg-ls")
    if syntax in JPEG_SYNTAXES:
        return _jpeg_info(frame, "jpeg")
    if syntax == RLE_SYNTAX:
        return _rle_info(frame, bits_allocated, frame_length)
    return None


_HEAD_BYTES = 65536  # main headers of real codestreams fit; if not, the whole frame is parsed


def _frame_head(ds: Dataset) -> tuple[bytes, int] | None:
    """First bytes and length of a single-frame dataset's only frame without copying the frame
    (receiving a 4 MB JPEG 2000 file should not copy it again just to read 60 bytes of SIZ): the
    Basic Offset Table item is skipped and the first fragment sliced. None when the layout is not
    the plain one (several fragments or frames, odd items): the caller takes the whole frame."""
    if int(ds.get("NumberOfFrames", 1) or 1) != 1:
        return None
    data = ds.PixelData
    item = b"\xfe\xff\x00\xe0"
    if len(data) < 16 or data[:4] != item:
        return None
    first = 8 + struct.unpack_from("<I", data, 4)[0]  # after the Basic Offset Table item
    if first + 8 > len(data) or data[first:first + 4] != item:
        return None
    length = struct.unpack_from("<I", data, first + 4)[0]
    start, end = first + 8, first + 8 + length
    if end > len(data) or data[end:end + 4] == item:  # truncated, or a second fragment follows
        return None
    return data[start:min(end, start + _HEAD_BYTES)], length


def _first_frame(ds: Dataset) -> bytes:
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        return pydicom.encaps.get_frame(ds.PixelData, 0, number_of_frames=frames)
    except Exception as exc:  # any malformed item/offset table
        raise PixelDecodeError(f"encapsulated pixel data malformed: {type(exc).__name__}: {exc}") from exc


def check_pixel_budget(ds: Dataset) -> CodestreamInfo | None:
    """Refuse (PixelDecodeError) before decoding when the first frame would be too large to decode or
    its codestream disagrees with the header: Rows x Columns over ``MAX_DECODED_PIXELS``; the
    codestream's own size or component count different from Rows/Columns/SamplesPerPixel; a
    precision over 16 bits; an RLE segment count that does not match SamplesPerPixel x bytes per
    sample; fragments and offset tables that contradict each other (model/fragments.py). Returns
    the parsed codestream header (None for native pixel data).

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        The instance, pixel data included (only item headers and the first frame's head are read).

    Returns
    -------
    CodestreamInfo or None
        The first frame's codestream header; None for native pixel data.

    Raises
    ------
    PixelDecodeError
        With the reason, when decoding must not be attempted.
    """
    return checked_first_frame(ds, whole_frame=False)[0]


def checked_first_frame(ds: Dataset, whole_frame: bool = True) -> tuple[CodestreamInfo | None, bytes | None]:
    """``check_pixel_budget`` that also hands back the first frame's bytes (for the reduced decode);
    ``whole_frame=False``: only the frame's head is read where the layout allows (frame is None).

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        The instance.
    whole_frame : bool
        Return the first frame's bytes (True) or only check its head (False).

    Returns
    -------
    tuple of (CodestreamInfo or None, bytes or None)
        The codestream header and the first frame.

    Raises
    ------
    PixelDecodeError
        As :func:`check_pixel_budget`.
    """
    try:
        rows, columns = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        bits_allocated = int(ds.get("BitsAllocated", 16) or 16)
    except (TypeError, ValueError) as exc:
        raise PixelDecodeError(f"image header not numeric: {exc}") from exc
    if rows * columns > MAX_DECODED_PIXELS:
        raise PixelDecodeError(f"{rows}x{columns} exceeds the decoded-pixel budget "
                               f"({MAX_DECODED_PIXELS // 2**20} Mpx per frame)")
    syntax = transfer_syntax(ds)
    parsed = JPEG_SYNTAXES | JPEG_LS_SYNTAXES | JPEG_2000_SYNTAXES | {RLE_SYNTAX}
    if syntax not in parsed or "PixelData" not in ds:
        return None, None  # native (Rows x Columns is the truth) or a syntax we do not decode
    if problem := fragment_table_problem(ds):  # offset tables that would hand out the wrong bytes
        raise PixelDecodeError(problem)
    info, frame = None, None
    head = None if whole_frame else _frame_head(ds)
    if head is not None:
        with contextlib.suppress(PixelDecodeError):  # headers beyond the head: parse the whole frame
            info = read_codestream_info(syntax, head[0], bits_allocated, head[1])
    if info is None:
        frame = _first_frame(ds)
        info = read_codestream_info(syntax, frame, bits_allocated)
    assert info is not None
    what = _HEADER_NAMES[info.kind]
    # Rows x Columns are within the budget (checked above): a codestream that agrees is too.
    if info.rows is not None and info.columns is not None and (info.rows, info.columns) != (rows, columns):
        raise PixelDecodeError(f"{what} says {info.columns}x{info.rows} but the header says "
                               f"{columns}x{rows} (Columns x Rows)")
    if info.components != samples:
        raise PixelDecodeError(f"{what} has {info.components} components but SamplesPerPixel is {samples}")
    if not 1 <= info.precision <= 16:
        raise PixelDecodeError(f"{what} precision {info.precision} bits is not supported")
    return info, frame



def transfer_syntax(ds: Dataset) -> UID:
    """The dataset's transfer syntax; native little endian for an in-memory dataset without file meta.

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        Any dataset.

    Returns
    -------
    pydicom.uid.UID
        Its Transfer Syntax UID.
    """
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax is None:
        # Datasets built in memory (tests, the SCP before writing) carry no file meta: they are native.
        little = getattr(ds, "is_little_endian", True) is not False
        return pydicom.uid.ExplicitVRLittleEndian if little else pydicom.uid.ExplicitVRBigEndian
    return UID(syntax)
