"""Structured logging.

JSON lines when stderr is not a terminal (production, containers, systemd), readable console
output in a terminal. Identifiers are hashed before they reach a log: a study is named by its
``study_key``, never by patient name, patient ID or accession number.
"""

from __future__ import annotations

import hashlib
import logging
import sys
from typing import Literal

import structlog

_salt = "osteogate"


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
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=stream),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )
    # pynetdicom logs through the standard library, including dataset dumps at debug level that
    # would print patient names: keep it at WARNING whatever our own level is.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    # apscheduler warns each time a run-now trigger meets a run in progress: expected, not news.
    logging.getLogger("apscheduler").setLevel(logging.ERROR)


def get_logger(name: str) -> structlog.typing.FilteringBoundLogger:
    return structlog.get_logger(name)
