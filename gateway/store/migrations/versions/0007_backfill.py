"""The archive backfill's plan and per-study state (gateway/store/backfill.py).

* backfill_runs: one row a backfill run (source, filters, query chunks already asked, who holds it).
* backfill_studies: one row a study found in the archive: found, retrieving, received, screened,
  skipped or failed (with the reason), attempts and when to try again.

Revision ID: 0007_backfill
Revises: 0009_estimand
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007_backfill"
down_revision = "0009_estimand"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "backfill_runs",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("source", sa.String(255), nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("filters", sa.JSON(), nullable=False),
        sa.Column("chunks_done", sa.JSON(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("holder", sa.String(64), nullable=True),
        sa.Column("held_until", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_backfill_runs_fingerprint", "backfill_runs", ["fingerprint"])
    op.create_table(
        "backfill_studies",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("study_uid", sa.String(64), nullable=False, unique=True),
        sa.Column("study_key", sa.String(32), nullable=False),
        sa.Column("run_id", sa.Integer(), sa.ForeignKey("backfill_runs.id", ondelete="SET NULL"), nullable=True),
        sa.Column("source", sa.String(255), nullable=False),
        sa.Column("state", sa.Enum("found", "retrieving", "received", "screened", "skipped", "failed",
                                   name="backfillstate", native_enum=False, length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("study_date", sa.String(8), nullable=True),
        sa.Column("modalities", sa.String(64), nullable=True),
        sa.Column("series_uids", sa.JSON(), nullable=True),
        sa.Column("instances_expected", sa.Integer(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("found_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("retrieved_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("screened_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_backfill_studies_study_key", "backfill_studies", ["study_key"])
    op.create_index("ix_backfill_studies_run_id", "backfill_studies", ["run_id"])
    op.create_index("ix_backfill_studies_state", "backfill_studies", ["state"])
    op.create_index("ix_backfill_studies_retrieved_at", "backfill_studies", ["retrieved_at"])


def downgrade() -> None:
    op.drop_table("backfill_studies")
    op.drop_table("backfill_runs")
