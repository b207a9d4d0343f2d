"""Gateway configuration: one TOML file, every key overridable by an environment variable.

A key ``port`` in section ``[dicom]`` is overridden by ``OSTEOGATE_DICOM_PORT``. Values are
validated once at start; a bad value stops the gateway with a message naming the key, because a
half-configured gateway that silently falls back to defaults is worse than one that refuses to
start.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

ENV_PREFIX = "OSTEOGATE_"
# OSTEOGATE_* variables that are not gateway settings: the config file path, and the training
# pipeline's image cache directory (training/cache.py).
NOT_SETTINGS = {"OSTEOGATE_CONFIG", "OSTEOGATE_CACHE"}
_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # DICOM AE VR: no backslash, no control chars
_DEST_RE = re.compile(r"^(?P<aet>[^@]{1,16})@(?P<host>[^:@]+):(?P<port>\d{1,5})(?P<tls>\+tls)?$")


class ConfigError(ValueError):
    """Raised with every problem found, each naming its key (``section.key``)."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid configuration:\n  " + "\n  ".join(problems))


def _check_ae_title(value: str) -> str:
    value = value.strip()
    if not _AE_RE.match(value) or not value:
        raise ValueError("an AE title is 1-16 printable characters without backslash")
    return value


class Destination(BaseModel):
    """A DICOM peer that receives the result SRs (a PACS)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    tls: bool = False

    @field_validator("ae_title")
    @classmethod
    def _valid_ae_title(cls, value: str) -> str:
        return _check_ae_title(value)

    @classmethod
    def parse(cls, text: str) -> Destination:
        """Parse ``AET@HOST:PORT`` (``+tls`` appended for TLS) as written on the command line."""
        match = _DEST_RE.match(text.strip())
        if not match:
            raise ValueError(f"destination {text!r} is not AET@HOST:PORT")
        return cls(ae_title=match["aet"], host=match["host"], port=int(match["port"]), tls=bool(match["tls"]))

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}" + ("+tls" if self.tls else "")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TlsConfig(_Section):
    """TLS for DICOM (PS3.15 B.1). Receiving: cert + key, and a CA to require client certificates.

    Sending: a CA to verify the PACS (always verified when TLS is on), and an optional client
    certificate + key for PACS that require mutual TLS.
    """

    enabled: bool = False
    cert_file: Path | None = None
    key_file: Path | None = None
    ca_file: Path | None = None

    @model_validator(mode="after")
    def _files_exist(self) -> TlsConfig:
        for name in ("cert_file", "key_file", "ca_file"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{name} {path} does not exist")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        return self


class DicomConfig(_Section):
    ae_title: str = "OSTEOGATE"
    bind: str = "0.0.0.0"
    port: int = Field(11112, ge=0, le=65535)  # 0: any free port (tests, demo)
    max_associations: int = Field(16, ge=1)
    # Calling AE titles allowed to store; empty means any.
    allowed_calling_aets: list[str] = []
    # Source addresses (IPs or CIDR networks) allowed to associate; empty means any.
    allowed_hosts: list[str] = []
    # Largest instance accepted, in MB; bigger ones are refused with 0xA700.
    max_instance_mb: int = Field(512, ge=1)
    network_timeout_seconds: float = Field(60, gt=0)
    # A new connection must finish its TLS handshake and send its A-ASSOCIATE-RQ within this
    # long, or it is closed; until then it holds no association slot.
    handshake_timeout_seconds: float = Field(5, gt=0)
    tls: TlsConfig = Field(default_factory=lambda: TlsConfig())

    @field_validator("allowed_hosts")
    @classmethod
    def _valid_networks(cls, value: list[str]) -> list[str]:
        for item in value:
            ipaddress.ip_network(item, strict=False)  # ValueError names the bad entry
        return value

    @field_validator("ae_title")
    @classmethod
    def _valid_ae_title(cls, value: str) -> str:
        return _check_ae_title(value)

    @field_validator("allowed_calling_aets")
    @classmethod
    def _valid_ae_titles(cls, value: list[str]) -> list[str]:
        return [_check_ae_title(v) for v in value]


class StorageConfig(_Section):
    data_dir: Path = Path("./var")
    # Empty: sqlite file inside data_dir.
    database_url: str = ""
    # New associations are refused below this much free space on the spool's disk.
    min_free_mb: int = Field(500, ge=0)

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @property
    def reports_dir(self) -> Path:
        return self.data_dir / "reports"

    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'osteogate.db').resolve()}"


class StudyConfig(_Section):
    # A study is complete after this long with no new instance.
    stable_seconds: float = Field(10, ge=0)
    check_interval_seconds: float = Field(1.0, gt=0)


class ModelConfig(_Section):
    # Empty: the checkpoint shipped with the package (or an untrained one made on first start).
    path: str = ""
    backend: Literal["auto", "onnx", "torch"] = "auto"
    device: str = "auto"
    batch_size: int = Field(8, ge=1)
    threads: int = Field(0, ge=0)  # 0: let the runtime decide


class WorkerConfig(_Section):
    enabled: bool = True
    poll_interval_seconds: float = Field(1.0, gt=0)
    # A job whose worker died is taken again once its lease expires.
    lease_seconds: float = Field(300, gt=0)
    max_attempts: int = Field(3, ge=1)


class DeliveryConfig(_Section):
    destinations: list[Destination] = []
    calling_ae_title: str = ""  # empty: dicom.ae_title
    retry_base_seconds: float = Field(5, gt=0)
    retry_max_seconds: float = Field(600, gt=0)
    check_interval_seconds: float = Field(2, gt=0)
    timeout_seconds: float = Field(30, gt=0)
    # TLS for sending to destinations marked tls (``AET@HOST:PORT+tls`` or tls = true).
    tls: TlsConfig = Field(default_factory=lambda: TlsConfig())

    @field_validator("destinations", mode="before")
    @classmethod
    def _parse_destinations(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if isinstance(value, list):
            return [Destination.parse(v) if isinstance(v, str) else v for v in value]
        return value


class HttpConfig(_Section):
    """/healthz and /metrics. Off by default and bound to localhost: it is for the site's monitoring."""

    enabled: bool = False
    bind: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)


class RetentionConfig(_Section):
    """Spool housekeeping: delivered, finished studies lose their image files after this long."""

    # Days after the last received instance; 0 keeps spooled images forever. SRs are always kept.
    spool_days: float = Field(0, ge=0)


class SchedulerConfig(_Section):
    """Intervals of the periodic maintenance jobs (completion and delivery have their own)."""

    stale_jobs_seconds: float = Field(60, gt=0)
    retention_seconds: float = Field(3600, gt=0)
    selfcheck_seconds: float = Field(86400, gt=0)  # daily: disk, database, C-ECHO of destinations


class LoggingConfig(_Section):
    format: Literal["auto", "json", "console"] = "auto"
    level: Literal["debug", "info", "warning", "error"] = "info"
    # Salt for the hashed study keys in logs; set it per site so keys cannot be reversed by lookup.
    hash_salt: str = "osteogate"


class Settings(_Section):
    dicom: DicomConfig = Field(default_factory=DicomConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    study: StudyConfig = Field(default_factory=StudyConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    worker: WorkerConfig = Field(default_factory=WorkerConfig)
    delivery: DeliveryConfig = Field(default_factory=DeliveryConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    retention: RetentionConfig = Field(default_factory=RetentionConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)

    @model_validator(mode="after")
    def _check_calling_aet(self) -> Settings:
        if self.delivery.calling_ae_title:
            _check_ae_title(self.delivery.calling_ae_title)
        return self

    @property
    def delivery_calling_aet(self) -> str:
        return self.delivery.calling_ae_title or self.dicom.ae_title


SECTIONS: dict[str, type[_Section]] = {
    name: field.annotation  # type: ignore[misc]
    for name, field in Settings.model_fields.items()
}


def _coerce_env(raw: str, annotation: Any) -> Any:
    """Environment values are strings; lists may be JSON or comma separated."""
    text = raw.strip()
    origin = getattr(annotation, "__origin__", None)
    if origin is list:
        if text.startswith("["):
            return json.loads(text)
        return [v.strip() for v in text.split(",") if v.strip()]
    return text


def _env_target(model: type[_Section], key: str) -> tuple[list[str], Any] | None:
    """Map ``key`` (e.g. ``tls_cert_file``) to a field path in ``model`` (one nested level)."""
    if key in model.model_fields:
        return [key], model.model_fields[key].annotation
    for name, field in model.model_fields.items():
        nested = field.annotation
        if isinstance(nested, type) and issubclass(nested, _Section) and key.startswith(name + "_"):
            inner = key[len(name) + 1:]
            if inner in nested.model_fields:
                return [name, inner], nested.model_fields[inner].annotation
    return None


def env_overrides(environ: Mapping[str, str]) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Collect ``OSTEOGATE_<SECTION>_<KEY>`` values; unknown names are problems, not ignored."""
    values: dict[str, dict[str, Any]] = {}
    problems: list[str] = []
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or name in NOT_SETTINGS:
            continue
        rest = name[len(ENV_PREFIX):].lower()
        for section, model in SECTIONS.items():
            if not rest.startswith(section + "_"):
                continue
            target = _env_target(model, rest[len(section) + 1:])
            if target is None:
                continue
            path, annotation = target
            try:
                value = _coerce_env(raw, annotation)
            except json.JSONDecodeError as exc:
                problems.append(f"{section}.{'.'.join(path)} (from {name}): not valid JSON: {exc}")
                break
            node = values.setdefault(section, {})
            for part in path[:-1]:
                node = node.setdefault(part, {})
            node[path[-1]] = value
            break
        else:
            problems.append(f"{name}: unknown setting (expected OSTEOGATE_<SECTION>_<KEY>)")
    return values, problems


def _merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """Deep merge: later sources override single keys, not whole sections."""
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _format_errors(exc: ValidationError) -> list[str]:
    problems = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        problems.append(f"{key}: {err['msg']} (got {err.get('input')!r})")
    return problems


def load_settings(
    path: Path | str | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> Settings:
    """Read the TOML file (if any), then environment variables, then explicit overrides (CLI flags).

    Raises ConfigError listing every problem at once.
    """
    environ = os.environ if environ is None else environ
    data: dict[str, Any] = {}
    problems: list[str] = []
    path = path or environ.get("OSTEOGATE_CONFIG")
    if path:
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError([f"config file {path} does not exist"]) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError([f"{path}: not valid TOML: {exc}"]) from None
    env_values, env_problems = env_overrides(environ)
    problems.extend(env_problems)
    data = _merge(data, env_values)
    data = _merge(data, overrides or {})
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(problems + _format_errors(exc)) from None
    if problems:
        raise ConfigError(problems)
    return settings
