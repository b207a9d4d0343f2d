"""Structured logging.

JSON lines when stderr is not a terminal (production, containers, systemd), readable console
output in a terminal. Standard-library logging (``model/``, which must not import the gateway,
and libraries) is rendered by the same processors through structlog's ``ProcessorFormatter``, so
every line of a process has one format. Identifiers are hashed before they reach a log: a study is named by its
``study_key``, never by patient name, patient ID or accession number.
"""

from __future__ import annotations

import hashlib
import logging
import sys
from typing import Literal

import structlog

_salt = "osteogate"
_HANDLER_NAME = "osteogate-structlog"


def set_hash_salt(salt: str) -> None:
    global _salt
    _salt = salt


def study_key(study_instance_uid: str) -> str:
    """A short, stable, non-reversible key for a study (UIDs can embed dates or device serials)."""
    return hashlib.sha256(f"{_salt}:{study_instance_uid}".encode()).hexdigest()[:16]


def hashed(value: str) -> str:
    """Hash any other identifier (calling host, SOP Instance UID) for logs."""
    return hashlib.sha256(f"{_salt}:{value}".encode()).hexdigest()[:12]


def configure_logging(
    fmt: Literal["auto", "json", "console"] = "auto", level: str = "info", stream: object = None
) -> None:
    stream = stream or sys.stderr
    if fmt == "auto":
        fmt = "console" if getattr(stream, "isatty", lambda: False)() else "json"
    renderer: structlog.typing.Processor
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=getattr(stream, "isatty", lambda: False)())
    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            timestamper,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=stream),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )
    _route_stdlib_logging(stream, level, renderer, timestamper)
    # pynetdicom logs through the standard library, including dataset dumps at debug level that
    # would print patient names: keep it at WARNING whatever our own level is.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    # apscheduler warns each time a run-now trigger meets a run in progress: expected, not news.
    logging.getLogger("apscheduler").setLevel(logging.ERROR)
    # Alembic narrates each migration step at INFO; the gateway logs database_migrated itself.
    logging.getLogger("alembic").setLevel(logging.WARNING)


def _route_stdlib_logging(stream: object, level: str, renderer: structlog.typing.Processor,
                          timestamper: structlog.typing.Processor) -> None:
    """One root handler that renders stdlib records like structlog events (replaced on each call)."""
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            timestamper,
        ],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )
    handler = logging.StreamHandler(stream)  # type: ignore[arg-type]
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
    root.addHandler(handler)
    # Our own stdlib loggers (osteogate.model.*) at the configured level; libraries only from
    # WARNING: their INFO lines are chatter and some name identifiers (highdicom logs the SOP
    # Instance UID it copies from), which must not reach the log.
    root.setLevel(max(logging.WARNING, getattr(logging, level.upper())))
    logging.getLogger("osteogate").setLevel(getattr(logging, level.upper()))


def get_logger(name: str) -> structlog.typing.FilteringBoundLogger:
    return structlog.get_logger(name)
