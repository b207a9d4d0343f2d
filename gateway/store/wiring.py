"""The one wiring of the store: settings -> database (+ migrations) + spool + reports.

``serve``, ``worker`` and ``db upgrade`` open the store with ``create=True``: the data directory
and the database are made when missing and the schema is brought to the head revision. Every
other command opens an existing store (``create=False``): a missing database is an error that
names the path and the setting that led there, never a silently created empty one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from osteogate.gateway.core.config import Settings
from osteogate.gateway.core.errors import CannotCreate, ConfigurationError, NotFoundError, PeerUnavailable
from osteogate.gateway.core.logs import set_hash_salt
from osteogate.gateway.store.db import Database
from osteogate.gateway.store.spool import Spool
from sqlalchemy import inspect
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, OperationalError


@dataclass
class Store:
    """Database + spool (received images) + reports (SRs) of one site."""

    settings: Settings
    db: Database
    _spools: dict[str, Spool] = field(default_factory=dict, repr=False)

    @property
    def spool(self) -> Spool:
        return self._spool("spool", self.settings.storage.spool_dir)

    @property
    def reports(self) -> Spool:
        return self._spool("reports", self.settings.storage.reports_dir)

    def _spool(self, name: str, root: Path) -> Spool:
        # Made on first use: a read-only command that never touches a spool creates no directory.
        if name not in self._spools:
            self._spools[name] = Spool(root)
        return self._spools[name]

    def dispose(self) -> None:
        self.db.dispose()


def safe_url(url: str) -> str:
    """The database URL as it may be printed: password hidden."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable URL>"


def _where(settings: Settings) -> str:
    """Which setting chose the database, for messages."""
    def origin(key: str) -> str:
        source = settings.source_of(key)
        return ", the default" if source == "the default" else f" from {source}"

    storage = settings.storage
    if storage.database_url:
        return f"storage.database_url{origin('storage.database_url')}"
    data_dir = storage.data_dir
    relative = "" if data_dir.is_absolute() else f", relative to the working directory {os.getcwd()}"
    return f"storage.data_dir = {data_dir}{origin('storage.data_dir')}{relative}"


def open_store(settings: Settings, *, create: bool = False, migrate: bool = True) -> Store:
    """Open the store of ``settings``.

    create: make the data directory and database when missing (serve, worker, db upgrade);
    otherwise they must exist. migrate: bring the schema to head (never for read-only commands).
    """
    set_hash_salt(settings.logging.hash_salt)  # study keys written to SQL must match the logs
    storage = settings.storage
    url = storage.resolved_database_url()
    try:
        sqlite_file = make_url(url).database if url.startswith("sqlite") else None
    except ArgumentError:
        raise ConfigurationError(f"storage.database_url {url!r} is not a database URL", None,
                                 "Write it as postgresql+psycopg://user@host/db or sqlite:///path") from None
    if create:
        _make_dirs(settings, storage.data_dir, Path(sqlite_file).parent if sqlite_file else None)
    elif sqlite_file and sqlite_file != ":memory:" and not Path(sqlite_file).is_file():
        raise NotFoundError(f"no OsteoGate database at {sqlite_file}", f"{_where(settings)}",
                            "Give the gateway's data directory with --data-dir (or its --config); "
                            "`osteogate serve` creates the database")
    db = Database(url)
    try:
        with db.engine.connect() as connection:
            has_tables = inspect(connection).has_table("studies")
        if not create and not has_tables:
            raise NotFoundError(f"{safe_url(url)} holds no OsteoGate tables", _where(settings),
                                "Point --data-dir / --database-url at the gateway's store, or run "
                                "`osteogate db upgrade` to create the tables")
        if migrate:
            db.migrate()
    except OperationalError as exc:
        db.dispose()
        detail = str(exc.orig).strip().splitlines()[0] if exc.orig is not None else str(exc).splitlines()[0]
        if sqlite_file:
            raise CannotCreate(f"cannot open the SQLite database {sqlite_file}", detail,
                               "Check the permissions of storage.data_dir") from None
        raise PeerUnavailable(f"database {safe_url(url)} unavailable", detail,
                              f"Check that it runs and is reachable ({_where(settings)})") from None
    except BaseException:
        db.dispose()
        raise
    store = Store(settings, db)
    if create:  # made now, so a permission problem shows at start, not at the first C-STORE
        _make_dirs(settings, storage.spool_dir, storage.reports_dir)
    return store


def _make_dirs(settings: Settings, *directories: Path | None) -> None:
    for directory in directories:
        if directory is None:
            continue
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CannotCreate(f"cannot create {directory}", exc.strerror or str(exc),
                               f"Fix its permissions or choose another place ({_where(settings)})") from None
