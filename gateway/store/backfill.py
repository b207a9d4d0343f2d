"""SQL tables of the archive backfill (gateway/backfill): the plan and each study's state.

A backfill run asks a PACS which studies match (C-FIND or QIDO-RS), writes each one here as
``found``, then retrieves them one at a time into the gateway's own listener. Every step is a row
update, so a killed command (or gateway) continues where it stopped when run again, and a study
that is already screened is never fetched twice.

No patient data is stored here: the Study Instance UID (also in ``studies``), its study date and
modalities, and the series to fetch.
"""

from __future__ import annotations

import enum
from datetime import datetime

from osteogate.gateway.store.db import Base, utcnow
from sqlalchemy import JSON, Enum, ForeignKey, Integer, String, Text, select
from sqlalchemy.orm import Mapped, Session, mapped_column


class BackfillState(enum.StrEnum):
    FOUND = "found"  # matched the query; not yet retrieved
    RETRIEVING = "retrieving"  # a C-MOVE / C-GET / WADO-RS retrieve is (or was, if killed) under way
    RECEIVED = "received"  # the PACS sent it; the gateway screens it like any other study
    SCREENED = "screened"  # the gateway has a result for it (made by the current model)
    SKIPPED = "skipped"  # matched the study query, but no series fits (e.g. body part)
    FAILED = "failed"  # a permanent refusal, or out of attempts: ``reason`` says which


def _state_enum() -> Enum:
    # Plain strings, as the other status columns of gateway/store/db.py: no ALTER TYPE ever.
    return Enum(BackfillState, native_enum=False, length=16, values_callable=lambda e: [m.value for m in e])


class BackfillRun(Base):
    """One backfill command (or scheduled run): its source and filters, and the query chunks
    already asked, so a resumed run does not query the PACS again for them."""

    __tablename__ = "backfill_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    source: Mapped[str] = mapped_column(String(255))  # AET@HOST:PORT or the DICOMweb URL
    # The same source and filters -> the same fingerprint: an unfinished run is resumed.
    fingerprint: Mapped[str] = mapped_column(String(64), index=True)
    filters: Mapped[dict] = mapped_column(JSON, default=dict)
    chunks_done: Mapped[list[str]] = mapped_column(JSON, default=list)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column()
    # Who is running it (pid@host) until when: one backfill at a time per store, renewed while alive,
    # so a killed run's hold simply expires.
    holder: Mapped[str | None] = mapped_column(String(64))
    held_until: Mapped[datetime | None] = mapped_column()


class BackfillStudy(Base):
    """One study of the plan and where it stands."""

    __tablename__ = "backfill_studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(64), unique=True)
    study_key: Mapped[str] = mapped_column(String(32), index=True)
    run_id: Mapped[int | None] = mapped_column(ForeignKey("backfill_runs.id", ondelete="SET NULL"), index=True)
    source: Mapped[str] = mapped_column(String(255))
    state: Mapped[BackfillState] = mapped_column(_state_enum(), default=BackfillState.FOUND, index=True)
    reason: Mapped[str | None] = mapped_column(Text)
    study_date: Mapped[str | None] = mapped_column(String(8))
    modalities: Mapped[str | None] = mapped_column(String(64))
    # Series to retrieve when only some fit the filters (body part); None: the whole study.
    series_uids: Mapped[list[str] | None] = mapped_column(JSON)
    instances_expected: Mapped[int | None] = mapped_column(Integer)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_attempt_at: Mapped[datetime | None] = mapped_column()  # when the latest retrieve started
    found_at: Mapped[datetime] = mapped_column(default=utcnow)
    retrieved_at: Mapped[datetime | None] = mapped_column(index=True)
    screened_at: Mapped[datetime | None] = mapped_column()
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


def is_backfilled(session: Session, study_uid: str) -> bool:
    """Whether ``study_uid`` came in through a backfill (the worker withholds its delivery when
    ``backfill.deliver`` is false)."""
    found = session.execute(
        select(BackfillStudy.id).where(BackfillStudy.study_uid == study_uid,
                                       BackfillStudy.state.in_([BackfillState.RETRIEVING, BackfillState.RECEIVED,
                                                                BackfillState.SCREENED]))
    ).first()
    return found is not None
