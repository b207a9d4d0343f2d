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

Parsing and validation: gateway/receive/validation.py; the rules for an instance that arrives
again (duplicates, UID conflicts, the gateway's own results): gateway/receive/integrity.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from osteogate.gateway.core.logs import study_key
from osteogate.gateway.receive.integrity import file_sha256, find_existing, judge_existing, own_result
from osteogate.gateway.receive.validation import (
    ACCEPTED_SOP_CLASSES,
    CANNOT_UNDERSTAND,
    DATASET_DOES_NOT_MATCH_SOP_CLASS,
    DEFAULT_MAX_INSTANCE_BYTES,
    OUT_OF_RESOURCES,
    OUT_OF_SCOPE_SOP_CLASSES,
    SUCCESS,
    UID_CONFLICT,
    RejectedInstance,
    identify,
    inflated_size,
    patient,
    read_received,
    text,
    validate,
)
from osteogate.gateway.store.db import Database, Instance, Series, Study, StudyStatus, utcnow
from osteogate.gateway.store.spool import Spool, SpoolError
from osteogate.model.covariates import covariates_from_dataset
from pydicom.dataset import Dataset
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError, OperationalError

# The names senders and tools used from this module before validation.py existed.
__all__ = ["ACCEPTED_SOP_CLASSES", "CANNOT_UNDERSTAND", "DATASET_DOES_NOT_MATCH_SOP_CLASS", "OUT_OF_RESOURCES",
           "OUT_OF_SCOPE_SOP_CLASSES", "SUCCESS", "UID_CONFLICT", "Ingestor", "RejectedInstance", "StoredInstance",
           "inflated_size"]


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


def _patient_columns(ds: Dataset) -> dict[str, object]:
    """Who and what the study imaged (from its first instance): DXA results are matched on the
    patient (groundtruth/), the site's validation is split by sex, age and manufacturer."""
    patient_id, issuer = patient(ds)
    covariates = covariates_from_dataset(ds)
    return {"patient_id": patient_id[:64] or None, "issuer_of_patient_id": issuer[:64] or None,
            "patient_sex": covariates.sex, "patient_age": covariates.age_years,
            "manufacturer": text(ds, "Manufacturer")}



# -- storing -------------------------------------------------------------------------------------------


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

        own = own_result(self.db, ds, ident)
        if own:
            return StoredInstance(ident.study_uid, ident.sop_uid, False, key, "own_result", own)
        if ident.sop_class not in ACCEPTED_SOP_CLASSES:
            name = OUT_OF_SCOPE_SOP_CLASSES.get(ident.sop_class, ident.sop_class)
            return StoredInstance(ident.study_uid, ident.sop_uid, False, key, "out_of_scope", name)

        study_uid, series_uid, sop_uid, sop_class = validate(ds, context_sop_class)
        relative = self.spool.instance_path(study_uid, series_uid, sop_uid)
        digest = file_sha256(path)

        existing = find_existing(self.db, sop_uid)
        if existing is not None:
            duplicate = judge_existing(self.spool, existing, ds, ident, digest)
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
                    version=1, modality=text(ds, "Modality", 16), study_date=text(ds, "StudyDate", 8),
                    description=text(ds, "StudyDescription"), first_received_at=now, last_received_at=now,
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
                    study_id=study.id, series_uid=series_uid, modality=text(ds, "Modality", 16),
                    body_part=text(ds, "BodyPartExamined"), description=text(ds, "SeriesDescription"),
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
