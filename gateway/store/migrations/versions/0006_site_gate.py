"""The site gate: results withheld while it is closed keep the model's figures for validation.

* study_results.withheld: the model's figures (label, probabilities, T-score and interval,
  decision) of a result reported as "not assessed: awaiting site validation" ("required" mode).
* deliveries.status may be "held" (shadow mode) or "withdrawn" (held, then superseded): stored
  as plain strings, no schema change.

Revises 0008_job_destination (the head when the gate landed; the numbers are names, not an order).

Revision ID: 0006_site_gate
Revises: 0008_job_destination
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006_site_gate"
down_revision = "0008_job_destination"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("study_results") as batch:
        batch.add_column(sa.Column("withheld", sa.JSON(), nullable=True))


def downgrade() -> None:
    # Held deliveries would be unknown to the older code: they become pending (sent once it runs).
    op.execute("UPDATE deliveries SET status = 'pending' WHERE status = 'held'")
    with op.batch_alter_table("study_results") as batch:
        batch.drop_column("withheld")
