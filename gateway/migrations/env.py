"""Alembic environment of the gateway store, driven only through gateway.migrations (Python API).

The caller hands over an open connection in ``config.attributes["connection"]`` so migrations run
on the same engine (and, on PostgreSQL, under the same advisory lock) as the gateway itself.
"""

from __future__ import annotations

from alembic import context
from osteogate.gateway.db import Base

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - offline SQL generation is not offered
    raise RuntimeError("gateway migrations run online only, through gateway.migrations.upgrade()")

# render_as_batch: SQLite cannot ALTER most things; batch mode copies the table instead.
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True, compare_type=True)
with context.begin_transaction():
    context.run_migrations()
