"""Schema migrations (Alembic), run through Alembic's Python API, never a CLI subprocess.

``upgrade(engine, metadata)`` is what the gateway runs at start and what ``osteogate db upgrade``
runs (through ``gateway.store.db.Database.migrate``, which hands over the models' metadata: this package
never imports ``gateway.store.db``, so the two do not import each other):

* fresh database (no tables): ``upgrade head``;
* database at a known revision: ``upgrade head``;
* database made by ``create_all`` before migrations existed (tables, no ``alembic_version``):
  stamped at the revision whose schema it matches, then upgraded; a schema matching no known
  revision is refused (MigrationError) instead of being altered blindly.
"""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from osteogate.gateway.core.errors import ExitCode, OsteoGateError
from osteogate.gateway.core.logs import get_logger
from sqlalchemy import MetaData, create_engine, inspect, text
from sqlalchemy.engine import Connection, Engine

log = get_logger("osteogate.gateway.store.migrations")

HERE = Path(__file__).resolve().parent
INITIAL_REVISION = "0001_initial"
# An arbitrary constant: the PostgreSQL advisory lock that serialises concurrent migrators
# (several `osteogate worker` processes starting at once against one database).
_PG_LOCK_KEY = 0x05731E6A


class MigrationError(OsteoGateError, RuntimeError):
    """The database schema is not one the migrations know how to bring up to date."""

    exit_code = ExitCode.DATAERR


def alembic_config(connection: Connection | None = None, metadata: MetaData | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(HERE))
    if connection is not None:
        config.attributes["connection"] = connection
    if metadata is not None:
        config.attributes["target_metadata"] = metadata
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def current_revision(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


def schema_diffs(connection: Connection, metadata: MetaData) -> list[Any]:
    """Differences between the live schema and the models' ``metadata`` (empty: they match)."""
    context = MigrationContext.configure(connection, opts={"compare_type": True})
    return list(compare_metadata(context, metadata))


def _columns(connection: Connection) -> dict[str, frozenset[str]]:
    inspector = inspect(connection)
    return {table: frozenset(c["name"] for c in inspector.get_columns(table))
            for table in inspector.get_table_names() if table != "alembic_version"}


def _revision_columns(revision: str) -> dict[str, frozenset[str]]:
    """Tables and columns of the schema at ``revision``, made in a scratch in-memory SQLite."""
    engine = create_engine("sqlite://")
    try:
        with engine.connect() as scratch:
            command.upgrade(alembic_config(scratch), revision)
            scratch.commit()
            return _columns(scratch)
    finally:
        engine.dispose()


def _matching_revision(connection: Connection) -> str | None:
    """The newest revision whose tables and columns are exactly those of the live schema."""
    live = _columns(connection)
    for script in ScriptDirectory.from_config(alembic_config()).walk_revisions():  # head first
        if _revision_columns(script.revision) == live:
            return str(script.revision)
    return None


def _describe_diff(diff: Any) -> str:
    """``('add_table', Table('jobs', ...))`` -> "add_table jobs": a schema difference in a few words."""
    if isinstance(diff, list):  # modify_* differences come as a list of tuples
        diff = diff[0] if diff else ()
    if not isinstance(diff, tuple) or not diff:
        return str(diff)[:120]
    names = [str(part if isinstance(part, str) else getattr(part, "name", "")) for part in diff[1:]]
    return " ".join([str(diff[0]), ".".join(n for n in names if n)])[:120]


@contextmanager
def _file_lock(engine: Engine) -> Iterator[None]:
    """SQLite has no advisory locks: a lock file next to the database serialises migrators."""
    database = engine.url.database if engine.dialect.name == "sqlite" else None
    if not database or database == ":memory:":
        yield
        return
    with open(f"{database}.migrate-lock", "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def _locked(engine: Engine) -> Iterator[Connection]:
    with _file_lock(engine), engine.connect() as connection:
        if engine.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": _PG_LOCK_KEY})
            connection.commit()
        try:
            yield connection
        finally:
            if engine.dialect.name == "postgresql":
                connection.rollback()
                connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": _PG_LOCK_KEY})
                connection.commit()


@contextmanager
def _sqlite_foreign_keys_off(connection: Connection) -> Iterator[None]:
    """SQLite batch migrations copy a table and drop the old one; with foreign keys on, that DROP
    deletes the rows of every child table declared ON DELETE CASCADE (results lose their images and
    deliveries). The pragma only takes effect outside a transaction, hence the commits."""
    if connection.dialect.name != "sqlite":
        yield
        return
    connection.commit()
    connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
    try:
        yield
    finally:
        connection.commit()
        connection.exec_driver_sql("PRAGMA foreign_keys=ON")


def _stamp_legacy(connection: Connection, config: Config, metadata: MetaData) -> str:
    diffs = schema_diffs(connection, metadata)
    target = head_revision() if not diffs else _matching_revision(connection)
    if target is None:
        raise MigrationError(
            "the database schema matches no known revision",
            f"it has gateway tables but no alembic_version, and {len(diffs)} difference(s) from any "
            f"revision (first: {_describe_diff(diffs[0])})",
            "Back it up and fix it by hand (or point storage.database_url at the right database)",
        )
    command.stamp(config, target)
    connection.commit()
    log.warning("database_stamped", revision=target, reason="schema made before migrations existed")
    return target


def upgrade(engine: Engine, metadata: MetaData) -> tuple[str | None, str]:
    """Bring the database to the head revision; returns (revision before, revision after).

    ``metadata``: the models the schema must match (``gateway.store.db.Base.metadata``).
    """
    with _locked(engine) as connection:
        config = alembic_config(connection, metadata)
        before = current_revision(connection)
        if before is None and inspect(connection).has_table("studies"):
            _stamp_legacy(connection, config, metadata)
        known = {script.revision for script in ScriptDirectory.from_config(config).walk_revisions()}
        if before is not None and before not in known:
            raise MigrationError(
                f"the database is at schema revision {before}, which this osteogate does not know",
                "it was upgraded by a newer release",
                "Run the newer release, or restore a backup made before the upgrade",
            )
        with _sqlite_foreign_keys_off(connection):
            command.upgrade(config, "head")
            connection.commit()
        after = current_revision(connection)
    if before != after:
        log.info("database_migrated", before=before, after=after)
    return before, after  # type: ignore[return-value]
