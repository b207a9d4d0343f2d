"""Results that never over-claim, and a result made of several objects (SR, then result card).

* study_results: ``assessed``, ``reason``, ``t_score`` with its 80 % interval, ``inputs_used`` /
  ``inputs_missing``; image_results: ``assessed``.
* Probabilities as JSON keyed by class name (model/taxonomy.py is the one source of truth) instead of
  one column per class: existing rows are converted, then ``p_normal``, ``p_osteopenia`` and
  ``p_osteoporosis`` are dropped. Converted rows had a label from the image model alone, so they get
  ``assessed`` = (label is set) and ``inputs_used`` = ["image"]; ``inputs_missing`` stays unknown.
* result_objects: the ordered DICOM objects of a result; each existing SR becomes object 0.

Revision ID: 0004_report
Revises: 0002_purged_at
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_report"
down_revision = "0002_purged_at"
branch_labels = None
depends_on = None

# The class columns of revisions 0001-0002 (their names are history; the taxonomy may change).
_OLD_COLUMNS = {"p_normal": "normal", "p_osteopenia": "osteopenia", "p_osteoporosis": "osteoporosis"}
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


def _probability_columns() -> list[sa.Column]:
    return [sa.Column(name, sa.Float(), nullable=True) for name in _OLD_COLUMNS]


def _to_json(table_name: str, extra: dict[str, object]) -> None:
    """Copy p_* into the JSON column (row by row: portable across SQLite and PostgreSQL)."""
    connection = op.get_bind()
    table = sa.table(
        table_name,
        sa.column("id", sa.Integer),
        sa.column("label", sa.String),
        sa.column("probabilities", sa.JSON),
        sa.column("assessed", sa.Boolean),
        *(sa.column(name, sa.Float) for name in _OLD_COLUMNS),
        *(sa.column(name, sa.JSON) for name in extra),
    )
    rows = connection.execute(sa.select(table.c.id, table.c.label, *(table.c[n] for n in _OLD_COLUMNS))).all()
    for row in rows:
        values = {cls: getattr(row, column) for column, cls in _OLD_COLUMNS.items()}
        has_values = all(v is not None for v in values.values())
        update: dict[str, object] = {
            "probabilities": values if has_values else None,
            "assessed": (row.label is not None) if has_values else None,
        }
        if has_values and row.label is not None:
            update.update(extra)
        connection.execute(sa.update(table).where(table.c.id == row.id).values(**update))


def _from_json(table_name: str) -> None:
    connection = op.get_bind()
    table = sa.table(
        table_name,
        sa.column("id", sa.Integer),
        sa.column("probabilities", sa.JSON),
        *(sa.column(name, sa.Float) for name in _OLD_COLUMNS),
    )
    for row in connection.execute(sa.select(table.c.id, table.c.probabilities)).all():
        probabilities = row.probabilities or {}
        connection.execute(sa.update(table).where(table.c.id == row.id).values(
            **{column: probabilities.get(cls) for column, cls in _OLD_COLUMNS.items()}))


def upgrade() -> None:
    with op.batch_alter_table("study_results", schema=None) as batch_op:
        batch_op.add_column(sa.Column("assessed", sa.Boolean(), nullable=True))
        batch_op.add_column(sa.Column("reason", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("probabilities", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("t_score", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("t_score_low", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("t_score_high", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("inputs_used", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("inputs_missing", sa.JSON(), nullable=True))
    with op.batch_alter_table("image_results", schema=None) as batch_op:
        batch_op.add_column(sa.Column("assessed", sa.Boolean(), nullable=True))
        batch_op.add_column(sa.Column("probabilities", sa.JSON(), nullable=True))
    _to_json("study_results", {"inputs_used": ["image"]})
    _to_json("image_results", {})
    for table in ("study_results", "image_results"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            for column in _OLD_COLUMNS:
                batch_op.drop_column(column)

    objects = op.create_table(
        "result_objects",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("result_id", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("sop_class_uid", sa.String(length=64), nullable=False),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("series_uid", sa.String(length=64), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(["result_id"], ["study_results.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("result_id", "position"),
        sa.UniqueConstraint("sop_instance_uid"),
    )
    with op.batch_alter_table("result_objects", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_result_objects_result_id"), ["result_id"], unique=False)
    results = sa.table("study_results", sa.column("id", sa.Integer), sa.column("sr_path", sa.Text),
                       sa.column("sr_sop_instance_uid", sa.String), sa.column("sr_series_uid", sa.String))
    connection = op.get_bind()
    rows = connection.execute(sa.select(results).where(results.c.sr_path.is_not(None))).all()
    if rows:
        op.bulk_insert(objects, [
            {"result_id": row.id, "position": 0, "kind": "sr", "sop_class_uid": COMPREHENSIVE_3D_SR,
             "sop_instance_uid": row.sr_sop_instance_uid, "series_uid": row.sr_series_uid or "",
             "path": row.sr_path}
            for row in rows
        ])


def downgrade() -> None:
    with op.batch_alter_table("result_objects", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_result_objects_result_id"))
    op.drop_table("result_objects")
    for table in ("study_results", "image_results"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            for column in _probability_columns():
                batch_op.add_column(column)
        _from_json(table)
    with op.batch_alter_table("image_results", schema=None) as batch_op:
        batch_op.drop_column("probabilities")
        batch_op.drop_column("assessed")
    with op.batch_alter_table("study_results", schema=None) as batch_op:
        for column in ("inputs_missing", "inputs_used", "t_score_high", "t_score_low", "t_score", "probabilities",
                       "reason", "assessed"):
            batch_op.drop_column(column)
