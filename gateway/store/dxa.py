"""Ground truth rows: DXA exams received from the site (HL7 ORU, CSV import) and their sites.

One exam per patient and day (``exam_key``): the same result sent twice, or a CSV imported
again, finds its row instead of adding one, and a corrected result replaces the sites of the
exam it corrects. Each measured site is kept; the lowest T-score of the exam defines its WHO
category (model/taxonomy.py cut-offs). Patient identifiers live here as in ``studies``: in SQL
only, never in logs.
"""

from __future__ import annotations

import hashlib
from datetime import date, datetime

from osteogate.gateway.store.db import Base, utcnow
from sqlalchemy import Date, Float, ForeignKey, Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column, relationship

SOURCES = ("hl7", "csv", "dicom")


def exam_key(patient_id: str, issuer_of_patient_id: str | None, dxa_date: date) -> str:
    """The identity of one DXA exam: patient (with issuer, empty when unknown) and day.

    A plain (unsalted) digest, because it is a database key that must not change when the log
    salt does; it never leaves the database.
    """
    text = "\x1f".join((patient_id, issuer_of_patient_id or "", dxa_date.isoformat()))
    return hashlib.sha256(text.encode()).hexdigest()[:40]


class DxaExam(Base):
    """One DXA exam of one patient on one day, from whichever source told us first."""

    __tablename__ = "dxa_exams"
    __table_args__ = (UniqueConstraint("exam_key", name="uq_dxa_exams_exam_key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    exam_key: Mapped[str] = mapped_column(String(40))
    patient_id: Mapped[str] = mapped_column(String(64), index=True)
    issuer_of_patient_id: Mapped[str | None] = mapped_column(String(64))
    dxa_date: Mapped[date] = mapped_column(Date, index=True)
    source: Mapped[str] = mapped_column(String(8))  # hl7 | csv | dicom
    # Message control ID (HL7) or file name and line (CSV) of what last set the sites.
    source_ref: Mapped[str] = mapped_column(String(200))
    lowest_t_score: Mapped[float] = mapped_column(Float)
    who_category: Mapped[str] = mapped_column(String(16))  # model.taxonomy.CLASSES
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)

    sites: Mapped[list[DxaSite]] = relationship(
        back_populates="exam", cascade="all, delete-orphan", order_by="DxaSite.id"
    )


class DxaSite(Base):
    """One measured site of an exam (lumbar spine, total hip, femoral neck, forearm ...)."""

    __tablename__ = "dxa_sites"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    exam_id: Mapped[int] = mapped_column(ForeignKey("dxa_exams.id", ondelete="CASCADE"), index=True)
    site_code: Mapped[str | None] = mapped_column(String(32))  # LOINC code (HL7); None from CSV
    site: Mapped[str] = mapped_column(String(64))  # the sender's name for the site
    t_score: Mapped[float] = mapped_column(Float)

    exam: Mapped[DxaExam] = relationship(back_populates="sites")
