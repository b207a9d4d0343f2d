"""Initial schema: the tables gateway.store.db defined before migrations existed (create_all).

Revision ID: 0001_initial
Revises: (none)
Create Date: 2026-11-27 02:46:16.205643
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001_initial"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table("studies",
    sa.Column("id", sa.Integer(), nullable=False),
    sa.Column("study_uid", sa.String(length=64), nullable=False),
    sa.Column("study_key", sa.String(length=32), nullable=False),
    sa.Column("status", sa.Enum("receiving", "queued", "processing", "done", "skipped", "failed", name="studystatus", native_enum=False, length=16), nullable=False),
    sa.Column("version", sa.Integer(), nullable=False),
    sa.Column("modality", sa.String(length=16), nullable=True),
    sa.Column("study_date", sa.String(length=8), nullable=True),
    sa.Column("description", sa.String(length=64), nullable=True),
    sa.Column("first_received_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("last_received_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("instance_count", sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint("id"),
    sa.UniqueConstraint("study_uid")
    )
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_studies_last_received_at"), ["last_received_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_studies_status"), ["status"], unique=False)
        batch_op.create_index(batch_op.f("ix_studies_study_key"), ["study_key"], unique=False)

    op.create_table("jobs",
    sa.Column("id", sa.Integer(), nullable=False),
    sa.Column("study_id", sa.Integer(), nullable=False),
    sa.Column("study_version", sa.Integer(), nullable=False),
    sa.Column("status", sa.Enum("pending", "running", "done", "failed", name="jobstatus", native_enum=False, length=16), nullable=False),
    sa.Column("attempts", sa.Integer(), nullable=False),
    sa.Column("reason", sa.String(length=32), nullable=False),
    sa.Column("model_path", sa.Text(), nullable=True),
    sa.Column("worker", sa.String(length=64), nullable=True),
    sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("error", sa.Text(), nullable=True),
    sa.ForeignKeyConstraint(["study_id"], ["studies.id"], ondelete="CASCADE"),
    sa.PrimaryKeyConstraint("id")
    )
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_jobs_status"), ["status"], unique=False)
        batch_op.create_index(batch_op.f("ix_jobs_study_id"), ["study_id"], unique=False)

    op.create_table("series",
    sa.Column("id", sa.Integer(), nullable=False),
    sa.Column("study_id", sa.Integer(), nullable=False),
    sa.Column("series_uid", sa.String(length=64), nullable=False),
    sa.Column("modality", sa.String(length=16), nullable=True),
    sa.Column("body_part", sa.String(length=64), nullable=True),
    sa.Column("description", sa.String(length=64), nullable=True),
    sa.ForeignKeyConstraint(["study_id"], ["studies.id"], ondelete="CASCADE"),
    sa.PrimaryKeyConstraint("id"),
    sa.UniqueConstraint("series_uid")
    )
    with op.batch_alter_table("series", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_series_study_id"), ["study_id"], unique=False)

    op.create_table("instances",
    sa.Column("id", sa.Integer(), nullable=False),
    sa.Column("study_id", sa.Integer(), nullable=False),
    sa.Column("series_id", sa.Integer(), nullable=False),
    sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
    sa.Column("sop_class_uid", sa.String(length=64), nullable=False),
    sa.Column("transfer_syntax_uid", sa.String(length=64), nullable=False),
    sa.Column("path", sa.Text(), nullable=False),
    sa.Column("size_bytes", sa.BigInteger(), nullable=False),
    sa.Column("sha256", sa.String(length=64), nullable=False),
    sa.Column("calling_ae", sa.String(length=16), nullable=True),
    sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(["series_id"], ["series.id"], ondelete="CASCADE"),
    sa.ForeignKeyConstraint(["study_id"], ["studies.id"], ondelete="CASCADE"),
    sa.PrimaryKeyConstraint("id"),
    sa.UniqueConstraint("sop_instance_uid")
    )
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_instances_series_id"), ["series_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_instances_study_id"), ["study_id"], unique=False)

    op.create_table("study_results",
    sa.Column("id", sa.Integer(), nullable=False),
    sa.Column("study_id", sa.Integer(), nullable=False),
    sa.Column("job_id", sa.Integer(), nullable=False),
    sa.Column("version", sa.Integer(), nullable=False),
    sa.Column("status", sa.Enum("receiving", "queued", "processing", "done", "skipped", "failed", name="studystatus", native_enum=False, length=16), nullable=False),
    sa.Column("region", sa.String(length=16), nullable=True),
    sa.Column("label", sa.String(length=16), nullable=True),
    sa.Column("p_normal", sa.Float(), nullable=True),
    sa.Column("p_osteopenia", sa.Float(), nullable=True),
    sa.Column("p_osteoporosis", sa.Float(), nullable=True),
    sa.Column("model_name", sa.String(length=128), nullable=False),
    sa.Column("model_version", sa.String(length=32), nullable=False),
    sa.Column("model_sha256", sa.String(length=64), nullable=False),
    sa.Column("backend", sa.String(length=32), nullable=False),
    sa.Column("timings", sa.JSON(), nullable=False),
    sa.Column("sr_sop_instance_uid", sa.String(length=64), nullable=True),
    sa.Column("sr_series_uid", sa.String(length=64), nullable=True),
    sa.Column("sr_path", sa.Text(), nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], ),
    sa.ForeignKeyConstraint(["study_id"], ["studies.id"], ondelete="CASCADE"),
    sa.PrimaryKeyConstraint("id"),
    sa.UniqueConstraint("job_id"),
    sa.UniqueConstraint("sr_sop_instance_uid"),
    sa.UniqueConstraint("study_id", "version")
    )
    with op.batch_alter_table("study_results", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_study_results_study_id"), ["study_id"], unique=False)

    op.create_table("deliveries",
    sa.Column("id", sa.Integer(), nullable=False),
    sa.Column("result_id", sa.Integer(), nullable=False),
    sa.Column("destination", sa.String(length=128), nullable=False),
    sa.Column("status", sa.Enum("pending", "sent", "rejected", name="deliverystatus", native_enum=False, length=16), nullable=False),
    sa.Column("attempts", sa.Integer(), nullable=False),
    sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("last_error", sa.Text(), nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("claimed_until", sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(["result_id"], ["study_results.id"], ondelete="CASCADE"),
    sa.PrimaryKeyConstraint("id")
    )
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_deliveries_next_attempt_at"), ["next_attempt_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_deliveries_result_id"), ["result_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_deliveries_status"), ["status"], unique=False)

    op.create_table("image_results",
    sa.Column("id", sa.Integer(), nullable=False),
    sa.Column("result_id", sa.Integer(), nullable=False),
    sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
    sa.Column("status", sa.String(length=16), nullable=False),
    sa.Column("reason", sa.Text(), nullable=True),
    sa.Column("region", sa.String(length=16), nullable=True),
    sa.Column("label", sa.String(length=16), nullable=True),
    sa.Column("p_normal", sa.Float(), nullable=True),
    sa.Column("p_osteopenia", sa.Float(), nullable=True),
    sa.Column("p_osteoporosis", sa.Float(), nullable=True),
    sa.Column("decode_ms", sa.Float(), nullable=True),
    sa.ForeignKeyConstraint(["result_id"], ["study_results.id"], ondelete="CASCADE"),
    sa.PrimaryKeyConstraint("id")
    )
    with op.batch_alter_table("image_results", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_image_results_result_id"), ["result_id"], unique=False)



def downgrade() -> None:
    with op.batch_alter_table("image_results", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_image_results_result_id"))

    op.drop_table("image_results")
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_deliveries_status"))
        batch_op.drop_index(batch_op.f("ix_deliveries_result_id"))
        batch_op.drop_index(batch_op.f("ix_deliveries_next_attempt_at"))

    op.drop_table("deliveries")
    with op.batch_alter_table("study_results", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_study_results_study_id"))

    op.drop_table("study_results")
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_instances_study_id"))
        batch_op.drop_index(batch_op.f("ix_instances_series_id"))

    op.drop_table("instances")
    with op.batch_alter_table("series", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_series_study_id"))

    op.drop_table("series")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_jobs_study_id"))
        batch_op.drop_index(batch_op.f("ix_jobs_status"))

    op.drop_table("jobs")
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_studies_study_key"))
        batch_op.drop_index(batch_op.f("ix_studies_status"))
        batch_op.drop_index(batch_op.f("ix_studies_last_received_at"))

    op.drop_table("studies")
