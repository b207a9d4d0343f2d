"""Orthanc as a real PACS for integration tests (DICOM C-STORE in, REST API to inspect).

By default a bare Orthanc (no plugins, no authentication). Options add what DICOMweb and routing
tests need: the DICOMweb plugin (Debian package orthanc-dicomweb) on the HTTP port, HTTP basic
authentication, HTTPS, Lua scripts, DICOM modalities, or a whole base configuration (the
deploy/orthanc recipe) of which only ports, folders and plugin paths are replaced.
"""

from __future__ import annotations

import base64
import glob
import json
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .net import free_port, wait_until

ORTHANC_BIN = "/usr/sbin/Orthanc"
# Where Debian's orthanc-dicomweb puts the plugin (a symlink in plugins/ to the versioned file).
DICOMWEB_PLUGIN_GLOBS = (
    "/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
    "/usr/lib/orthanc/libOrthancDicomWeb.so*",
    "/usr/lib/*/orthanc/libOrthancDicomWeb.so*",
)


def orthanc_binary() -> str | None:
    return shutil.which("Orthanc") or (ORTHANC_BIN if Path(ORTHANC_BIN).is_file() else None)


def dicomweb_plugin() -> str | None:
    """Path of the Orthanc DICOMweb plugin, or None when orthanc-dicomweb is not installed."""
    for pattern in DICOMWEB_PLUGIN_GLOBS:
        for path in sorted(glob.glob(pattern)):
            if Path(path).is_file():
                return path
    return None


class OrthancServer:
    """One throwaway Orthanc: own config, storage and index under `workdir`, free ports, HTTP
    bound to localhost only (RemoteAccessAllowed false).

    Options: ``dicomweb`` loads the DICOMweb plugin at ``/dicom-web/`` (``.dicomweb_url`` is its
    STOW-RS URL); ``users`` turns on HTTP basic authentication (the helper's own REST calls use the
    first user); ``lua_scripts`` and ``modalities`` as in Orthanc's configuration; ``base_config``
    starts from a given configuration instead of the bare one (ports, folders, plugins and the
    test-only safety settings are still set here). HTTPS is left to a TLS proxy in front
    (tests/helpers/tls_proxy.py), as sites do: Debian's Orthanc 1.10.1 crashes on its first
    HTTPS connection (SslEnabled) on this platform.
    """

    def __init__(
        self,
        workdir: Path,
        ae_title: str = "ORTHANC",
        host: str = "127.0.0.1",
        *,
        dicomweb: bool = False,
        users: Mapping[str, str] | None = None,
        lua_scripts: Sequence[Path] = (),
        modalities: Mapping[str, Any] | None = None,
        base_config: Mapping[str, Any] | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.ae_title = ae_title
        self.host = host
        self.dicomweb = dicomweb
        self.users = dict(users or {})
        self.lua_scripts = [Path(p) for p in lua_scripts]
        self.modalities = dict(modalities or {})
        self.base_config = dict(base_config) if base_config is not None else None
        self.port = free_port()
        self.http_port = free_port()
        while self.http_port == self.port:
            self.http_port = free_port()
        self.http_url = f"http://{host}:{self.http_port}"
        self.dicomweb_url = f"{self.http_url}/dicom-web/studies"
        self.config_path = self.workdir / "orthanc.json"
        self.log_path = self.workdir / "orthanc.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def config(self) -> dict[str, Any]:
        if self.base_config is not None:
            return self._recipe_config()
        config = self._bare_config()
        if self.users:
            config["AuthenticationEnabled"] = True
            config["RegisteredUsers"] = self.users
        if self.lua_scripts:
            config["LuaScripts"] = [str(p) for p in self.lua_scripts]
        if self.modalities:
            config["DicomModalities"] = self.modalities
        if self.dicomweb:
            config.update(self._dicomweb_config())
        return config

    def _dicomweb_config(self) -> dict[str, Any]:
        plugin = dicomweb_plugin()
        if plugin is None:
            raise RuntimeError("the Orthanc DICOMweb plugin (Debian package orthanc-dicomweb) is not installed")
        return {
            "Plugins": [plugin],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False,
                         "Host": f"{self.host}:{self.http_port}"},
        }

    def _recipe_config(self) -> dict[str, Any]:
        """The given configuration with what must differ on a test machine replaced: ports,
        folders, plugin paths, Lua paths, and remote access (a test Orthanc is never reachable
        from outside this machine)."""
        assert self.base_config is not None
        config = json.loads(json.dumps(self.base_config))  # deep copy
        config.update({
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "HttpPort": self.http_port,
            "DicomPort": self.port,
            "DicomAet": self.ae_title,
            "RemoteAccessAllowed": False,
            "SaveJobs": False,
        })
        config["Plugins"] = []
        if config.get("DicomWeb", {}).get("Enable"):
            web = self._dicomweb_config()
            config["Plugins"] = web["Plugins"]
            # The recipe's DICOMweb settings stand; only where this server answers changes.
            config["DicomWeb"] = {**config["DicomWeb"], "Host": web["DicomWeb"]["Host"]}
        if self.lua_scripts:
            config["LuaScripts"] = [str(p) for p in self.lua_scripts]
        if self.modalities:
            config["DicomModalities"] = self.modalities
        if self.users:
            config["AuthenticationEnabled"] = True
            config["RegisteredUsers"] = self.users
        return config

    def _bare_config(self) -> dict[str, Any]:
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

    def _request(self, path: str, data: bytes | None = None, method: str | None = None,
                 content_type: str | None = None, timeout: float = 30) -> bytes:
        request = urllib.request.Request(self.http_url + path, data=data, method=method)
        if content_type:
            request.add_header("Content-Type", content_type)
        if self.users:
            user, password = next(iter(self.users.items()))
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.read()

    def get(self, path: str, timeout: float = 10) -> Any:
        """GET `path` on the REST API and decode the JSON answer."""
        return json.loads(self._request(path, timeout=timeout))

    def get_bytes(self, path: str, timeout: float = 30) -> bytes:
        return self._request(path, timeout=timeout)

    def post(self, path: str, body: Any, timeout: float = 60) -> Any:
        """POST JSON (or raw bytes) to the REST API and decode the JSON answer.

        Raises urllib.error.HTTPError for an error status (``.code`` is the HTTP status)."""
        if isinstance(body, bytes):
            data, content_type = body, "application/octet-stream"
        else:
            data, content_type = json.dumps(body).encode(), "application/json"
        answer = self._request(path, data=data, method="POST", content_type=content_type, timeout=timeout)
        return json.loads(answer) if answer.strip() else None

    def upload(self, path: Path) -> dict[str, Any]:
        """Store one DICOM file through the REST API (POST /instances), as a user uploading it."""
        return dict(self.post("/instances", Path(path).read_bytes()))

    def study_instances(self, study_uid: str) -> list[dict[str, Any]]:
        """Every instance of the study with this StudyInstanceUID, expanded (empty if none)."""
        found = self.post("/tools/lookup", study_uid.encode(), timeout=10) or []
        ids = [item["ID"] for item in found if item.get("Type") == "Study"]
        return list(self.get(f"/studies/{ids[0]}/instances?expand")) if ids else []

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


# -- the deploy/orthanc recipe -----------------------------------------------------------------------

RECIPE_DIR = Path(__file__).resolve().parents[2] / "deploy" / "orthanc"
RECIPE_CONFIG = RECIPE_DIR / "orthanc.json"
RECIPE_LUA = RECIPE_DIR / "osteogate-autoroute.lua"
GATEWAY_MODALITY = "OSTEOGATE"  # the gateway's key in the recipe's DicomModalities


def recipe_orthanc(workdir: Path, gateway_port: int, *, stable_age: int | None = None,
                   gateway_host: str = "127.0.0.1") -> OrthancServer:
    """An Orthanc configured by deploy/orthanc exactly, except what a test machine needs: the
    gateway modality's host and port (compose: service "gateway", 11112), the Lua script's path
    (compose mounts it under /etc/orthanc), optionally a shorter StableAge, and what
    OrthancServer always sets (free ports, folders, plugin path, no remote access)."""
    config = json.loads(RECIPE_CONFIG.read_text(encoding="utf-8"))
    aet = config["DicomModalities"][GATEWAY_MODALITY][0]
    config["DicomModalities"][GATEWAY_MODALITY] = [aet, gateway_host, gateway_port]
    assert len(config["LuaScripts"]) == 1 and Path(config["LuaScripts"][0]).name == RECIPE_LUA.name
    config["LuaScripts"] = [str(RECIPE_LUA)]
    if stable_age is not None:
        config["StableAge"] = stable_age
    return OrthancServer(workdir, ae_title=config["DicomAet"], base_config=config)
