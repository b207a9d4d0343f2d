"""Orthanc as a real PACS for integration tests (DICOM C-STORE in, REST API to inspect)."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from .net import free_port, wait_until

ORTHANC_BIN = "/usr/sbin/Orthanc"


def orthanc_binary() -> str | None:
    return shutil.which("Orthanc") or (ORTHANC_BIN if Path(ORTHANC_BIN).is_file() else None)


class OrthancServer:
    """One throwaway Orthanc: own config, storage and index under `workdir`, free ports, no
    plugins, HTTP bound to localhost only (RemoteAccessAllowed false) and no authentication."""

    def __init__(self, workdir: Path, ae_title: str = "ORTHANC", host: str = "127.0.0.1") -> None:
        self.workdir = Path(workdir)
        self.ae_title = ae_title
        self.host = host
        self.port = free_port()
        self.http_port = free_port()
        while self.http_port == self.port:
            self.http_port = free_port()
        self.http_url = f"http://{host}:{self.http_port}"
        self.config_path = self.workdir / "orthanc.json"
        self.log_path = self.workdir / "orthanc.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def config(self) -> dict[str, Any]:
        return {
            "Name": "OsteoGateTestPACS",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "StorageCompression": False,
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "SslEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": self.ae_title,
            "DicomPort": self.port,
            # The gateway may be configured with any called AE in tests; accept them all.
            "DicomCheckCalledAet": False,
            "DicomCheckModalityHost": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomModalities": {},
            "Plugins": [],
            "ConcurrentJobs": 1,
            "HttpThreadsCount": 4,
            # Nothing in a test needs the job history, and saving it costs disk writes.
            "SaveJobs": False,
        }

    def start(self, timeout: float = 60) -> OrthancServer:
        binary = orthanc_binary()
        if binary is None:
            raise RuntimeError("Orthanc is not installed")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.config(), indent=2))
        log = self.log_path.open("ab")
        try:
            self._proc = subprocess.Popen(
                [binary, str(self.config_path)], stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir
            )
        finally:
            log.close()
        try:
            wait_until(self._ready, timeout, interval=0.2)
        except (TimeoutError, RuntimeError) as exc:
            self.stop()
            raise RuntimeError(f"Orthanc did not start ({exc}): {self.log()}") from None
        return self

    def _ready(self) -> bool:
        if self._proc is not None and self._proc.poll() is not None:
            raise RuntimeError(f"Orthanc exited with {self._proc.returncode}")
        try:
            self.get("/system")
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False
        return True

    def stop(self, timeout: float = 20) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)

    def get(self, path: str, timeout: float = 10) -> Any:
        """GET `path` on the REST API and decode the JSON answer."""
        with urllib.request.urlopen(self.http_url + path, timeout=timeout) as resp:
            return json.loads(resp.read())

    def get_bytes(self, path: str, timeout: float = 30) -> bytes:
        with urllib.request.urlopen(self.http_url + path, timeout=timeout) as resp:
            return resp.read()

    def instances(self) -> list[dict[str, Any]]:
        """Every stored instance, expanded (ID, MainDicomTags, ParentSeries, ...)."""
        return list(self.get("/instances?expand"))

    def instance_tags(self, orthanc_id: str) -> dict[str, Any]:
        """Tags of one instance as keyword -> value (Orthanc's simplified-tags)."""
        return dict(self.get(f"/instances/{orthanc_id}/simplified-tags"))

    def instance_file(self, orthanc_id: str) -> bytes:
        """The stored DICOM file exactly as Orthanc received it."""
        return self.get_bytes(f"/instances/{orthanc_id}/file")

    def wait_for_instances(self, count: int = 1, timeout: float = 30) -> list[dict[str, Any]]:
        return wait_until(lambda: (found := self.instances()) and len(found) >= count and found, timeout)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except FileNotFoundError:
            return ""

    def __enter__(self) -> OrthancServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"OrthancServer({self.ae_title}@{self.host}:{self.port}, http={self.http_url})"
