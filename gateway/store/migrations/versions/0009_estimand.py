"""One estimand: the screening decision is stored beside the WHO category of the estimate.

* study_results.decision: "DXA referral suggested" / "below the referral threshold" (model/estimand.py),
  NULL when not assessed and for rows made before this revision (their ``label`` was a thresholded
  class, not the category of the estimate; they are left as they were).
* study_results.notes: what the reader is told about the inputs (values converted, implausible values
  dropped and the fallback used, inputs left out): ``show`` gives the same reasons as the SR and card.

Revision ID: 0009_estimand
Revises: 0004_report (the lead re-chains at merge)
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009_estimand"
down_revision = "0004_report"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("study_results") as batch:
        batch.add_column(sa.Column("decision", sa.String(length=40), nullable=True))
        batch.add_column(sa.Column("notes", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("study_results") as batch:
        batch.drop_column("notes")
        batch.drop_column("decision")
