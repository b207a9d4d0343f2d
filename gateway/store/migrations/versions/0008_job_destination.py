"""jobs.destinations: where a replay's results go (``osteogate replay --to``), honoured by
whichever process runs the job (a running gateway's worker as much as the replay command).

Revision ID: 0008_job_destination
Revises: 0007_backfill (the chain's head when written; the lead re-chains at merge)
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008_job_destination"
down_revision = "0007_backfill"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("destinations", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("destinations")
