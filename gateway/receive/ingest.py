"""Accept one received instance: validate it, write it to the spool, record it in SQL.

Only after both the file and the row are durable does the SCP answer success. Every refusal
maps to a DICOM failure status (PS3.4 Annex B.2.3) so the sender knows to retry (0xA7xx) or to
give up (0xA9xx, 0xCxxx), and carries its reason in words (sent back as the Error Comment).

What is stored and processed: CR, DX and Secondary Capture images (``ACCEPTED_SOP_CLASSES``).
What is acknowledged but neither stored nor processed (``OUT_OF_SCOPE_SOP_CLASSES``): every other
standard storage SOP class a PACS may include when it routes a whole study (SR, KOS, GSPS,
encapsulated PDF, CT, MG...), and the gateway's own SRs and result cards coming back. Such objects
are of no use to the classifier, the PACS that sends them already archives them, and keeping
them would put patient documents on the gateway's disk with nothing to ever read them; they are
logged (hashed) and counted instead.

Integrity rules (README, CONFORMANCE.md 3.2.2.3):

* a SOP Instance UID already stored under another study, series, SOP class or patient is refused
  (``UID_CONFLICT``) and logged: the stored instance keeps its place;
* the same instance again is a duplicate (success, nothing changes, no new version) when its bytes
  are identical, or when it carries the same UIDs and patient and its decoded pixels are identical
  (the same image in another transfer syntax, or re-encoded by a router);
* the same UIDs with different pixels replace the stored copy and reopen the study.
"""

from __future__ import annotations

import hashlib
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from osteogate.gateway.core.logs import get_logger, hashed, study_key
from osteogate.gateway.core.uids import InvalidUIDError, require_uid
from osteogate.gateway.store.db import Database, Instance, Series, Study, StudyResult, StudyStatus, utcnow
from osteogate.gateway.store.spool import Spool, SpoolError
from osteogate.model.covariates import covariates_from_dataset
from osteogate.model.fragments import fragment_table_problem
from osteogate.model.pixels import PixelDecodeError, check_pixel_budget
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pynetdicom.presentation import AllStoragePresentationContexts
from sqlalchemy import or_, select
from sqlalchemy.exc import IntegrityError, OperationalError

log = get_logger("osteogate.gateway.receive.ingest")

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
class StoredInstance:
    study_uid: str
    sop_instance_uid: str
    duplicate: bool  # the same instance was already stored: nothing changed
    study_key: str
    # "stored" (new or replaced), "duplicate", "out_of_scope" or "own_result" (not stored).
    outcome: str = "stored"
    note: str | None = None  # why a duplicate is one, or why an object was not stored

    @property
    def stored(self) -> bool:
        """True when the study gained or changed an instance (the tracker must look at it)."""
        return self.outcome == "stored"


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
        # Odd lengths are padded to even; anything shorter is a truncated image.
        # Odd lengths carry one pad byte; more than that means Rows x Columns (or the frame count)
        # describe another image than the one sent, which would be scored as the wrong pixels.
        if actual < expected or actual > expected + (expected % 2):
            raise RejectedInstance(
                DATASET_DOES_NOT_MATCH_SOP_CLASS, f"Pixel Data is {actual} bytes, expected {expected}"
            )
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


def _text(ds: Dataset, keyword: str, limit: int = 64) -> str | None:
    value = ds.get(keyword)
    return str(value)[:limit] if value not in (None, "") else None


def _patient(ds: Dataset) -> tuple[str, str]:
    return (str(ds.get("PatientID", "") or "").strip(), str(ds.get("IssuerOfPatientID", "") or "").strip())


def _patient_columns(ds: Dataset) -> dict[str, object]:
    """Who and what the study imaged (from its first instance): DXA results are matched on the
    patient (groundtruth/), the site's validation is split by sex, age and manufacturer."""
    patient_id, issuer = _patient(ds)
    covariates = covariates_from_dataset(ds)
    return {"patient_id": patient_id[:64] or None, "issuer_of_patient_id": issuer[:64] or None,
            "patient_sex": covariates.sex, "patient_age": covariates.age_years,
            "manufacturer": _text(ds, "Manufacturer")}


def pixel_digest(source: Dataset | Path) -> str | None:
    """sha256 of the decoded pixels (shape, type and values of every frame), or None when they
    cannot be decoded. Equal for the same image in any lossless transfer syntax."""
    from pydicom.pixels import iter_pixels

    digest = hashlib.sha256()
    try:
        for decoded in iter_pixels(source):
            # Native byte order: big endian data decodes to the same values in a ">u2" array.
            frame = np.ascontiguousarray(decoded, dtype=decoded.dtype.newbyteorder("="))
            digest.update(f"{frame.shape}{frame.dtype.str}".encode())
            digest.update(frame.tobytes())
    except Exception:  # noqa: BLE001 - undecodable: the caller treats the pixels as different
        return None
    return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# -- storing -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Existing:
    study_uid: str
    series_uid: str
    sop_class: str
    sha256: str
    path: str
    purged: bool


class Ingestor:
    """Turns a received instance (a file in the spool's incoming folder) into a spooled file and
    SQL rows, or into a refusal."""

    def __init__(self, db: Database, spool: Spool, *, max_instance_bytes: int = DEFAULT_MAX_INSTANCE_BYTES) -> None:
        self.db = db
        self.spool = spool
        self.max_instance_bytes = max_instance_bytes

    def store(self, encoded: bytes, *, calling_ae: str | None = None,
              context_sop_class: str | None = None) -> StoredInstance:
        """Store an encoded Part 10 instance held in memory (tests, tools, replays)."""
        try:
            handle, path = self.spool.new_incoming()
            with handle:
                handle.write(encoded)
        except (OSError, SpoolError) as exc:
            raise RejectedInstance(OUT_OF_RESOURCES, f"spool write failed: {getattr(exc, 'strerror', None) or exc}") from exc
        try:
            return self.store_file(path, calling_ae=calling_ae, context_sop_class=context_sop_class)
        finally:
            path.unlink(missing_ok=True)

    def store_file(self, path: Path, *, calling_ae: str | None = None,
                   context_sop_class: str | None = None) -> StoredInstance:
        """Validate and store the received file at ``path`` (it is moved into the spool)."""
        size = path.stat().st_size
        if size > self.max_instance_bytes + 4096:
            raise RejectedInstance(OUT_OF_RESOURCES, f"instance larger than {self.max_instance_bytes // 2**20} MB")
        ds = read_received(path, self.max_instance_bytes)
        ident = identify(ds, context_sop_class)
        key = study_key(ident.study_uid)

        own = self._own_result(ds, ident)
        if own:
            return StoredInstance(ident.study_uid, ident.sop_uid, False, key, "own_result", own)
        if ident.sop_class not in ACCEPTED_SOP_CLASSES:
            name = OUT_OF_SCOPE_SOP_CLASSES.get(ident.sop_class, ident.sop_class)
            return StoredInstance(ident.study_uid, ident.sop_uid, False, key, "out_of_scope", name)

        study_uid, series_uid, sop_uid, sop_class = validate(ds, context_sop_class)
        relative = self.spool.instance_path(study_uid, series_uid, sop_uid)
        digest = _file_sha256(path)

        existing = self._existing(sop_uid)
        if existing is not None:
            duplicate = self._judge_existing(existing, ds, ident, digest)
            if duplicate:
                return StoredInstance(study_uid, sop_uid, True, key, "duplicate", duplicate)
        try:
            self.spool.adopt(path, relative)
        except SpoolError as exc:
            raise RejectedInstance(OUT_OF_RESOURCES, str(exc)) from exc

        tsyntax = str(ds.file_meta.TransferSyntaxUID)
        # Two associations may create the same study at once: on a unique-key race, retry.
        for attempt in range(5):
            try:
                self._record(ds, study_uid, series_uid, sop_uid, sop_class, tsyntax, relative.as_posix(),
                             size, digest, calling_ae)
                break
            except (IntegrityError, OperationalError) as exc:
                if attempt == 4:
                    raise RejectedInstance(OUT_OF_RESOURCES, f"database write failed: {type(exc).__name__}") from exc
        return StoredInstance(study_uid, sop_uid, duplicate=False, study_key=key)

    # -- integrity ---------------------------------------------------------------------------------

    def _own_result(self, ds: Dataset, ident: Identity) -> str | None:
        """Why this object is one of the gateway's own results (SR or result card), or None."""
        if str(ds.get("Manufacturer", "") or "").strip() == OWN_MANUFACTURER:
            return f"made by {OWN_MANUFACTURER}"
        if ident.sop_class in ACCEPTED_SOP_CLASSES:
            # Our result card says "OsteoGate"; an image class needs no lookup on every instance.
            return None
        with self.db.session() as session:
            row = session.execute(
                select(StudyResult.id).where(or_(StudyResult.sr_sop_instance_uid == ident.sop_uid,
                                                 StudyResult.sr_series_uid == ident.series_uid)).limit(1)
            ).first()
        return "an OsteoGate result (known SR or result series)" if row else None

    def _existing(self, sop_uid: str) -> _Existing | None:
        with self.db.session() as session:
            row = session.execute(
                select(Study.study_uid, Series.series_uid, Instance.sop_class_uid, Instance.sha256, Instance.path,
                       Instance.purged_at)
                .join(Study, Study.id == Instance.study_id).join(Series, Series.id == Instance.series_id)
                .where(Instance.sop_instance_uid == sop_uid)
            ).first()
        if row is None:
            return None
        return _Existing(row[0], row[1], row[2], row[3], row[4], row[5] is not None)

    def _judge_existing(self, existing: _Existing, ds: Dataset, ident: Identity, digest: str) -> str | None:
        """A reason when this instance duplicates the stored one; None when it replaces it.
        Raises RejectedInstance (UID_CONFLICT) when the UID already names another object."""
        conflict = None
        if existing.study_uid != ident.study_uid:
            conflict = "another study"
        elif existing.series_uid != ident.series_uid:
            conflict = "another series"
        elif existing.sop_class != ident.sop_class:
            conflict = "another SOP class"
        if existing.sha256 == digest and conflict is None:
            return "identical bytes"
        stored_path = self.spool.absolute(existing.path)
        stored = None
        if conflict is None and not existing.purged and stored_path.is_file():
            try:
                stored = pydicom.dcmread(stored_path, defer_size=_DEFER_BYTES)
            except Exception:  # noqa: BLE001 - an unreadable stored copy is replaced below
                stored = None
            if stored is not None and _patient(stored) != _patient(ds):
                conflict = "another patient"
        if conflict:
            log.warning("instance_uid_conflict", instance=hashed(ident.sop_uid), study_key=study_key(ident.study_uid),
                        stored_study_key=study_key(existing.study_uid), held_by=conflict)
            raise RejectedInstance(UID_CONFLICT, f"SOP Instance UID already stored for {conflict}")
        if stored is not None:
            new_pixels = pixel_digest(ds)
            if new_pixels is not None and new_pixels == pixel_digest(stored):
                if str(stored.file_meta.get("TransferSyntaxUID")) != str(ds.file_meta.get("TransferSyntaxUID")):
                    return "same pixels in another transfer syntax"
                return "same pixels, header re-encoded"
        return None

    def _record(
        self, ds: Dataset, study_uid: str, series_uid: str, sop_uid: str, sop_class: str, tsyntax: str,
        relative: str, size: int, digest: str, calling_ae: str | None,
    ) -> None:
        now = utcnow()
        with self.db.session(write=True) as session:
            study = session.execute(
                select(Study).where(Study.study_uid == study_uid).with_for_update()
            ).scalar_one_or_none()
            if study is None:
                study = Study(
                    study_uid=study_uid, study_key=study_key(study_uid), status=StudyStatus.RECEIVING,
                    version=1, modality=_text(ds, "Modality", 16), study_date=_text(ds, "StudyDate", 8),
                    description=_text(ds, "StudyDescription"), first_received_at=now, last_received_at=now,
                    instance_count=0, **_patient_columns(ds),
                )
                session.add(study)
                session.flush()
            elif study.status != StudyStatus.RECEIVING:
                # New material after (or during) processing: a new version will be processed and
                # a new SR sent once the study is quiet again.
                study.version += 1
                study.status = StudyStatus.RECEIVING
            study.last_received_at = now

            series = session.execute(select(Series).where(Series.series_uid == series_uid)).scalar_one_or_none()
            if series is None:
                series = Series(
                    study_id=study.id, series_uid=series_uid, modality=_text(ds, "Modality", 16),
                    body_part=_text(ds, "BodyPartExamined"), description=_text(ds, "SeriesDescription"),
                )
                session.add(series)
                session.flush()

            instance = session.execute(
                select(Instance).where(Instance.sop_instance_uid == sop_uid)
            ).scalar_one_or_none()
            if instance is None:
                instance = Instance(sop_instance_uid=sop_uid, study_id=study.id)
                session.add(instance)
                study.instance_count += 1
            instance.series_id = series.id
            instance.sop_class_uid = sop_class
            instance.transfer_syntax_uid = tsyntax
            instance.path = relative
            instance.size_bytes = size
            instance.sha256 = digest
            instance.calling_ae = calling_ae
            instance.received_at = now
            instance.purged_at = None
