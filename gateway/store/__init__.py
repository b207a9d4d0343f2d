"""Where everything the gateway has been given lives: the SQL database (SQLAlchemy models,
engine, Alembic migrations) and the spool folders on disk (durable writes, fsync).

The stages hand work to each other through the store: a spooled instance and its rows
(receive), a job (tracker), a result with its objects and deliveries (work/report), a delivery
attempt (deliver).

Owns: ``db``, ``dxa`` (ground-truth tables), ``backfill`` (the backfill plan and states), ``spool``,
``wiring`` (open_store), ``migrations``.
May import: ``gateway.core``; never a stage.
"""

# The backfill's tables (``backfill``) are declared on db.Base in their own module; importing it
# here registers them whenever the store is used, without db importing it back (no cycle).
from osteogate.gateway.store import backfill as _backfill  # noqa: F401

# The ground-truth tables likewise (dxa.py).
from osteogate.gateway.store import dxa as _dxa  # noqa: F401
