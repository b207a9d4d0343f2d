"""The integrity rules for an instance that arrives again (README, CONFORMANCE.md 3.2.2.3):

* a SOP Instance UID already stored under another study, series, SOP class or patient is refused
  (``UID_CONFLICT``) and logged: the stored instance keeps its place;
* the same instance again is a duplicate (success, nothing changes, no new version) when its bytes
  are identical, or when it carries the same UIDs and patient and its decoded pixels are identical
  (the same image in another transfer syntax, or re-encoded by a router);
* the same UIDs with different pixels replace the stored copy and reopen the study;
* the gateway's own results (SR, result card) coming back are recognised and not stored.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from osteogate.gateway.core.logs import get_logger, hashed, study_key
from osteogate.gateway.receive.validation import (
    _DEFER_BYTES,
    ACCEPTED_SOP_CLASSES,
    OWN_MANUFACTURER,
    UID_CONFLICT,
    Identity,
    RejectedInstance,
    patient,
)
from osteogate.gateway.store.db import Database, Instance, Series, Study, StudyResult
from osteogate.gateway.store.spool import Spool
from osteogate.model.pixels import is_decoder_panic
from pydicom.dataset import Dataset
from sqlalchemy import or_, select

log = get_logger("osteogate.gateway.receive.ingest")

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
    except BaseException as exc:  # a decoder plugin's panic (model.pixels.is_decoder_panic)
        if not is_decoder_panic(exc):
            raise
        return None
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class Existing:
    study_uid: str
    series_uid: str
    sop_class: str
    sha256: str
    path: str
    purged: bool


def own_result(db: Database, ds: Dataset, ident: Identity) -> str | None:
    """Why this object is one of the gateway's own results (SR or result card), or None."""
    if str(ds.get("Manufacturer", "") or "").strip() == OWN_MANUFACTURER:
        return f"made by {OWN_MANUFACTURER}"
    if ident.sop_class in ACCEPTED_SOP_CLASSES:
        # Our result card says "OsteoGate"; an image class needs no lookup on every instance.
        return None
    with db.session() as session:
        row = session.execute(
            select(StudyResult.id).where(or_(StudyResult.sr_sop_instance_uid == ident.sop_uid,
                                             StudyResult.sr_series_uid == ident.series_uid)).limit(1)
        ).first()
    return "an OsteoGate result (known SR or result series)" if row else None

def find_existing(db: Database, sop_uid: str) -> Existing | None:
    """The stored instance with this SOP Instance UID, or None."""
    with db.session() as session:
        row = session.execute(
            select(Study.study_uid, Series.series_uid, Instance.sop_class_uid, Instance.sha256, Instance.path,
                   Instance.purged_at)
            .join(Study, Study.id == Instance.study_id).join(Series, Series.id == Instance.series_id)
            .where(Instance.sop_instance_uid == sop_uid)
        ).first()
    if row is None:
        return None
    return Existing(row[0], row[1], row[2], row[3], row[4], row[5] is not None)

def judge_existing(spool: Spool, existing: Existing, ds: Dataset, ident: Identity, digest: str) -> str | None:
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
    stored_path = spool.absolute(existing.path)
    stored = None
    if conflict is None and not existing.purged and stored_path.is_file():
        try:
            stored = pydicom.dcmread(stored_path, defer_size=_DEFER_BYTES)
        except Exception:  # noqa: BLE001 - an unreadable stored copy is replaced below
            stored = None
        if stored is not None and patient(stored) != patient(ds):
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
