"""jobs.destinations: where a replay's SR goes, carried by the job (``replay --to``).

Without it a replay queued with ``--to URL`` while a gateway runs was taken by that gateway's
worker and delivered to the configured destinations instead: whoever runs the job must read the
destination from the row.

Revision ID: 0008_job_destination
Revises: 0007_backfill
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
        # A JSON list of destination texts (str(Destination)); NULL: the worker's configuration.
        batch_op.add_column(sa.Column("destinations", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("destinations")
