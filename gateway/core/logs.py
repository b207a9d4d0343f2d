"""Structured logging.

JSON lines when stderr is not a terminal (production, containers, systemd), readable console
output in a terminal. Standard-library logging (``model/``, which must not import the gateway,
and libraries) is rendered by the same processors through structlog's ``ProcessorFormatter``, so
every line of a process has one format. Identifiers are hashed before they reach a log: a study is named by its
``study_key``, never by patient name, patient ID or accession number.

Our own events carry only chosen fields. Text we do not write ourselves is scrubbed before it is
printed: records of other libraries' loggers (pydicom, pynetdicom, highdicom...), Python warnings
(pydicom warns with the offending value: a birth date, a UID), exception messages in tracebacks,
and uncaught exceptions in threads. Quoted values, UID-like dotted numbers, dates and long digit
runs become ``<redacted>``; file names, line numbers and exception types stay, so a traceback is
still useful.
"""

from __future__ import annotations

import hashlib
import logging
import re
import sys
import threading
import traceback
from types import TracebackType
from typing import Any, Literal

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


# -- scrubbing -----------------------------------------------------------------------------------------

REDACTED = "<redacted>"
_SCRUB = [
    # 'value' or "value" (pydicom: "Invalid value for VR DA: '19.05.1961'"), b'...' included.
    re.compile(r"""b?(['"])(?:(?!\1)[^\n]){0,512}\1"""),
    # UIDs, IP addresses, dotted dates and versions: digits with two or more dots.
    re.compile(r"\b\d+(?:\.\d+){2,}\b"),
    # Dates and times written with separators (1961-05-19, 19/05/1961, 10:22:33).
    re.compile(r"\b\d{1,4}[-/:]\d{1,2}[-/:]\d{1,4}\b"),
    # Runs of digits long enough to be a date (19610519), an ID or an accession number.
    re.compile(r"\b\d{5,}\b"),
]


def scrub(text: str) -> str:
    """``text`` without the values a library may have quoted into it."""
    for pattern in _SCRUB:
        text = pattern.sub(REDACTED, text)
    return text


def format_exception(exc_info: tuple[type[BaseException], BaseException, TracebackType | None]) -> str:
    """A traceback whose frames are kept and whose exception messages are scrubbed."""
    lines: list[str] = []
    chain: list[traceback.TracebackException] = []
    current: traceback.TracebackException | None = traceback.TracebackException(*exc_info, limit=30)
    while current is not None and len(chain) < 10:
        chain.append(current)
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    for position, item in enumerate(reversed(chain)):
        if position:
            lines.append("\nwhile handling the above, another exception occurred:\n")
        lines.append("Traceback (most recent call last):\n")
        lines.extend(item.stack.format())
        lines.extend(scrub(line) for line in item.format_exception_only())
    return "".join(lines).rstrip("\n")


def _exception_processor(_logger: Any, _name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """Replaces structlog's format_exc_info: the same ``exception`` field, scrubbed."""
    exc_info = event_dict.pop("exc_info", None)
    if not exc_info:
        return event_dict
    if isinstance(exc_info, BaseException):
        exc_info = (type(exc_info), exc_info, exc_info.__traceback__)
    elif not isinstance(exc_info, tuple):
        exc_info = sys.exc_info()
    if exc_info[0] is not None:
        event_dict["exception"] = format_exception(exc_info)  # type: ignore[arg-type]
    return event_dict


def _foreign_record(_logger: Any, _name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """A record from another library's stdlib logger (or a Python warning): scrub its text."""
    record = event_dict.get("_record")
    name = getattr(record, "name", "")
    # The formatter has already rendered the message (record.args are cleared before this chain).
    message = str(event_dict.get("event", ""))
    if name.startswith("osteogate."):
        event_dict["event"] = message  # our own code (model/) writing through the stdlib
    else:
        event_dict["event"] = "library_warning" if name == "py.warnings" else "library_log"
        event_dict["message"] = scrub(message)[:2000]
    event_dict["logger"] = name
    return event_dict


def _log_thread_exception(args: threading.ExceptHookArgs) -> None:
    """Uncaught exceptions in threads (pynetdicom's, apscheduler's...) become one scrubbed event."""
    if args.exc_type is SystemExit or args.exc_value is None:
        return
    get_logger("osteogate.thread").error(
        "thread_crashed", thread=getattr(args.thread, "name", None),
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback))


class _OurHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Marks the handler configure_logging installed, so a second call replaces it."""


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
            _exception_processor,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=stream),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )
    # Every stdlib record (libraries, model code) and every Python warning goes through the same
    # renderer, scrubbed.
    handler = _OurHandler(stream)  # type: ignore[arg-type]
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            timestamper,
            _foreign_record,
            _exception_processor,
        ],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    ))
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _OurHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    # Libraries speak up from WARNING on (as Python's default handler did); our own stdlib loggers
    # (osteogate.*, e.g. model code) at the configured level.
    root.setLevel(max(logging.WARNING, getattr(logging, level.upper())))
    logging.getLogger("osteogate").setLevel(getattr(logging, level.upper()))
    logging.captureWarnings(True)
    threading.excepthook = _log_thread_exception
    # pynetdicom logs through the standard library, including dataset dumps at debug level that
    # would print patient names: keep it at WARNING whatever our own level is.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    # apscheduler warns each time a run-now trigger meets a run in progress: expected, not news.
    logging.getLogger("apscheduler").setLevel(logging.ERROR)
    # Alembic narrates each migration step at INFO; the gateway logs database_migrated itself.
    logging.getLogger("alembic").setLevel(logging.WARNING)


def get_logger(name: str) -> structlog.typing.FilteringBoundLogger:
    return structlog.get_logger(name)
