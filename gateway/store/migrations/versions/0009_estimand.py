"""One estimand: what the reader is told about the inputs is stored beside the result.

(The screening decision and its threshold came with 0005_groundtruth: study_results.decision,
referral_threshold.)

* study_results.notes: what the reader is told about the inputs (values converted, implausible values
  dropped and the fallback used, inputs left out): ``show`` gives the same reasons as the SR and card.

Revision ID: 0009_estimand
Revises: 0005_groundtruth
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009_estimand"
down_revision = "0005_groundtruth"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("study_results") as batch:
        batch.add_column(sa.Column("notes", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("study_results") as batch:
        batch.drop_column("notes")
