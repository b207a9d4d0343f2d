"""Operator-facing failures: one line (what, why, what to do) and a sysexits-style exit code.

Every command ends in ``gateway.operate.cli.main``, which catches :class:`OsteoGateError` and prints
``osteogate: <what>: <why>. <what to do>`` on stderr, then exits with the error's ``exit_code``.
Errors raised by libraries (a port already taken, a database that does not answer, a host name
that does not resolve, a file that is not a checkpoint...) are translated by :func:`translate`;
anything else is a bug and exits 70 with a one-line summary (``OSTEOGATE_DEBUG=1`` shows the
traceback).

The codes follow BSD ``sysexits.h`` so that a supervisor can tell "fix the configuration" from
"try again later": the systemd unit restarts on 69/70/75 and not on 64/65/66/78.
"""

from __future__ import annotations

import enum
import errno
import socket
import sys


class ExitCode(enum.IntEnum):
    OK = 0
    # The command ran, but not everything it was asked to do succeeded; its output lists what.
    PARTIAL = 1
    USAGE = 64  # EX_USAGE: wrong command line
    DATAERR = 65  # EX_DATAERR: the data is not what it should be (unknown database schema)
    NOINPUT = 66  # EX_NOINPUT: a named input does not exist (database, study, file)
    UNAVAILABLE = 69  # EX_UNAVAILABLE: a peer (PACS, database, DNS) is unreachable or refuses
    SOFTWARE = 70  # EX_SOFTWARE: internal error (a bug)
    CANTCREAT = 73  # EX_CANTCREAT: cannot create a file or directory (permissions, read-only disk)
    TEMPFAIL = 75  # EX_TEMPFAIL: temporary failure (port still in use, database locked): retry
    CONFIG = 78  # EX_CONFIG: the configuration is wrong (bad key, missing or unusable file)


# What each code means to an operator (README and `osteogate --help` print this table).
EXIT_CODE_MEANINGS: dict[ExitCode, str] = {
    ExitCode.OK: "success",
    ExitCode.PARTIAL: "done, but not everything succeeded (the output says what)",
    ExitCode.USAGE: "wrong command line",
    ExitCode.DATAERR: "the database schema is not one this version knows",
    ExitCode.NOINPUT: "a named input does not exist (database, study, file)",
    ExitCode.UNAVAILABLE: "a peer is unreachable or refuses (PACS, database, DNS)",
    ExitCode.SOFTWARE: "internal error (a bug: please report it)",
    ExitCode.CANTCREAT: "cannot create a file or directory",
    ExitCode.TEMPFAIL: "temporary failure (port in use, database locked): try again later",
    ExitCode.CONFIG: "configuration error (bad key, missing or unusable file)",
}

# Exit codes after which restarting the service cannot help: systemd's RestartPreventExitStatus.
NO_RESTART: tuple[ExitCode, ...] = (ExitCode.USAGE, ExitCode.DATAERR, ExitCode.NOINPUT, ExitCode.CONFIG)


# Modules of the `train` and `gpu` extras: a serving-only install does not have them.
EXTRA_MODULES = frozenset({"torch", "torchvision", "timm", "onnx", "onnxscript", "albumentations", "sklearn",
                           "skimage", "scipy", "imagehash", "matplotlib", "tqdm"})


class OsteoGateError(Exception):
    """A failure an operator can act on. ``str()`` is the one line printed."""

    exit_code: ExitCode = ExitCode.SOFTWARE

    def __init__(self, what: str, why: str | None = None, fix: str | None = None,
                 *, exit_code: ExitCode | None = None) -> None:
        self.what, self.why, self.fix = what, why, fix
        if exit_code is not None:
            self.exit_code = exit_code
        super().__init__(self.line())

    def line(self) -> str:
        text = self.what if not self.why else f"{self.what}: {self.why}"
        if self.fix:
            text = f"{text.rstrip('.')}. {self.fix}"
        # One line, whatever a library put in its message; a path or value an operator typed
        # (3 kB of ../, a pasted blob) is shortened, so the line stays one an operator can read.
        return " ".join(_shortened(word) for word in text.split())


# A word (no spaces) longer than this in an operator line is shown as its start and its end.
LONGEST_WORD = 160


def _shortened(word: str) -> str:
    if len(word) <= LONGEST_WORD:
        return word
    return f"{word[:100]}...[{len(word) - 140} characters]...{word[-40:]}"


class UsageError(OsteoGateError):
    exit_code = ExitCode.USAGE


class NotFoundError(OsteoGateError):
    exit_code = ExitCode.NOINPUT


class PeerUnavailable(OsteoGateError):
    exit_code = ExitCode.UNAVAILABLE


class CannotCreate(OsteoGateError):
    exit_code = ExitCode.CANTCREAT


class TemporaryFailure(OsteoGateError):
    exit_code = ExitCode.TEMPFAIL


class ConfigurationError(OsteoGateError):
    exit_code = ExitCode.CONFIG


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def translate(exc: BaseException) -> OsteoGateError | None:
    """The operator-facing form of a known library error, or None for an unknown one (a bug)."""
    if isinstance(exc, OsteoGateError):
        return exc
    known = _translate_model(exc) or _translate_database(exc)
    if known is not None:
        return known
    if isinstance(exc, ModuleNotFoundError) and (exc.name or "").split(".")[0] in EXTRA_MODULES:
        return OsteoGateError(f"{exc.name} is not installed", "this command needs the training extra "
                              "(a serving install has no torch)",
                              "Install it: pip install 'osteogate[train]' (or use the environment of make test)",
                              exit_code=ExitCode.UNAVAILABLE)
    if isinstance(exc, socket.gaierror):
        return PeerUnavailable("cannot resolve a host name", _first_line(exc),
                               "Check the host names in delivery.destinations, --to and storage.database_url")
    if isinstance(exc, OSError):
        return _translate_os_error(exc)
    return None


def _translate_os_error(exc: OSError) -> OsteoGateError:
    where = f" {exc.filename}" if exc.filename else ""
    reason = exc.strerror or _first_line(exc)
    if exc.errno == errno.EADDRINUSE:
        return TemporaryFailure("cannot listen: address already in use", reason,
                                "Stop the other process on that port or choose another (--port, dicom.port, http.port)")
    if exc.errno == errno.EADDRNOTAVAIL:
        return ConfigurationError("cannot listen on that address", reason,
                                  "Use an address of this host in dicom.bind / http.bind (or 0.0.0.0)")
    if isinstance(exc, FileNotFoundError):
        return NotFoundError(f"no such file or directory{where}" if exc.filename else _first_line(exc), None,
                             "Check the path")
    if isinstance(exc, PermissionError) or exc.errno in (errno.EROFS, errno.ENOSPC, errno.EDQUOT):
        return CannotCreate(f"cannot write{where}", reason,
                            "Check the permissions and free space of storage.data_dir")
    if isinstance(exc, ConnectionError | TimeoutError):
        return PeerUnavailable("connection failed", reason, "Check that the peer runs and is reachable")
    return CannotCreate(f"operating system error{where}", reason)


def _loaded_class(module: str, name: str) -> type | None:
    """A class from a module only if that module was imported: an exception of it cannot exist
    otherwise, and translating an error must not import numpy or cv2."""
    loaded = sys.modules.get(module)
    return getattr(loaded, name, None) if loaded is not None else None


def _translate_model(exc: BaseException) -> OsteoGateError | None:
    # model/ never imports gateway/, so its errors are mapped here.
    if (cls := _loaded_class("osteogate.model.checkpoint", "CheckpointError")) and isinstance(exc, cls):
        return ConfigurationError("unusable model file", _first_line(exc),
                                  "Point model.path (or --model) at a .safetensors checkpoint made by osteogate train")
    if (cls := _loaded_class("osteogate.model.taxonomy", "TaxonomyError")) and isinstance(exc, cls):
        return ConfigurationError("model refused", _first_line(exc),
                                  "Use a checkpoint trained for this gateway's classes and regions")
    if (cls := _loaded_class("osteogate.model.inference", "ModelUnavailable")) and isinstance(exc, cls):
        return ConfigurationError("model unavailable", _first_line(exc))
    return None


def _translate_database(exc: BaseException) -> OsteoGateError | None:
    operational = _loaded_class("sqlalchemy.exc", "OperationalError")
    dbapi = _loaded_class("sqlalchemy.exc", "DBAPIError")
    if operational and isinstance(exc, operational):
        detail = _first_line(exc.orig) if exc.orig is not None else _first_line(exc)
        if "locked" in detail:
            return TemporaryFailure("database is locked", detail, "Try again in a moment")
        return PeerUnavailable("database unavailable", detail,
                               "Check that the database runs and storage.database_url (or --database-url)")
    if dbapi and isinstance(exc, dbapi):
        return OsteoGateError("database error", _first_line(exc.orig) if exc.orig is not None else _first_line(exc))
    return None
