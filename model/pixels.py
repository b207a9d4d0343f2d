"""The ONE pixel decoder used by serving and training: DICOM / PNG / JPEG -> float32 HxW in [0, 1].

Training and serving must see identical pixels, otherwise the model is evaluated on a different input
distribution than it was trained on. Pipeline for DICOM:

1. decode the first frame only (pydicom + pylibjpeg/pyjpegls plugins; multi-frame files are rare for
   radiographs and the first frame is the acquired image);
2. colour (RGB/YBR/PALETTE COLOR) -> luminance, scaled by the stored bit depth;
3. grayscale: Modality LUT (rescale slope/intercept or LUT), then the VOI chosen by the sender
   (VOI LUT sequence, else the first window), mapped to [0, 1]; without VOI, a robust min-max between
   the 0.5th and 99.5th percentiles so a few hot/cold pixels (markers, collimator edges) do not squash
   the contrast;
4. MONOCHROME1 is inverted so bone is always bright;
5. with ``long_side`` (the model's working size, ``model.preprocess.needed_long_side``): resized so
   the long side is ``long_side`` (never enlarged).

Decode only what the model needs: when ``long_side`` is given and the first frame is JPEG 2000
(any of its transfer syntaxes) or 8-bit JPEG baseline/extended, monochrome, the codestream is
decoded directly at the smallest power-of-two reduction (down to 1/4) whose long side is still
>= ``long_side`` (JPEG 2000 resolution levels through Pillow's OpenJPEG ``reduce``, then a 3-tap
filter that makes the wavelet low-pass match a box average; libjpeg DCT scaling through Pillow
``draft``), then steps 3-5 run on the reduced image. Everything else (native, RLE, JPEG lossless,
JPEG-LS, 12-bit JPEG, colour) is decoded at full size. Steps 3-4 act on values, so they commute
with downscaling only approximately (clipping at the window edges, non-linear LUTs): the
difference from "decode full, then resize" is measured per transfer syntax in
tests/test_decode_parity.py (tolerance stated there, ``PARITY_*``) and benchmarks/decode.py.
Without VOI, the robust min-max percentiles are taken on the image at ``long_side`` (after the
resize), so they do not depend on how it was decoded.

Before anything is decoded, the codestream's OWN header (JPEG SOF, JPEG-LS SOF55, JPEG 2000 SIZ,
RLE segment table) is parsed (``read_codestream_info``) and checked against the dataset's
Rows/Columns/SamplesPerPixel and against the decoded-pixel budget (``check_pixel_budget``): a
64x64 header over a 30000x30000 codestream is refused in microseconds, not decoded for 24 s.
The gateway also calls ``check_pixel_budget`` at C-STORE time (gateway/receive/ingest.py).
"""

from __future__ import annotations

import contextlib
import functools
import struct
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import cv2
import numpy as np
import pydicom
from osteogate.model.fragments import fragment_table_problem
from osteogate.model.preprocess import resize_long_side
from pydicom.dataset import Dataset
from pydicom.uid import UID

MAX_SIDE = 16384  # radiographs are at most ~4-5k px; anything bigger is corrupt or not an image
# Decoded-pixel budget of one frame. The largest CR/DX detectors and stitched long-leg images are
# ~25 Mpx; 32 Mpx of 16-bit samples plus the float32 working copies is ~330 MB of transient memory,
# which keeps `osteogate serve` well under its 1 GB goal. Anything above is refused, not decoded.
MAX_DECODED_PIXELS = 32 * 1024 * 1024
RLE_SYNTAX_UID = "1.2.840.10008.1.2.5"
# Full-size decoders tried first where pydicom's default is slower. JPEG-LS and RLE decoding is
# exactly defined, so the pixels are the same whichever plugin decodes: CharLS (pyjpegls) decodes a
# 2048x2048 JPEG-LS image ~3x faster than libjpeg (benchmarks/decode.py). Empty it to measure
# pydicom's default choice (the path before issue #11).
PREFERRED_PLUGINS: dict[str, str] = {"1.2.840.10008.1.2.4.80": "pyjpegls", "1.2.840.10008.1.2.4.81": "pyjpegls",
                                     RLE_SYNTAX_UID: "pylibjpeg"}
MAX_REDUCTION_STEPS = 2  # deepest reduced decode: 1/4 (1/8 deviates more: tests/test_decode_parity.py)
LOW_PERCENTILE, HIGH_PERCENTILE = 0.5, 99.5
_PERCENTILE_SAMPLES = 1_000_000  # subsample big images for the percentiles: same result, 4x faster


class PixelDecodeError(ValueError):
    """The instance has no usable image (missing/undecodable pixels, unsupported syntax, absurd size)."""


def _check_geometry(ds: Dataset) -> None:
    rows, columns = ds.get("Rows"), ds.get("Columns")
    if not rows or not columns:
        raise PixelDecodeError("Rows/Columns missing or zero")
    if rows > MAX_SIDE or columns > MAX_SIDE:
        raise PixelDecodeError(f"absurd image size {rows}x{columns}")
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples not in (1, 3):
        raise PixelDecodeError(f"unsupported SamplesPerPixel {samples}")
    if int(ds.get("BitsAllocated", 0) or 0) not in (1, 8, 16, 32):
        raise PixelDecodeError(f"unsupported BitsAllocated {ds.get('BitsAllocated')!r}")


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
    frame's first bytes only; ``frame_length`` is then the whole frame's length (RLE offsets)."""
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
    sample. Returns the parsed codestream header (None for native pixel data)."""
    return _checked_first_frame(ds, whole_frame=False)[0]


def _checked_first_frame(ds: Dataset, whole_frame: bool = True) -> tuple[CodestreamInfo | None, bytes | None]:
    """``check_pixel_budget`` that also hands back the first frame's bytes (for the reduced decode);
    ``whole_frame=False``: only the frame's head is read where the layout allows (frame is None)."""
    try:
        rows, columns = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        bits_allocated = int(ds.get("BitsAllocated", 16) or 16)
    except (TypeError, ValueError) as exc:
        raise PixelDecodeError(f"image header not numeric: {exc}") from exc
    if rows * columns > MAX_DECODED_PIXELS:
        raise PixelDecodeError(f"{rows}x{columns} exceeds the decoded-pixel budget "
                               f"({MAX_DECODED_PIXELS // 2**20} Mpx per frame)")
    syntax = _transfer_syntax(ds)
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


# -- decoding ---------------------------------------------------------------------------------------


def _transfer_syntax(ds: Dataset) -> UID:
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax is None:
        # Datasets built in memory (tests, the SCP before writing) carry no file meta: they are native.
        little = getattr(ds, "is_little_endian", True) is not False
        return pydicom.uid.ExplicitVRLittleEndian if little else pydicom.uid.ExplicitVRBigEndian
    return UID(syntax)


def _plugin_failure(exc: BaseException) -> None:
    """Re-raise interpreter exits; swallow everything else a decoder plugin throws. Rust plugins
    (pylibjpeg-rle) panic on a frame shorter than Rows x Columns with pyo3's PanicException, a
    BaseException that ``except Exception`` lets through to kill the worker (issue 19 item 14)."""
    if isinstance(exc, (KeyboardInterrupt, SystemExit, GeneratorExit)):
        raise exc


def _decode_first_frame(ds: Dataset) -> np.ndarray:
    syntax = _transfer_syntax(ds)
    try:
        decoder = pydicom.pixels.get_decoder(syntax)
    except NotImplementedError as exc:
        raise PixelDecodeError(f"unsupported transfer syntax {syntax} ({syntax.name})") from exc
    if not decoder.is_available:
        raise PixelDecodeError(f"no decoder plugin installed for {syntax.name}")
    preferred = PREFERRED_PLUGINS.get(str(syntax))
    if preferred in decoder.available_plugins:
        try:  # the faster plugin first; any failure falls through to pydicom's own choice
            return decoder.as_array(ds, index=0, as_rgb=True, transfer_syntax_uid=syntax, decoding_plugin=preferred)[0]
        except BaseException as exc:  # noqa: BLE001 - see _plugin_failure
            _plugin_failure(exc)
    try:
        # index=0 decodes one frame only: a 100-frame file costs one frame of memory.
        # as_rgb converts YBR colour to RGB so the luminance formula below holds.
        array, _ = decoder.as_array(ds, index=0, as_rgb=True, transfer_syntax_uid=syntax)
    except BaseException as exc:  # noqa: BLE001 - plugins raise anything from ValueError to Rust panics
        _plugin_failure(exc)
        raise PixelDecodeError(f"cannot decode pixel data ({syntax.name}): {type(exc).__name__}: {exc}") from exc
    return array


def reduction_steps(long: int, long_side: int, deepest: int) -> int:
    """Largest k <= ``deepest`` such that halving ``long`` k times (rounding up, as JPEG 2000 and
    libjpeg do) still leaves at least ``long_side``: the model never gets an enlarged image."""
    steps = 0
    while steps < deepest and -(-long // 2 ** (steps + 1)) >= long_side:
        steps += 1
    return steps


# JPEG 2000 analysis low-pass filters (T.800 Annex F), DC gain 1: a reduced resolution level is the
# image filtered by these and decimated by 2, once per level.
_J2K_LOWPASS = {
    True: np.array([-1, 2, 6, 2, -1]) / 8.0,  # 5/3 reversible (lossless)
    False: np.array([0.026748757411, -0.016864118443, -0.078223266529, 0.266864118443, 0.602949018236,
                     0.266864118443, -0.078223266529, -0.016864118443, 0.026748757411]),  # 9/7 irreversible
}


@functools.cache
def box_matching_filter(reversible: bool, levels: int) -> np.ndarray:
    """3-tap correlation kernel (offsets -1, 0, +1 on the reduced grid) that turns a JPEG 2000 image
    reduced by ``levels`` into the closest match of the 2**levels box average cv2.INTER_AREA makes
    of the full image, which is what "decode full, then resize" gives.

    Why: the wavelet low-pass keeps more fine texture and noise than a box average and its samples
    sit half a full-resolution pixel from the box's; uncorrected, the model input differs up to 0.13
    (in [0, 1]) near edges and patch choices flip; corrected, max 0.05 (tests/test_decode_parity.py).
    Derivation: by the noble identity, filtering with g after decimation equals filtering with g
    upsampled before it, so g is the least-squares fit, on the full-resolution grid (aliasing
    included), of g(z**D) H(z) H(z**2)... to the D-pixel box, with the DC gain held at 1."""
    lowpass = _J2K_LOWPASS[reversible]
    factor = 2**levels
    cascade, centre = np.array([1.0]), 0
    for level in range(levels):
        spread = np.zeros((len(lowpass) - 1) * 2**level + 1)
        spread[:: 2**level] = lowpass
        cascade = np.convolve(cascade, spread)
        centre += (len(lowpass) // 2) * 2**level
    offsets = np.arange(-1, 2)
    positions = np.arange(-centre - 2 * factor, centre + 3 * factor)
    target = ((positions >= 0) & (positions < factor)) / factor
    design = np.zeros((len(positions), len(offsets)))
    for column, offset in enumerate(offsets):
        index = positions - factor * offset + centre
        inside = (index >= 0) & (index < len(cascade))
        design[inside, column] = cascade[index[inside]]
    weight = 1e3  # the DC-gain row: brightness must not change
    taps, *_ = np.linalg.lstsq(np.vstack([design, weight * np.ones(len(offsets))]),
                               np.concatenate([target, [weight]]), rcond=None)
    return taps.astype(np.float32)


def _decode_reduced(ds: Dataset, info: CodestreamInfo, frame: bytes, long_side: int) -> np.ndarray | None:
    """The first frame decoded directly at a reduced size, or None when this codestream cannot be
    (then the caller decodes it at full size). Monochrome only: colour goes through pydicom."""
    from PIL import Image

    if info.rows is None or info.columns is None or info.components != 1:
        return None
    long = max(info.rows, info.columns)
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    try:
        if info.kind == "jpeg2000" and info.signed == signed:
            steps = reduction_steps(long, long_side, min(info.levels, MAX_REDUCTION_STEPS))
            if steps == 0:
                return None
            with Image.open(BytesIO(frame)) as opened:
                opened.reduce = steps  # OpenJPEG skips the finest `steps` resolution levels
                opened.load()
                array = np.asarray(opened)
            # Pillow scales samples up to its container (8 or 16 bits) and offsets signed ones by
            # 2**(precision-1): undo both to get the stored values pydicom would have returned.
            container = 16 if array.dtype == np.uint16 else 8
            values = array.astype(np.int32)
            if container > info.precision:
                values >>= container - info.precision
            if info.signed:
                values -= 1 << (info.precision - 1)
            kernel = box_matching_filter(info.reversible, steps)
            return cv2.sepFilter2D(values.astype(np.float32), -1, kernel, kernel, borderType=cv2.BORDER_REPLICATE)
        if (info.kind == "jpeg" and info.precision == 8 and not signed
                and info.process in ("baseline", "extended", "progressive")):
            steps = reduction_steps(long, long_side, min(3, MAX_REDUCTION_STEPS))  # libjpeg: 1/2, 1/4, 1/8
            if steps == 0:
                return None
            with Image.open(BytesIO(frame)) as opened:
                if opened.mode != "L":
                    return None
                factor = 2**steps
                opened.draft("L", (max(1, opened.width // factor), max(1, opened.height // factor)))
                return np.asarray(opened)
    except Exception:  # Pillow/OpenJPEG refused this stream: the full decode reports any real error
        return None
    return None


def _colour_to_gray(array: np.ndarray, ds: Dataset) -> np.ndarray:
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if photometric == "PALETTE COLOR":
        try:
            array = pydicom.pixels.apply_color_lut(array, ds)
        except Exception as exc:
            raise PixelDecodeError(f"cannot apply palette colour LUT: {exc}") from exc
        max_value = float(2 ** int(ds.RedPaletteColorLookupTableDescriptor[2]) - 1)
    else:
        max_value = float(2 ** int(ds.get("BitsStored", 8)) - 1)
    rgb = array.astype(np.float32, copy=False)
    gray = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114  # ITU-R BT.601 luma
    return np.clip(gray / max_value, 0.0, 1.0)


def _modality(array: np.ndarray, ds: Dataset) -> np.ndarray:
    """Modality LUT. Linear rescale is done in float32 in place (pydicom would allocate float64:
    32 MB extra for a 2k x 2k image); a Modality LUT Sequence goes through pydicom."""
    if "ModalityLUTSequence" in ds:
        try:
            return pydicom.pixels.apply_modality_lut(array, ds).astype(np.float32, copy=False)
        except Exception as exc:
            raise PixelDecodeError(f"cannot apply Modality LUT: {exc}") from exc
    values = array.astype(np.float32)
    slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
    if slope != 1.0:
        values *= np.float32(slope)
    if intercept != 0.0:
        values += np.float32(intercept)
    return values


def _window(values: np.ndarray, ds: Dataset) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 windowing, written directly to the [0, 1] output range."""
    center = float(np.atleast_1d(ds.WindowCenter)[0])
    width = float(np.atleast_1d(ds.WindowWidth)[0])
    function = str(ds.get("VOILUTFunction", "LINEAR")).upper()
    if width <= 0 or (function == "LINEAR" and width < 1):
        raise PixelDecodeError(f"invalid WindowWidth {width}")
    if function == "SIGMOID":
        return (1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))).astype(np.float32)
    # In place on ``values`` (owned by the caller, discarded after): no full-size temporaries.
    if function == "LINEAR_EXACT":
        offset, scale = center - 0.5 * width, width
    else:
        offset, scale = center - 0.5 - 0.5 * (width - 1.0), width - 1.0
    values -= np.float32(offset)
    values /= np.float32(scale)
    return np.clip(values, 0.0, 1.0, out=values)


def _voi_lut(values: np.ndarray, ds: Dataset) -> np.ndarray:
    item = ds.VOILUTSequence[0]
    try:
        # LUT lookup needs integer input: modality values are integral for any real LUT use.
        out = pydicom.pixels.apply_voi(np.rint(values).astype(np.int64), ds, index=0).astype(np.float32, copy=False)
    except Exception as exc:
        raise PixelDecodeError(f"cannot apply VOI LUT: {exc}") from exc
    # The output range is that of the LUT data (its descriptor's bit depth is unreliable in the wild).
    lut = np.frombuffer(item.LUTData, dtype=np.uint8 if int(item.LUTDescriptor[2]) <= 8 else np.uint16) \
        if isinstance(item.LUTData, bytes) else np.asarray(item.LUTData)
    low, high = float(np.min(lut)), float(np.max(lut))
    return np.clip((out - low) / max(high - low, 1e-6), 0.0, 1.0)


def _robust_minmax(values: np.ndarray) -> np.ndarray:
    sample = values.ravel()
    if sample.size > _PERCENTILE_SAMPLES:
        sample = sample[:: sample.size // _PERCENTILE_SAMPLES + 1]
    low, high = np.percentile(sample, [LOW_PERCENTILE, HIGH_PERCENTILE])
    if high <= low:  # flat image: keep it flat (all zeros) rather than divide by zero
        return np.zeros_like(values, dtype=np.float32)
    out = values - np.float32(low)
    out /= np.float32(high - low)
    return np.clip(out, 0.0, 1.0, out=out)


def _has_window(ds: Dataset) -> bool:
    return ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None


def dataset_to_image(ds: Dataset, long_side: int | None = None, *, reduced: bool = True) -> np.ndarray:
    """Decode a DICOM dataset to a float32 2-D array in [0, 1], bone bright (see module docstring).

    ``long_side``: the long side the model needs (``model.preprocess.needed_long_side(card.input)``);
    the image is returned with that long side (smaller images as they are) and, where the codestream
    allows it, decoded at reduced resolution. ``reduced=False`` forces the full-size decode (the
    reference the parity tests and benchmarks compare with). ``long_side=None``: full resolution."""
    if "PixelData" not in ds:
        kind = "float/double pixel data" if ("FloatPixelData" in ds or "DoubleFloatPixelData" in ds) else "no PixelData"
        raise PixelDecodeError(f"{kind}: not a decodable radiograph")
    _check_geometry(ds)
    info, frame = _checked_first_frame(ds)  # before any decoding: codestream bombs stop here
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    array = None
    if (reduced and long_side and info is not None and frame is not None
            and photometric in ("MONOCHROME1", "MONOCHROME2")):
        array = _decode_reduced(ds, info, frame, long_side)
    del frame
    if array is None:
        array = _decode_first_frame(ds)
    if samples == 3 or photometric == "PALETTE COLOR":
        image = _colour_to_gray(array, ds)
    else:
        if array.ndim != 2:
            raise PixelDecodeError(f"unexpected decoded shape {array.shape}")
        values = _modality(array, ds)
        del array
        if "VOILUTSequence" in ds and len(ds.VOILUTSequence) > 0:
            image = _voi_lut(values, ds)
        elif _has_window(ds):
            image = _window(values, ds)
        else:
            # Percentiles are taken at the size the model sees: a 2x2 average has less noise than
            # the full image, so percentiles of the full image would depend on how it was decoded.
            if long_side and max(values.shape) > long_side:
                values = resize_long_side(values, long_side)
            image = _robust_minmax(values)
        if photometric == "MONOCHROME1":
            np.subtract(1.0, image, out=image)
    if long_side and max(image.shape) > long_side:
        image = resize_long_side(image, long_side)  # the same resize serving's prepare() would do
    image = np.ascontiguousarray(image, dtype=np.float32)
    if not np.isfinite(image).all():
        raise PixelDecodeError("decoded image contains NaN/inf")
    return image


def _is_dicom_file(path: Path) -> bool:
    if path.suffix.lower() in (".dcm", ".dicom"):
        return True
    with path.open("rb") as handle:
        handle.seek(128)
        return handle.read(4) == b"DICM"


def _load_raster(path: Path) -> np.ndarray:
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as opened:
            image = ImageOps.exif_transpose(opened)  # phone photos of films carry EXIF rotation
            if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
                values = np.asarray(image, dtype=np.float32)
                # 16-bit PNGs come back as mode "I": scale by the 16-bit range, like the 8-bit path.
                return np.clip(values / 65535.0, 0.0, 1.0)
            if image.mode == "F":
                return _robust_minmax(np.asarray(image, dtype=np.float32))
            return np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError) as exc:
        raise PixelDecodeError(f"{path.name}: cannot read image: {exc}") from exc


def load_image_file(path: Path | str, long_side: int | None = None) -> np.ndarray:
    """PNG/JPEG (Pillow, grayscale) or DICOM (preamble 'DICM' or .dcm suffix) -> float32 HxW in [0, 1].

    ``long_side`` as in ``dataset_to_image`` (training passes the working size, so it sees the
    pixels serving sees). PNG/JPEG files are decoded at full size, then resized: they are training
    material, and keeping their decode unchanged keeps the training distribution unchanged."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    if _is_dicom_file(path):
        try:
            ds = pydicom.dcmread(path)
        except Exception as exc:
            raise PixelDecodeError(f"{path.name}: not a readable DICOM file: {exc}") from exc
        return dataset_to_image(ds, long_side)
    image = _load_raster(path)
    if long_side and max(image.shape) > long_side:
        image = resize_long_side(image, long_side)
    return np.ascontiguousarray(image, dtype=np.float32)
