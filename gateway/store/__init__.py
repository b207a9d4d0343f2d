"""Where everything the gateway has been given lives: the SQL database (SQLAlchemy models,
engine, Alembic migrations) and the spool folders on disk (durable writes, fsync).

The stages hand work to each other through the store: a spooled instance and its rows
(receive), a job (tracker), a result with its objects and deliveries (work/report), a delivery
attempt (deliver).

Owns: ``db``, ``dxa`` (ground-truth tables), ``spool``, ``wiring`` (open_store), ``migrations``.
May import: ``gateway.core``; never a stage.
"""

# The ground-truth tables live in their own module on the same declarative Base; importing it
# here (not from db.py, which would be an import cycle) puts them in Base.metadata whenever any
# part of the store is used, so create_all and the migration checks always see them.
from osteogate.gateway.store import dxa as _dxa  # noqa: F401
