"""Alembic migrations: empty -> head on SQLite and PostgreSQL equals the models; legacy stamping."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from alembic import command
from osteogate.gateway.store.db import Base, Database
from osteogate.gateway.store.migrations import (
    INITIAL_REVISION,
    MigrationError,
    alembic_config,
    current_revision,
    head_revision,
    schema_diffs,
)
from sqlalchemy import inspect, text

REPO = Path(__file__).resolve().parent.parent


def _assert_at_head_matching_models(db: Database) -> None:
    with db.engine.connect() as connection:
        assert current_revision(connection) == head_revision()
        assert schema_diffs(connection, Base.metadata) == []


def test_sqlite_empty_to_head_matches_models(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'a.db'}")
    assert db.migrate() == (None, head_revision())
    _assert_at_head_matching_models(db)
    assert db.migrate() == (head_revision(), head_revision())  # idempotent


def test_sqlite_downgrade_to_base_and_back(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'a.db'}")
    db.migrate()
    with db.engine.connect() as connection:
        command.downgrade(alembic_config(connection), "base")
        connection.commit()
        assert not inspect(connection).has_table("studies")
    db.migrate()
    _assert_at_head_matching_models(db)


def test_create_all_database_is_stamped_at_matching_revision(tmp_path: Path) -> None:
    current = Database(f"sqlite:///{tmp_path / 'current.db'}")
    current.create_schema()  # as made before migrations existed, with today's models
    current.migrate()
    _assert_at_head_matching_models(current)

    # Releases before migrations made their schema with create_all: the schema of revision 0001 (or
    # 0002) without an alembic_version table. It is recognised by its tables and columns, stamped at
    # that revision and upgraded, its rows converted on the way.
    for revision in (INITIAL_REVISION, "0002_purged_at"):
        old = Database(f"sqlite:///{tmp_path / f'old-{revision}.db'}")
        with old.engine.begin() as connection:
            command.upgrade(alembic_config(connection), revision)
        with old.engine.begin() as connection:
            connection.execute(text("DROP TABLE alembic_version"))
        assert old.migrate() == (None, head_revision())
        _assert_at_head_matching_models(old)


def test_unknown_schema_is_refused_not_altered(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'odd.db'}")
    db.create_schema()
    with db.engine.begin() as connection:
        connection.execute(text("ALTER TABLE studies ADD COLUMN local_extra TEXT"))
    with pytest.raises(MigrationError, match="matches no known revision"):
        db.migrate()
    with db.engine.connect() as connection:
        assert current_revision(connection) is None


def test_db_cli_upgrade_and_current(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OSTEOGATE_")}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "osteogate.gateway.operate.cli", "db", *args, "--data-dir", str(tmp_path)],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=60)

    up = run("upgrade")
    assert up.returncode == 0 and f"database at {head_revision()} (was empty or unversioned)" in up.stdout
    now = run("current")
    assert now.returncode == 0 and f"database at {head_revision()}; head is {head_revision()}" in now.stdout


@pytest.mark.postgres
def test_postgres_empty_to_head_matches_models(fresh_postgres_url: str) -> None:
    db = Database(fresh_postgres_url)
    try:
        assert db.migrate() == (None, head_revision())
        _assert_at_head_matching_models(db)
        with db.engine.connect() as connection:
            command.downgrade(alembic_config(connection), INITIAL_REVISION)
            connection.commit()
        db.migrate()
        _assert_at_head_matching_models(db)
    finally:
        db.dispose()


def _migrate_concurrently(url: str, count: int = 4) -> list[tuple[str | None, str]]:
    """Several processes starting at once (serve + workers) each migrate; exactly one creates."""
    databases = [Database(url) for _ in range(count)]
    try:
        with ThreadPoolExecutor(count) as pool:
            return list(pool.map(lambda db: db.migrate(), databases))
    finally:
        for db in databases:
            db.dispose()


def test_concurrent_migrators_sqlite(tmp_path: Path) -> None:
    outcomes = _migrate_concurrently(f"sqlite:///{tmp_path / 'a.db'}")
    assert sorted(before or "" for before, _ in outcomes) == ["", *[head_revision()] * 3]


@pytest.mark.postgres
def test_concurrent_migrators_postgres(fresh_postgres_url: str) -> None:
    outcomes = _migrate_concurrently(fresh_postgres_url)
    assert sorted(before or "" for before, _ in outcomes) == ["", *[head_revision()] * 3]
