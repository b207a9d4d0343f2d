"""Alembic environment of the gateway store, driven only through gateway.store.migrations (Python API).

The caller hands over an open connection in ``config.attributes["connection"]`` so migrations run
on the same engine (and, on PostgreSQL, under the same advisory lock) as the gateway itself, and
the models' metadata in ``config.attributes["target_metadata"]`` (this package does not import
gateway.store.db, which imports it).
"""

from __future__ import annotations

from alembic import context

connection = context.config.attributes.get("connection")
target_metadata = context.config.attributes.get("target_metadata")
if connection is None:  # pragma: no cover - offline SQL generation is not offered
    raise RuntimeError("gateway migrations run online only, through gateway.store.migrations.upgrade()")

# render_as_batch: SQLite cannot ALTER most things; batch mode copies the table instead.
context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True, compare_type=True)
with context.begin_transaction():
    context.run_migrations()
