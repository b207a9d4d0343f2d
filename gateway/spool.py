"""Durable file storage for received instances and produced reports.

A file is written to a temporary name in its final directory, fsynced, renamed into place and the
directory fsynced: after ``write_atomic`` returns, the bytes survive a crash or power loss, and a
reader never sees a half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from osteogate.gateway.uids import require_uid


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

    def write_atomic(self, relative: Path | str, data: bytes) -> str:
        """Write ``data`` durably; returns its sha256. Raises SpoolError on any OS failure."""
        target = self.absolute(relative)
        tmp_name = None
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(prefix=".incoming-", suffix=".tmp", dir=target.parent)
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp_name, target)
            tmp_name = None
            _fsync_dir(target.parent)
        except OSError as exc:
            raise SpoolError(f"could not store {relative}: {exc.strerror or exc}") from exc
        finally:
            if tmp_name is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp_name)
        return hashlib.sha256(data).hexdigest()

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
