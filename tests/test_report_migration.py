"""Revision 0004_report converts existing results (one column per class -> JSON keyed by class, each SR
-> result object 0) on SQLite and PostgreSQL, and its downgrade converts them back."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from alembic import command
from osteogate.gateway.store.db import Database, ImageResult, ResultObject, StudyResult
from osteogate.gateway.store.migrations import alembic_config, current_revision, head_revision
from sqlalchemy import select, text

BEFORE = "0002_purged_at"
NOW = datetime(2025, 3, 4, 5, 6, 7, tzinfo=UTC)


def _old_rows(db: Database) -> None:
    """A database at 0002 holding one classified study (SR made) and one skipped one."""
    with db.engine.begin() as connection:
        command.upgrade(alembic_config(connection), BEFORE)
    rows = [
        ("INSERT INTO studies (id, study_uid, study_key, status, version, first_received_at, last_received_at, "
         "instance_count) VALUES (1, '1.2.3', 'k1', 'done', 1, :now, :now, 1), "
         "(2, '1.2.4', 'k2', 'skipped', 1, :now, :now, 1)"),
        ("INSERT INTO jobs (id, study_id, study_version, status, attempts, reason, created_at) VALUES "
         "(1, 1, 1, 'done', 1, 'stable', :now), (2, 2, 1, 'done', 1, 'stable', :now)"),
        ("INSERT INTO study_results (id, study_id, job_id, version, status, region, label, p_normal, p_osteopenia, "
         "p_osteoporosis, model_name, model_version, model_sha256, backend, timings, sr_sop_instance_uid, "
         "sr_series_uid, sr_path, created_at) VALUES "
         "(1, 1, 1, 1, 'done', 'knee', 'osteopenia', 0.2, 0.7, 0.1, 'm', '1', 'abc', 'onnx', '{}', '1.2.3.9', "
         "'1.2.3.8', '1.2.3/1.2.3.9.dcm', :now), "
         "(2, 2, 2, 1, 'skipped', NULL, NULL, NULL, NULL, NULL, 'm', '1', 'abc', 'onnx', '{}', NULL, NULL, NULL, :now)"),
        ("INSERT INTO image_results (id, result_id, sop_instance_uid, status, reason, region, label, p_normal, "
         "p_osteopenia, p_osteoporosis) VALUES (1, 1, '1.2.3.1', 'classified', NULL, 'knee', 'osteopenia', 0.25, "
         "0.5, 0.25), (2, 2, '1.2.4.1', 'skipped', 'out of scope: CHEST', NULL, NULL, NULL, NULL, NULL)"),
    ]
    with db.engine.begin() as connection:
        for statement in rows:
            connection.execute(text(statement), {"now": NOW})


def _check_round_trip(db: Database) -> None:
    _old_rows(db)
    assert db.migrate() == (BEFORE, head_revision())
    with db.session() as session:
        classified, skipped = session.execute(select(StudyResult).order_by(StudyResult.id)).scalars().all()
        assert classified.probabilities == {"normal": 0.2, "osteopenia": 0.7, "osteoporosis": 0.1}
        assert classified.assessed is True and classified.label == "osteopenia"
        assert classified.inputs_used == ["image"] and classified.inputs_missing is None
        assert skipped.probabilities is None and skipped.assessed is None and skipped.inputs_used is None
        [obj] = session.execute(select(ResultObject)).scalars().all()
        assert (obj.result_id, obj.position, obj.kind, obj.sop_instance_uid, obj.series_uid, obj.path) == \
            (1, 0, "sr", "1.2.3.9", "1.2.3.8", "1.2.3/1.2.3.9.dcm")
        image, skipped_image = session.execute(select(ImageResult).order_by(ImageResult.id)).scalars().all()
        assert image.probabilities == {"normal": 0.25, "osteopenia": 0.5, "osteoporosis": 0.25}
        assert image.assessed is True
        assert skipped_image.probabilities is None and skipped_image.reason == "out of scope: CHEST"

    with db.engine.connect() as connection:
        if db.engine.dialect.name == "sqlite":  # as gateway.store.migrations.upgrade does (batch copies tables)
            connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
        command.downgrade(alembic_config(connection), BEFORE)
        connection.commit()
        if db.engine.dialect.name == "sqlite":
            connection.exec_driver_sql("PRAGMA foreign_keys=ON")
    with db.engine.connect() as connection:
        assert current_revision(connection) == BEFORE
        assert connection.execute(text("SELECT count(*) FROM image_results")).scalar() == 2  # children kept
        row = connection.execute(text("SELECT p_normal, p_osteopenia, p_osteoporosis, label FROM study_results "
                                      "WHERE id = 1")).one()
        assert tuple(row) == (0.2, 0.7, 0.1, "osteopenia")
        image_row = connection.execute(text("SELECT p_osteopenia FROM image_results WHERE id = 1")).one()
        assert image_row[0] == 0.5
    db.migrate()  # and up again


def test_results_converted_sqlite(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'old.db'}")
    try:
        _check_round_trip(db)
    finally:
        db.dispose()


@pytest.mark.postgres
def test_results_converted_postgres(fresh_postgres_url: str) -> None:
    db = Database(fresh_postgres_url)
    try:
        _check_round_trip(db)
    finally:
        db.dispose()
