"""Ground truth from the site: DXA exams and their sites; who and what a study imaged.

* dxa_exams / dxa_sites: DXA results received over HL7 (ORU^R01) or imported from CSV.
* studies: patient_id, issuer_of_patient_id (matching DXA results to screened studies),
  patient_sex, patient_age, manufacturer (the site's validation by subgroup). Existing studies
  keep NULL there: their instances were received before these were recorded.
* study_results: decision and referral_threshold (the screening decision as reported; NULL for
  earlier results, whose label already carried the decision).

Revision ID: 0005_groundtruth
Revises: 0004_report
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_groundtruth"
down_revision = "0004_report"
branch_labels = None
depends_on = None

_STUDY_COLUMNS = (
    ("patient_id", sa.String(64)),
    ("issuer_of_patient_id", sa.String(64)),
    ("patient_sex", sa.String(1)),
    ("patient_age", sa.Float()),
    ("manufacturer", sa.String(64)),
)


def upgrade() -> None:
    op.create_table(
        "dxa_exams",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("exam_key", sa.String(40), nullable=False),
        sa.Column("patient_id", sa.String(64), nullable=False),
        sa.Column("issuer_of_patient_id", sa.String(64), nullable=True),
        sa.Column("dxa_date", sa.Date(), nullable=False),
        sa.Column("source", sa.String(8), nullable=False),
        sa.Column("source_ref", sa.String(200), nullable=False),
        sa.Column("lowest_t_score", sa.Float(), nullable=False),
        sa.Column("who_category", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("exam_key", name="uq_dxa_exams_exam_key"),
    )
    op.create_index("ix_dxa_exams_patient_id", "dxa_exams", ["patient_id"])
    op.create_index("ix_dxa_exams_dxa_date", "dxa_exams", ["dxa_date"])
    op.create_table(
        "dxa_sites",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("exam_id", sa.Integer(), sa.ForeignKey("dxa_exams.id", ondelete="CASCADE"), nullable=False),
        sa.Column("site_code", sa.String(32), nullable=True),
        sa.Column("site", sa.String(64), nullable=False),
        sa.Column("t_score", sa.Float(), nullable=False),
    )
    op.create_index("ix_dxa_sites_exam_id", "dxa_sites", ["exam_id"])
    with op.batch_alter_table("studies", schema=None) as batch_op:
        for name, type_ in _STUDY_COLUMNS:
            batch_op.add_column(sa.Column(name, type_, nullable=True))
        batch_op.create_index("ix_studies_patient_id", ["patient_id"])
    with op.batch_alter_table("study_results", schema=None) as batch_op:
        batch_op.add_column(sa.Column("decision", sa.String(32), nullable=True))
        batch_op.add_column(sa.Column("referral_threshold", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("study_results", schema=None) as batch_op:
        batch_op.drop_column("referral_threshold")
        batch_op.drop_column("decision")
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.drop_index("ix_studies_patient_id")
        for name, _ in reversed(_STUDY_COLUMNS):
            batch_op.drop_column(name)
    op.drop_index("ix_dxa_sites_exam_id", table_name="dxa_sites")
    op.drop_table("dxa_sites")
    op.drop_index("ix_dxa_exams_dxa_date", table_name="dxa_exams")
    op.drop_index("ix_dxa_exams_patient_id", table_name="dxa_exams")
    op.drop_table("dxa_exams")
