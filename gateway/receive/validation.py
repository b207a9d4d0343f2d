"""What a received instance must be before the gateway keeps it: parsed (bounded inflate, every
element converted), identified (four valid UIDs, SOP class matching the context) and, for the
image classes it stores, an image it can read (pixel data present and as long as the header
says; the codestream's own header agreeing with Rows/Columns: model/codestream.py).

Every refusal is a ``RejectedInstance`` carrying the DICOM status to answer (PS3.4 Annex B.2.3)
and its reason in words (sent back as the Error Comment).
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import pydicom
from osteogate.gateway.core.uids import InvalidUIDError, require_uid
from osteogate.model.codestream import PixelDecodeError, check_pixel_budget
from osteogate.model.fragments import fragment_table_problem
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pynetdicom.presentation import AllStoragePresentationContexts

# PS3.4 B.2.3 C-STORE status codes.
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
# In the "cannot understand" family (permanent): this SOP Instance UID already names another
# object here (other study, series, SOP class or patient). Not 0x0111 "duplicate SOP instance":
# senders may read that as "already stored", and this content was not stored.
UID_CONFLICT = 0xC001

# Stored and processed (the classifier decides per image what is in scope).
ACCEPTED_SOP_CLASSES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.1": "CR",
    "1.2.840.10008.5.1.4.1.1.1.1": "DX for presentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "DX for processing",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture",
}
# Every other standard storage SOP class pynetdicom knows: acknowledged, not stored (see above).
OUT_OF_SCOPE_SOP_CLASSES: dict[str, str] = {
    str(cx.abstract_syntax): cx.abstract_syntax.name
    for cx in AllStoragePresentationContexts
    if str(cx.abstract_syntax) not in ACCEPTED_SOP_CLASSES
}
# What the gateway itself writes into the SR and the result card.
OWN_MANUFACTURER = "OsteoGate"

# Native (uncompressed) transfer syntaxes: for these the pixel data length can be checked exactly.
_NATIVE = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"}
_DEFLATED = "1.2.840.10008.1.2.1.99"
MAX_PIXELS = 16384 * 16384
# Values larger than this are read from the file only when needed (pixel data), not at parse time.
_DEFER_BYTES = 1 << 20
_PIXEL_TAGS = {Tag("PixelData"), Tag("FloatPixelData"), Tag("DoubleFloatPixelData")}
DEFAULT_MAX_INSTANCE_BYTES = 512 * 2**20


class RejectedInstance(Exception):
    """The instance is refused; ``status`` is the DICOM status to answer with."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Identity:
    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class: str


# -- parsing -------------------------------------------------------------------------------------------


def inflated_size(path: Path, offset: int, limit: int) -> int:
    """Size of the deflated data set that starts at ``offset``, inflating at most ``limit`` bytes
    (then RejectedInstance: a 1 MB "deflate bomb" must not become 1 GB in memory)."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            while chunk := handle.read(1 << 16):
                while chunk:
                    total += len(inflater.decompress(chunk, 1 << 20))
                    if total > limit:
                        raise RejectedInstance(
                            OUT_OF_RESOURCES, f"deflated data set inflates to more than {limit // 2**20} MB")
                    chunk = inflater.unconsumed_tail
            total += len(inflater.flush())
    except zlib.error as exc:
        raise RejectedInstance(CANNOT_UNDERSTAND, "deflated data set is corrupt") from exc
    if not inflater.eof:
        raise RejectedInstance(CANNOT_UNDERSTAND, "deflated data set is truncated")
    return total


def read_received(path: Path, max_bytes: int = DEFAULT_MAX_INSTANCE_BYTES) -> Dataset:
    """Parse a received Part 10 file fully (pixel data deferred) or raise RejectedInstance.

    Every way a hostile file can break the parser (truncation, bad lengths, corrupt deflate
    stream, sequences nested deep enough to exhaust the recursion limit) is a permanent
    "cannot understand", never "out of resources": resending it cannot help.
    """
    try:
        meta = pydicom.filereader.read_file_meta_info(path)
        deflated = str(meta.get("TransferSyntaxUID", "")) == _DEFLATED
        if deflated:
            group_length = meta.get("FileMetaInformationGroupLength")
            if group_length is None:
                raise RejectedInstance(CANNOT_UNDERSTAND, "deflated data set without File Meta group length")
            # Preamble (128) + "DICM" (4) + the group length element itself (12) + the group.
            inflated_size(path, 144 + int(group_length), max_bytes)
        # Deferred reads seek in the file, which means nothing inside a deflated stream.
        ds = pydicom.dcmread(path, defer_size=None if deflated else _DEFER_BYTES)
        _touch(ds)
    except RejectedInstance:
        raise
    except RecursionError as exc:
        raise RejectedInstance(CANNOT_UNDERSTAND, "sequences nested too deeply") from exc
    except MemoryError as exc:
        raise RejectedInstance(OUT_OF_RESOURCES, "not enough memory to parse the data set") from exc
    except Exception as exc:  # noqa: BLE001 - any parser failure on received bytes is the sender's
        raise RejectedInstance(CANNOT_UNDERSTAND, f"data set cannot be parsed ({type(exc).__name__})") from exc
    return ds


def _touch(ds: Dataset) -> None:
    """Convert every element now (pixel data excepted), so a truncated or malformed element is
    found while the sender can still be told, not later in the worker."""
    for tag in list(ds.keys()):
        if tag in _PIXEL_TAGS:
            continue
        raw = ds.get_item(tag)
        if getattr(raw, "value", True) is None and getattr(raw, "length", 0) and raw.VR != "SQ":
            continue  # a deferred bulk value (encapsulated document, private blob): nothing to convert
        elem = ds[tag]
        if elem.VR == "SQ":
            for item in elem.value:
                _touch(item)


# -- validation ----------------------------------------------------------------------------------------


def identify(ds: Dataset, context_sop_class: str | None = None) -> Identity:
    """The four UIDs every stored object needs, each valid; the SOP class must match the context."""
    try:
        sop_class = require_uid(ds.get("SOPClassUID"), "SOPClassUID")
        sop_uid = require_uid(ds.get("SOPInstanceUID"), "SOPInstanceUID")
        study_uid = require_uid(ds.get("StudyInstanceUID"), "StudyInstanceUID")
        series_uid = require_uid(ds.get("SeriesInstanceUID"), "SeriesInstanceUID")
    except InvalidUIDError as exc:
        raise RejectedInstance(DATASET_DOES_NOT_MATCH_SOP_CLASS, str(exc)) from exc
    if context_sop_class and context_sop_class != sop_class:
        raise RejectedInstance(
            DATASET_DOES_NOT_MATCH_SOP_CLASS, "SOPClassUID differs from the presentation context"
        )
    return Identity(study_uid, series_uid, sop_uid, sop_class)


def validate(ds: Dataset, context_sop_class: str | None = None) -> tuple[str, str, str, str]:
    """Check what the gateway relies on; returns (study, series, sop instance, sop class) UIDs."""
    ident = identify(ds, context_sop_class)
    if ident.sop_class not in ACCEPTED_SOP_CLASSES:
        raise RejectedInstance(DATASET_DOES_NOT_MATCH_SOP_CLASS, f"SOP class {ident.sop_class} is not accepted")
    if "PixelData" not in ds:
        raise RejectedInstance(DATASET_DOES_NOT_MATCH_SOP_CLASS, "no Pixel Data")
    rows, cols = _int(ds, "Rows"), _int(ds, "Columns")
    if rows <= 0 or cols <= 0:
        raise RejectedInstance(DATASET_DOES_NOT_MATCH_SOP_CLASS, "Rows/Columns missing or zero")
    frames = _int(ds, "NumberOfFrames", 1)
    if rows * cols * max(frames, 1) > MAX_PIXELS:
        raise RejectedInstance(DATASET_DOES_NOT_MATCH_SOP_CLASS, f"image too large ({rows}x{cols}x{frames})")
    tsyntax = str(ds.file_meta.get("TransferSyntaxUID", ""))
    actual = _pixel_data_length(ds)
    if tsyntax in _NATIVE:
        bits = _int(ds, "BitsAllocated")
        if bits not in (1, 8, 16, 32, 64):
            raise RejectedInstance(DATASET_DOES_NOT_MATCH_SOP_CLASS, "BitsAllocated missing or invalid")
        expected = _expected_native_length(ds)
        # Odd lengths are padded to even; anything shorter is a truncated image, anything longer
        # means Rows/Columns/frames do not describe the pixels (the image would decode skewed).
        if actual < expected or actual > expected + expected % 2:
            raise RejectedInstance(
                DATASET_DOES_NOT_MATCH_SOP_CLASS, f"Pixel Data is {actual} bytes, expected {expected}"
                f" for {rows}x{cols}x{frames} (Rows x Columns x frames)")
    elif not actual:
        raise RejectedInstance(DATASET_DOES_NOT_MATCH_SOP_CLASS, "Pixel Data is empty")
    elif problem := fragment_table_problem(ds):  # offset tables that would split frames wrongly
        raise RejectedInstance(DATASET_DOES_NOT_MATCH_SOP_CLASS, problem)
    try:  # codestream's own size (JPEG SOF, J2K SIZ, JPEG-LS SOF55, RLE header) vs header and budget
        check_pixel_budget(ds)
    except PixelDecodeError as exc:
        raise RejectedInstance(DATASET_DOES_NOT_MATCH_SOP_CLASS, str(exc)) from exc
    return ident.study_uid, ident.series_uid, ident.sop_uid, ident.sop_class


def _pixel_data_length(ds: Dataset) -> int:
    """Bytes of Pixel Data, without reading a deferred value into memory."""
    raw = ds.get_item("PixelData")
    if raw is None:
        return 0
    length = getattr(raw, "length", None)  # RawDataElement: the encoded length
    deferred = getattr(raw, "value", b"") is None and length not in (None, 0, 0xFFFFFFFF)
    if deferred and isinstance(ds.filename, str):
        # The header says ``length``; the file must really hold that many bytes (truncation).
        available = os.path.getsize(ds.filename) - int(raw.value_tell)
        return max(0, min(int(length), available))
    if getattr(raw, "value", None) is not None:
        return len(raw.value)
    value = ds["PixelData"].value
    return len(value or b"")


def _expected_native_length(ds: Dataset) -> int:
    """Bytes an uncompressed image needs, per pydicom's own rule: YBR_FULL_422 holds two samples
    per pixel, not three, and 1-bit data is packed."""
    from pydicom.pixels.utils import get_expected_length

    try:
        return int(get_expected_length(ds, unit="bytes"))
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise RejectedInstance(DATASET_DOES_NOT_MATCH_SOP_CLASS,
                               f"image attributes incomplete ({type(exc).__name__})") from exc


def _int(ds: Dataset, keyword: str, default: int = 0) -> int:
    """An integer attribute, or a refusal: a malformed value is the sender's error, not ours."""
    try:
        value = ds.get(keyword)
        return int(value) if value not in (None, "") else default
    except (TypeError, ValueError, OverflowError) as exc:
        raise RejectedInstance(DATASET_DOES_NOT_MATCH_SOP_CLASS, f"{keyword} is not a valid integer") from exc


def text(ds: Dataset, keyword: str, limit: int = 64) -> str | None:
    """A text attribute cut to ``limit`` characters (the SQL column), or None when absent."""
    value = ds.get(keyword)
    return str(value)[:limit] if value not in (None, "") else None





def patient(ds: Dataset) -> tuple[str, str]:
    """(PatientID, IssuerOfPatientID), stripped."""
    return (str(ds.get("PatientID", "") or "").strip(), str(ds.get("IssuerOfPatientID", "") or "").strip())
