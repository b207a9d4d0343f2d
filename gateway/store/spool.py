"""Durable file storage for received instances and produced reports.

A file is first written under ``<root>/.incoming/<process tag>/``, fsynced, then renamed into its
final directory and that directory fsynced; directories created on the way are fsynced into their
parents. After ``write_atomic`` or ``adopt`` returns, the bytes and the path to them survive a
crash or power loss, and a reader never sees a half-written file under a final name.

Temporary files live in one folder per process (host, PID and a random token in its name), so a
process that starts can tell which leftovers belong to a process that died (same host, PID gone)
and remove exactly those (``remove_orphans``), never a file another live process is writing.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import BinaryIO

from osteogate.gateway.core.uids import require_uid

INCOMING = ".incoming"
# Temporary files of releases before per-process folders were named like this, beside their target.
_LEGACY_TMP = ".incoming-"
_LEGACY_MAX_AGE_S = 3600.0

_TOKEN = secrets.token_hex(4)


def process_tag() -> str:
    """``host-pid-token``: unique per process, and says whether its owner can still be alive."""
    host = socket.gethostname()[:40].replace("-", "_") or "host"
    return f"{host}-{os.getpid()}-{_TOKEN}"


class SpoolError(OSError):
    """Writing to the spool failed (disk full, permissions): the sender must be told to retry."""


class Spool:
    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def instance_path(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        """Relative path of an instance; every part is a validated UID, so no part can escape."""
        return Path(
            require_uid(study_uid, "StudyInstanceUID"),
            require_uid(series_uid, "SeriesInstanceUID"),
            require_uid(sop_uid, "SOPInstanceUID") + ".dcm",
        )

    def report_path(self, study_uid: str, sop_uid: str) -> Path:
        return Path(require_uid(study_uid, "StudyInstanceUID"), require_uid(sop_uid, "SOPInstanceUID") + ".dcm")

    def absolute(self, relative: Path | str) -> Path:
        path = (self.root / relative).resolve()
        # Belt and braces: paths come from validated UIDs, but rows in SQL could be edited by hand.
        if not path.is_relative_to(self.root):
            raise SpoolError(f"path {relative} escapes the spool")
        return path

    # -- temporary files ---------------------------------------------------------------------------

    @property
    def incoming_dir(self) -> Path:
        """This process's folder for files still being received or written."""
        path = self.root / INCOMING / process_tag()
        if not path.is_dir():
            _makedirs_durable(path)
        return path

    def new_incoming(self) -> tuple[BinaryIO, Path]:
        """An open, empty temporary file (binary, write) in this process's incoming folder."""
        try:
            fd, name = tempfile.mkstemp(prefix="rx-", suffix=".tmp", dir=self.incoming_dir)
        except OSError as exc:
            raise SpoolError(f"could not create a temporary file: {exc.strerror or exc}") from exc
        return os.fdopen(fd, "wb"), Path(name)

    # -- durable writes ----------------------------------------------------------------------------

    def adopt(self, temporary: Path, relative: Path | str) -> None:
        """Move a finished temporary file (from ``new_incoming``) to ``relative``, durably."""
        target = self.absolute(relative)
        try:
            with open(temporary, "rb+") as handle:
                os.fsync(handle.fileno())
            _makedirs_durable(target.parent)
            os.replace(temporary, target)
            _fsync_dir(target.parent)
        except OSError as exc:
            raise SpoolError(f"could not store {relative}: {exc.strerror or exc}") from exc

    def write_atomic(self, relative: Path | str, data: bytes) -> str:
        """Write ``data`` durably; returns its sha256. Raises SpoolError on any OS failure."""
        handle, tmp = self.new_incoming()
        try:
            with handle:
                handle.write(data)
                handle.flush()
            self.adopt(tmp, relative)
        except OSError as exc:
            raise SpoolError(f"could not store {relative}: {exc.strerror or exc}") from exc
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        return hashlib.sha256(data).hexdigest()

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    # -- start-up housekeeping ---------------------------------------------------------------------

    def remove_orphans(self, legacy_scan: bool = True) -> int:
        """Delete temporary files left by dead processes of this host (and stale ones of any
        host, a day old); returns how many files went. Safe while other processes run."""
        removed = 0
        incoming = self.root / INCOMING
        if incoming.is_dir():
            for folder in incoming.iterdir():
                if folder.is_dir() and _owner_gone(folder):
                    removed += sum(1 for p in folder.iterdir() if p.is_file())
                    shutil.rmtree(folder, ignore_errors=True)
        if legacy_scan:
            removed += self.remove_legacy_temporaries()
        return removed

    def remove_legacy_temporaries(self) -> int:
        """``.incoming-*.tmp`` beside spooled files (written by older releases) older than an hour."""
        removed = 0
        cutoff = time.time() - _LEGACY_MAX_AGE_S
        for dirpath, dirnames, filenames in os.walk(self.root):
            if INCOMING in dirnames:
                dirnames.remove(INCOMING)
            for name in filenames:
                if name.startswith(_LEGACY_TMP) and name.endswith(".tmp"):
                    path = Path(dirpath) / name
                    with contextlib.suppress(FileNotFoundError):
                        if path.stat().st_mtime < cutoff:
                            path.unlink()
                            removed += 1
        return removed

    def release_incoming(self) -> None:
        """On a clean stop: remove this process's (by then empty) incoming folder."""
        folder = self.root / INCOMING / process_tag()
        with contextlib.suppress(OSError):
            folder.rmdir()


def _owner_gone(folder: Path) -> bool:
    """True if ``folder`` (named by ``process_tag``) belongs to a dead process on this host, or
    is a day old whoever owns it."""
    if folder.name == process_tag():
        return False
    try:
        if time.time() - folder.stat().st_mtime > 86400:
            return True
    except FileNotFoundError:
        return False
    parts = folder.name.rsplit("-", 2)
    if len(parts) != 3 or not parts[1].isdigit():
        return False
    host, pid = parts[0], int(parts[1])
    if host != process_tag().rsplit("-", 2)[0]:
        return False  # another host's process: we cannot tell whether it is alive
    if pid == os.getpid():
        return True  # our PID, another token: a previous life of this container
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _makedirs_durable(directory: Path) -> None:
    """``mkdir -p`` whose every new entry is fsynced into its parent (a new study or series
    directory must survive power loss, or the file renamed into it is lost with it)."""
    missing: list[Path] = []
    path = directory
    while not path.is_dir():
        missing.append(path)
        if path.parent == path:
            break
        path = path.parent
    for path in reversed(missing):
        try:
            path.mkdir()
        except FileExistsError:
            if not path.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(path)) from None
            continue  # created meanwhile by another thread: its creator fsyncs the parent
        _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
