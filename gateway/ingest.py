"""Accept one received instance: validate it, write it to the spool, record it in SQL.

Only after both the file and the row are durable does the SCP answer success. Every refusal
maps to a DICOM failure status (PS3.4 Annex B.2.3) so the modality knows to retry or give up.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from io import BytesIO

import pydicom
from osteogate.gateway.db import Database, Instance, Series, Study, StudyStatus, utcnow
from osteogate.gateway.logs import get_logger, study_key
from osteogate.gateway.spool import Spool, SpoolError
from osteogate.gateway.uids import InvalidUIDError, require_uid
from osteogate.model.pixels import PixelDecodeError, check_pixel_budget
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError, OperationalError

log = get_logger("osteogate.gateway.ingest")

# PS3.4 B.2.3 C-STORE status codes.
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000

ACCEPTED_SOP_CLASSES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.1": "CR",
    "1.2.840.10008.5.1.4.1.1.1.1": "DX for presentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "DX for processing",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture",
}

# Native (uncompressed) transfer syntaxes: for these the pixel data length can be checked exactly.
_NATIVE = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"}
MAX_PIXELS = 16384 * 16384


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
    duplicate: bool  # the same bytes were already stored: nothing changed
    study_key: str


def parse_encoded(encoded: bytes) -> Dataset:
    """Decode and fully parse a received dataset (file meta included) or raise RejectedInstance."""
    try:
        ds = pydicom.dcmread(BytesIO(encoded), force=False)
        # pydicom converts elements lazily: touch every top-level element now, so a truncated or
        # malformed element is found here rather than later in the worker.
        for _ in ds.iterall():
            pass
    except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, OSError) as exc:
        raise RejectedInstance(CANNOT_UNDERSTAND, f"dataset cannot be parsed: {type(exc).__name__}") from exc
    return ds


def validate(ds: Dataset, context_sop_class: str | None = None) -> tuple[str, str, str, str]:
    """Check what the gateway relies on; returns (study, series, sop instance, sop class) UIDs."""
    try:
        sop_class = require_uid(ds.get("SOPClassUID"), "SOPClassUID")
        sop_uid = require_uid(ds.get("SOPInstanceUID"), "SOPInstanceUID")
        study_uid = require_uid(ds.get("StudyInstanceUID"), "StudyInstanceUID")
        series_uid = require_uid(ds.get("SeriesInstanceUID"), "SeriesInstanceUID")
    except InvalidUIDError as exc:
        raise RejectedInstance(DATASET_DOES_NOT_MATCH_SOP_CLASS, str(exc)) from exc
    if sop_class not in ACCEPTED_SOP_CLASSES:
        raise RejectedInstance(DATASET_DOES_NOT_MATCH_SOP_CLASS, f"SOP class {sop_class} is not accepted")
    if context_sop_class and context_sop_class != sop_class:
        raise RejectedInstance(
            DATASET_DOES_NOT_MATCH_SOP_CLASS, "SOPClassUID differs from the presentation context"
        )
    if "PixelData" not in ds:
        raise RejectedInstance(DATASET_DOES_NOT_MATCH_SOP_CLASS, "no Pixel Data")
    rows, cols = _int(ds, "Rows"), _int(ds, "Columns")
    if rows <= 0 or cols <= 0:
        raise RejectedInstance(DATASET_DOES_NOT_MATCH_SOP_CLASS, "Rows/Columns missing or zero")
    frames = _int(ds, "NumberOfFrames", 1)
    if rows * cols * max(frames, 1) > MAX_PIXELS:
        raise RejectedInstance(DATASET_DOES_NOT_MATCH_SOP_CLASS, f"image too large ({rows}x{cols}x{frames})")
    tsyntax = str(ds.file_meta.get("TransferSyntaxUID", ""))
    if tsyntax in _NATIVE:
        bits = _int(ds, "BitsAllocated")
        samples = _int(ds, "SamplesPerPixel", 1)
        if bits not in (1, 8, 16, 32):
            raise RejectedInstance(DATASET_DOES_NOT_MATCH_SOP_CLASS, "BitsAllocated missing or invalid")
        expected = rows * cols * samples * max(frames, 1) * bits // 8
        actual = len(ds["PixelData"].value or b"")
        # Odd lengths are padded to even; anything shorter is a truncated image.
        if actual < expected:
            raise RejectedInstance(
                DATASET_DOES_NOT_MATCH_SOP_CLASS, f"Pixel Data is {actual} bytes, expected {expected}"
            )
    elif not ds["PixelData"].value:
        raise RejectedInstance(DATASET_DOES_NOT_MATCH_SOP_CLASS, "Pixel Data is empty")
    try:  # codestream's own size (JPEG SOF, J2K SIZ, JPEG-LS SOF55, RLE header) vs header and budget
        check_pixel_budget(ds)
    except PixelDecodeError as exc:
        raise RejectedInstance(DATASET_DOES_NOT_MATCH_SOP_CLASS, str(exc)) from exc
    return study_uid, series_uid, sop_uid, sop_class


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


class Ingestor:
    """Turns a received, encoded instance into a spooled file and SQL rows."""

    def __init__(self, db: Database, spool: Spool) -> None:
        self.db = db
        self.spool = spool

    def store(self, encoded: bytes, *, calling_ae: str | None = None, context_sop_class: str | None = None) -> StoredInstance:
        ds = parse_encoded(encoded)
        study_uid, series_uid, sop_uid, sop_class = validate(ds, context_sop_class)
        relative = self.spool.instance_path(study_uid, series_uid, sop_uid)
        digest = hashlib.sha256(encoded).hexdigest()
        key = study_key(study_uid)

        existing = self._existing_digest(sop_uid)
        if existing == digest:
            return StoredInstance(study_uid, sop_uid, duplicate=True, study_key=key)
        try:
            self.spool.write_atomic(relative, encoded)
        except SpoolError as exc:
            raise RejectedInstance(OUT_OF_RESOURCES, str(exc)) from exc

        tsyntax = UID(str(ds.file_meta.TransferSyntaxUID))
        # Two associations may create the same study at once: on a unique-key race, retry.
        for attempt in range(5):
            try:
                self._record(ds, study_uid, series_uid, sop_uid, sop_class, str(tsyntax), relative.as_posix(),
                             len(encoded), digest, calling_ae)
                break
            except (IntegrityError, OperationalError) as exc:
                if attempt == 4:
                    raise RejectedInstance(OUT_OF_RESOURCES, f"database write failed: {type(exc).__name__}") from exc
        return StoredInstance(study_uid, sop_uid, duplicate=False, study_key=key)

    def _existing_digest(self, sop_uid: str) -> str | None:
        with self.db.session() as session:
            return session.execute(
                select(Instance.sha256).where(Instance.sop_instance_uid == sop_uid)
            ).scalar_one_or_none()

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
                    instance_count=0,
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
