"""Where everything the gateway has been given lives: the SQL database (SQLAlchemy models,
engine, Alembic migrations) and the spool folders on disk (durable writes, fsync).

The stages hand work to each other through the store: a spooled instance and its rows
(receive), a job (tracker), a result with its objects and deliveries (work/report), a delivery
attempt (deliver).

Owns: ``db``, ``spool``, ``wiring`` (open_store), ``migrations``.
May import: ``gateway.core``; never a stage.
"""
