"""SQL store: what was received, what was computed, what was delivered.

SQLite (WAL) is the embedded default; PostgreSQL works through the same URL setting. All times
are timezone-aware UTC.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    select,
    text,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, sessionmaker


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(value: datetime) -> datetime:
    """SQLite hands back naive datetimes; everything stored is UTC, so say so."""
    return value if value.tzinfo else value.replace(tzinfo=UTC)


class StudyStatus(enum.StrEnum):
    RECEIVING = "receiving"  # instances arriving; not yet stable
    QUEUED = "queued"  # a classify job is pending
    PROCESSING = "processing"
    DONE = "done"  # classified, SR made
    SKIPPED = "skipped"  # nothing in scope to classify; SR still states why
    FAILED = "failed"


# A study in one of these has its outcome: replay, resend and backfill may act on it.
STUDY_FINISHED = (StudyStatus.DONE, StudyStatus.SKIPPED, StudyStatus.FAILED)


class JobStatus(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class DeliveryStatus(enum.StrEnum):
    PENDING = "pending"
    SENT = "sent"
    REJECTED = "rejected"  # permanent refusal by the peer: not retried blindly
    HELD = "held"  # the site gate (shadow mode) holds it until the site's validation opens the gate
    # Held, then superseded by a newer result of the study before the gate opened: never sent, so
    # never named as a predecessor by a later SR.
    WITHDRAWN = "withdrawn"


def _enum(cls: type[enum.Enum]) -> Enum:
    # Stored as plain strings (no native ENUM type) so migrations never need ALTER TYPE.
    return Enum(cls, native_enum=False, length=16, values_callable=lambda e: [m.value for m in e])


class Base(DeclarativeBase):
    type_annotation_map = {datetime: DateTime(timezone=True)}


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(64), unique=True)
    study_key: Mapped[str] = mapped_column(String(32), index=True)
    status: Mapped[StudyStatus] = mapped_column(_enum(StudyStatus), default=StudyStatus.RECEIVING, index=True)
    # Bumped whenever the set of instances changes; each processing run records the version it saw.
    version: Mapped[int] = mapped_column(Integer, default=1)
    modality: Mapped[str | None] = mapped_column(String(16))
    study_date: Mapped[str | None] = mapped_column(String(8))
    description: Mapped[str | None] = mapped_column(String(64))
    first_received_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_received_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    # Who and what was imaged, from the first instance, for matching DXA results (groundtruth/)
    # and for the site's validation by sex, age and manufacturer. PHI stays in SQL, never in logs.
    patient_id: Mapped[str | None] = mapped_column(String(64), index=True)
    issuer_of_patient_id: Mapped[str | None] = mapped_column(String(64))
    patient_sex: Mapped[str | None] = mapped_column(String(1))  # F | M | O (model/covariates.py)
    patient_age: Mapped[float | None] = mapped_column(Float)  # years at the study
    manufacturer: Mapped[str | None] = mapped_column(String(64))

    series: Mapped[list[Series]] = relationship(back_populates="study", cascade="all, delete-orphan")
    instances: Mapped[list[Instance]] = relationship(back_populates="study", cascade="all, delete-orphan")
    jobs: Mapped[list[Job]] = relationship(back_populates="study", cascade="all, delete-orphan")
    results: Mapped[list[StudyResult]] = relationship(
        back_populates="study", cascade="all, delete-orphan", order_by="StudyResult.version"
    )


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    series_uid: Mapped[str] = mapped_column(String(64), unique=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    body_part: Mapped[str | None] = mapped_column(String(64))
    description: Mapped[str | None] = mapped_column(String(64))

    study: Mapped[Study] = relationship(back_populates="series")


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)  # relative to the spool directory
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Set when retention removed the spooled file; the row stays as the record of what came in.
    purged_at: Mapped[datetime | None] = mapped_column()

    study: Mapped[Study] = relationship(back_populates="instances")


class Job(Base):
    """One classification run of one study version. Leases let another worker take over."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    study_version: Mapped[int] = mapped_column(Integer)
    status: Mapped[JobStatus] = mapped_column(_enum(JobStatus), default=JobStatus.PENDING, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    reason: Mapped[str] = mapped_column(String(32), default="stable")  # stable | replay
    model_path: Mapped[str | None] = mapped_column(Text)  # replay with another checkpoint
    # A replay's ``--to`` (destination strings): where this job's result goes instead of the
    # configured destinations, whichever process runs the job (0008).
    destinations: Mapped[list[str] | None] = mapped_column(JSON)
    worker: Mapped[str | None] = mapped_column(String(64))
    lease_until: Mapped[datetime | None] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()
    error: Mapped[str | None] = mapped_column(Text)

    study: Mapped[Study] = relationship(back_populates="jobs")


class StudyResult(Base):
    """The outcome of one processing run, and the SR made from it."""

    __tablename__ = "study_results"
    __table_args__ = (UniqueConstraint("study_id", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), unique=True)
    version: Mapped[int] = mapped_column(Integer)  # 1, 2, ...: also the SR InstanceNumber
    status: Mapped[StudyStatus] = mapped_column(_enum(StudyStatus))
    region: Mapped[str | None] = mapped_column(String(16))
    # What the model reported (model.assessment.Assessment): no label, probabilities or T-score
    # unless assessed; otherwise the reason. None/empty when nothing in the study was in scope.
    assessed: Mapped[bool | None] = mapped_column(Boolean)
    reason: Mapped[str | None] = mapped_column(Text)
    label: Mapped[str | None] = mapped_column(String(16))  # the WHO category of the estimate
    # Keyed by class name (model.taxonomy.CLASSES is the one source of truth), full precision.
    probabilities: Mapped[dict[str, float] | None] = mapped_column(JSON)
    t_score: Mapped[float | None] = mapped_column(Float)
    t_score_low: Mapped[float | None] = mapped_column(Float)  # 80 % prediction interval
    t_score_high: Mapped[float | None] = mapped_column(Float)
    # The screening decision ("DXA referral suggested" / "below the referral threshold") and the
    # threshold on P(T < -1.0) behind it, as reported: the site's validation checks exactly these.
    decision: Mapped[str | None] = mapped_column(String(32))
    referral_threshold: Mapped[float | None] = mapped_column(Float)
    inputs_used: Mapped[list[str] | None] = mapped_column(JSON)  # names from taxonomy.INPUTS
    inputs_missing: Mapped[list[str] | None] = mapped_column(JSON)
    notes: Mapped[list[str] | None] = mapped_column(JSON)  # the reasons the SR and card give (0009)
    # The model's figures of a result the site gate reported as not assessed ("required" mode):
    # label, probabilities, t_score(_low/_high), decision; for the site's validation only (0006).
    withheld: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    model_name: Mapped[str] = mapped_column(String(128))
    model_version: Mapped[str] = mapped_column(String(32))
    model_sha256: Mapped[str] = mapped_column(String(64))
    backend: Mapped[str] = mapped_column(String(32))
    timings: Mapped[dict] = mapped_column(JSON, default=dict)
    # No SR when nothing in the study was in scope (e.g. a chest film): the reason is in images.
    sr_sop_instance_uid: Mapped[str | None] = mapped_column(String(64), unique=True)
    sr_series_uid: Mapped[str | None] = mapped_column(String(64))
    sr_path: Mapped[str | None] = mapped_column(Text)  # relative to the reports directory
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    study: Mapped[Study] = relationship(back_populates="results")
    images: Mapped[list[ImageResult]] = relationship(back_populates="result", cascade="all, delete-orphan")
    deliveries: Mapped[list[Delivery]] = relationship(back_populates="result", cascade="all, delete-orphan")
    # What a delivery sends, in order (the SR, then the result card): all or nothing.
    objects: Mapped[list[ResultObject]] = relationship(
        back_populates="result", cascade="all, delete-orphan", order_by="ResultObject.position"
    )


class ResultObject(Base):
    """One DICOM object made for a result (SR or result card), stored under the reports directory."""

    __tablename__ = "result_objects"
    __table_args__ = (UniqueConstraint("result_id", "position"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("study_results.id", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(Integer)  # send order: 0 = the SR
    kind: Mapped[str] = mapped_column(String(16))  # "sr" | "card"
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    series_uid: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)  # relative to the reports directory

    result: Mapped[StudyResult] = relationship(back_populates="objects")


class ImageResult(Base):
    __tablename__ = "image_results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("study_results.id", ondelete="CASCADE"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))  # classified (scored by the model) | skipped
    assessed: Mapped[bool | None] = mapped_column(Boolean)  # None when skipped (never scored)
    reason: Mapped[str | None] = mapped_column(Text)  # why skipped, or why not assessed
    region: Mapped[str | None] = mapped_column(String(16))
    label: Mapped[str | None] = mapped_column(String(16))
    probabilities: Mapped[dict[str, float] | None] = mapped_column(JSON)  # reported, when assessed
    decode_ms: Mapped[float | None] = mapped_column(Float)

    result: Mapped[StudyResult] = relationship(back_populates="images")


class Delivery(Base):
    __tablename__ = "deliveries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("study_results.id", ondelete="CASCADE"), index=True)
    destination: Mapped[str] = mapped_column(String(128))  # AET@HOST:PORT
    status: Mapped[DeliveryStatus] = mapped_column(
        _enum(DeliveryStatus), default=DeliveryStatus.PENDING, index=True
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column()
    # Claimed by one sender at a time (a lease, so a crashed sender's claim expires).
    claimed_until: Mapped[datetime | None] = mapped_column()

    result: Mapped[StudyResult] = relationship(back_populates="deliveries")


def _sqlite_pragmas(dbapi_conn: object, _record: object) -> None:
    cursor = dbapi_conn.cursor()  # type: ignore[attr-defined]
    # WAL lets the worker read while the SCP writes; synchronous=FULL because an acknowledged
    # instance must survive power loss; busy_timeout rides out short write contention.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


class Database:
    """Engine + session factory for one database URL."""

    def __init__(self, url: str) -> None:
        self.url = url
        if url.startswith("sqlite"):
            self.engine: Engine = create_engine(
                url, connect_args={"check_same_thread": False, "timeout": 30}, pool_pre_ping=True
            )
            event.listen(self.engine, "connect", _sqlite_pragmas)
        else:
            self.engine = create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=10)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @property
    def is_postgres(self) -> bool:
        return self.engine.dialect.name == "postgresql"

    def create_schema(self) -> None:
        """Tables straight from the models (unit tests); the gateway itself uses ``migrate``."""
        Base.metadata.create_all(self.engine)

    def migrate(self) -> tuple[str | None, str]:
        """Alembic ``upgrade head`` (stamping a pre-migration schema first); (before, after)."""
        from osteogate.gateway.store.migrations import upgrade

        return upgrade(self.engine, Base.metadata)

    @contextmanager
    def session(self, *, write: bool = False) -> Iterator[Session]:
        """A unit of work: committed on success, rolled back on any exception.

        ``write=True`` is for read-modify-write work: on SQLite the transaction then starts with
        BEGIN IMMEDIATE, so its reads are already under the write lock (pysqlite would otherwise
        begin only at the first UPDATE, after the reads, and concurrent writers lose updates).
        PostgreSQL callers lock rows with SELECT ... FOR UPDATE instead.
        """
        with self._sessions() as session:
            try:
                if write and self.engine.dialect.name == "sqlite":
                    session.execute(text("BEGIN IMMEDIATE"))
                yield session
                session.commit()
            except BaseException:
                session.rollback()
                raise

    def claim_one(self, session: Session, model: type[Base], claimable: Any, order_by: Any,
                  values: dict[str, Any]) -> int | None:
        """Claim the first row of ``model`` matching ``claimable``; returns its id or None.

        SKIP LOCKED (PostgreSQL) lets concurrent claimers pass over each other's rows; the
        conditional UPDATE is what makes the claim exclusive everywhere, SQLite included: a row
        someone else claimed first no longer matches ``claimable`` and updates nothing.
        """
        query = select(model.id).where(claimable).order_by(order_by).limit(1)  # type: ignore[attr-defined]
        if self.is_postgres:
            query = query.with_for_update(skip_locked=True)
        row_id = session.execute(query).scalar_one_or_none()
        if row_id is None:
            return None
        claimed = session.execute(
            update(model).where(model.id == row_id, claimable).values(**values)  # type: ignore[attr-defined]
        ).rowcount
        return row_id if claimed == 1 else None

    def ping(self) -> bool:
        with self.session() as session:
            return session.execute(select(1)).scalar() == 1

    def dispose(self) -> None:
        self.engine.dispose()
