"""A throwaway PostgreSQL cluster for tests (initdb + pg_ctl, trust auth, localhost only)."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from .net import free_port

PG_USER = "postgres"


def pg_bindir() -> Path | None:
    """Directory holding initdb/pg_ctl: PATH first, then Debian's versioned layout (newest)."""
    found = shutil.which("initdb")
    if found:
        # Resolve symlinks (e.g. /usr/local/bin/initdb -> /usr/lib/postgresql/15/bin/initdb) so
        # createdb/dropdb, which are often not linked alongside, are found next to it.
        return Path(found).resolve().parent
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    return Path(candidates[-1]).parent if candidates else None


def unavailable_reason() -> str | None:
    """Why a cluster cannot be created here (None when it can)."""
    if pg_bindir() is None:
        return "PostgreSQL server binaries (initdb) not installed"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(PG_USER)
        except KeyError:
            return f"running as root and there is no '{PG_USER}' OS user to run initdb as"
    return None


class PostgresCluster:
    """initdb + pg_ctl in a private temp directory.

    initdb refuses to run as root, and CI runs as root, so in that case every server-side
    command runs as the `postgres` OS user via runuser, in a directory chowned to it. The
    server listens on 127.0.0.1 only with its unix socket inside the data directory, so it
    neither clashes with nor exposes anything to a system PostgreSQL.
    """

    def __init__(self, database: str = "osteogate") -> None:
        bindir = pg_bindir()
        if bindir is None:
            raise RuntimeError("initdb not found")
        self.bindir = bindir
        self.database = database
        self.host = "127.0.0.1"
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="osteogate-pg-"))
        self.datadir = self.root / "data"
        self.logfile = self.root / "server.log"
        self._as_other_user = os.geteuid() == 0
        self.started = False

    @property
    def url(self) -> str:
        return self.url_for(self.database)

    def url_for(self, database: str) -> str:
        return f"postgresql+psycopg://{PG_USER}@{self.host}:{self.port}/{database}"

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self._as_other_user:
            cmd = ["runuser", "-u", PG_USER, "--", *cmd]
        # cwd inside our directory: the postgres user may not be allowed into the caller's cwd.
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=self.root, check=False)
        if proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def start(self) -> PostgresCluster:
        if self._as_other_user:
            user = pwd.getpwnam(PG_USER)
            os.chown(self.root, user.pw_uid, user.pw_gid)
        # --no-sync and fsync=off: a test cluster is disposable, durability only costs time.
        self._run("initdb", "-D", str(self.datadir), "-U", PG_USER, "-A", "trust", "-E", "UTF8",
                  "--locale=C", "--no-sync")  # fmt: skip
        options = (
            f"-p {self.port} -c listen_addresses={self.host} "
            f"-c unix_socket_directories={self.root} -c fsync=off -c full_page_writes=off "
            f"-c synchronous_commit=off -c max_connections=50"
        )
        self._run("pg_ctl", "-D", str(self.datadir), "-l", str(self.logfile), "-o", options, "-w", "-t", "60", "start")
        self.started = True
        self.create_database(self.database)
        return self

    def create_database(self, name: str) -> str:
        """CREATE DATABASE `name` (over TCP as the trusted superuser); returns its URL."""
        self._run("createdb", "-h", self.host, "-p", str(self.port), "-U", PG_USER, name)
        return self.url_for(name)

    def drop_database(self, name: str) -> None:
        self._run("dropdb", "--force", "-h", self.host, "-p", str(self.port), "-U", PG_USER, name)

    def stop(self) -> None:
        try:
            if self.started:
                self._run("pg_ctl", "-D", str(self.datadir), "-m", "immediate", "-w", "stop")
                self.started = False
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def log(self) -> str:
        try:
            return self.logfile.read_text(errors="replace")[-4000:]
        except FileNotFoundError:
            return ""
