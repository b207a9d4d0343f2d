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
from urllib.parse import urlsplit

from osteogate.gateway.core.errors import ConfigurationError
from osteogate.gateway.core.groundtruth_config import GroundTruthConfig
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

ENV_PREFIX = "OSTEOGATE_"
# OSTEOGATE_* variables that are not gateway settings: the config file path, and the training
# pipeline's image cache directory (training/cache.py).
NOT_SETTINGS = {"OSTEOGATE_CONFIG", "OSTEOGATE_CACHE"}
_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # DICOM AE VR: no backslash, no control chars
_DEST_RE = re.compile(r"^(?P<aet>[^@]{1,16})@(?P<host>[^:@]+):(?P<port>\d{1,5})(?P<tls>\+tls)?$")


class ConfigError(ConfigurationError, ValueError):
    """Raised with every problem found, each naming its key (``section.key``).

    ``str()`` is one line (all problems, separated by ";"); ``problems`` has them one by one.
    """

    def __init__(self, problems: list[str], source: str | None = None) -> None:
        self.problems = problems
        count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
        super().__init__(f"invalid configuration{f' ({source})' if source else ''}",
                         f"{count}: " + "; ".join(problems),
                         "Fix the named keys; `osteogate config check FILE` lists every problem")


def _check_ae_title(value: str) -> str:
    value = value.strip()
    if not _AE_RE.match(value) or not value:
        raise ValueError("an AE title is 1-16 printable characters without backslash")
    return value


_DIMSE_FIELDS = ("ae_title", "host", "port", "tls")
_WEB_FIELDS = ("url", "username", "password", "password_file", "password_env", "token", "token_file",
               "token_env", "tls_verify", "ca_file")
# deliveries.destination (gateway/store/db.py) holds str(destination) in 128 characters.
_MAX_DESTINATION_TEXT = 128
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class Destination(BaseModel):
    """Where the result objects (SR, result card) go: a PACS by DICOM C-STORE, given as
    ``AET@HOST:PORT`` (``ae_title``/``host``/``port``/``tls``), or a DICOMweb STOW-RS endpoint
    (``url``, PS3.18 10.5) with optional HTTP basic or bearer authentication.

    Secrets may be written inline, but ``password_file``/``token_file`` (a file holding only the
    secret) or ``password_env``/``token_env`` (the name of an environment variable) keep them out
    of the TOML file; they are read at each send (gateway/deliver/stow.py), so a rotated secret is picked
    up without a restart. ``str()`` never contains a secret: it is what the deliveries table and
    the logs record, and it is how a delivery finds its destination's settings again.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    # DICOM C-STORE
    ae_title: str | None = None
    host: str | None = None
    port: int | None = Field(None, ge=1, le=65535)
    tls: bool = False
    # DICOMweb STOW-RS
    url: str | None = None
    username: str | None = None
    password: SecretStr | None = None
    password_file: Path | None = None
    password_env: str | None = None
    token: SecretStr | None = None
    token_file: Path | None = None
    token_env: str | None = None
    tls_verify: bool = True
    ca_file: Path | None = None

    @field_validator("ae_title")
    @classmethod
    def _valid_ae_title(cls, value: str | None) -> str | None:
        return None if value is None else _check_ae_title(value)

    @field_validator("url")
    @classmethod
    def _valid_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip().rstrip("/")
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"url {value!r} is not an http:// or https:// URL with a host")
        if parts.username is not None or parts.password is not None:
            # The URL is logged and stored in SQL: credentials belong in username/password(_file).
            raise ValueError("url must not contain credentials; use username + password_file or token_file")
        if parts.query or parts.fragment:
            raise ValueError("url must not have a query or fragment")
        try:
            parts.port  # noqa: B018 -- raises ValueError for a port out of range
        except ValueError:
            raise ValueError(f"url {value!r} has an invalid port") from None
        if len(value) > _MAX_DESTINATION_TEXT:
            raise ValueError(f"url is longer than {_MAX_DESTINATION_TEXT} characters")
        return value

    @field_validator("password_env", "token_env")
    @classmethod
    def _valid_env_name(cls, value: str | None) -> str | None:
        if value is not None and not _ENV_NAME_RE.match(value):
            raise ValueError(f"{value!r} is not an environment variable name")
        return value

    @model_validator(mode="after")
    def _one_kind(self) -> Destination:
        given = self.model_fields_set
        if self.url is not None:
            stray = [f for f in _DIMSE_FIELDS if f in given and getattr(self, f) not in (None, False)]
            if stray:
                raise ValueError(f"a DICOMweb destination (url) takes no {', '.join(stray)}")
            self._check_web_auth()
            return self
        if self.ae_title is None or self.host is None or self.port is None:
            raise ValueError("a destination needs either url (DICOMweb) or ae_title, host and port (C-STORE)")
        stray = [f for f in _WEB_FIELDS if f in given and getattr(self, f) not in (None, True)]
        if stray:
            raise ValueError(f"a C-STORE destination takes no {', '.join(stray)} (those are for url)")
        if len(str(self)) > _MAX_DESTINATION_TEXT:
            raise ValueError(f"destination is longer than {_MAX_DESTINATION_TEXT} characters")
        return self

    def _check_web_auth(self) -> None:
        passwords = [n for n in ("password", "password_file", "password_env") if getattr(self, n) is not None]
        tokens = [n for n in ("token", "token_file", "token_env") if getattr(self, n) is not None]
        if len(passwords) > 1 or len(tokens) > 1:
            raise ValueError(f"give one of {' / '.join(passwords if len(passwords) > 1 else tokens)}")
        if passwords and tokens:
            raise ValueError("basic (username + password) and bearer (token) authentication exclude each other")
        if (self.username is None) != (not passwords):
            raise ValueError("username and a password (password, password_file or password_env) go together")
        for name in ("password_file", "token_file", "ca_file"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{name} {path} does not exist")
        for name in ("password_env", "token_env"):
            variable = getattr(self, name)
            if variable is not None and variable not in os.environ:
                raise ValueError(f"{name}: environment variable {variable} is not set")

    @property
    def kind(self) -> Literal["dimse", "dicomweb"]:
        """How results reach this destination: DICOM C-STORE or DICOMweb STOW-RS."""
        return "dicomweb" if self.url is not None else "dimse"

    @property
    def name(self) -> str:
        """Short name for logs: the called AE title, or the URL's host and path."""
        if self.url is not None:
            parts = urlsplit(self.url)
            return f"{parts.netloc}{parts.path}"
        return str(self.ae_title)

    @classmethod
    def parse(cls, text: str) -> Destination:
        """Parse ``AET@HOST:PORT`` (``+tls`` appended for TLS), or an http(s) STOW-RS URL, as
        written on the command line or in OSTEOGATE_DELIVERY_DESTINATIONS."""
        text = text.strip()
        if re.match(r"^https?://", text, re.IGNORECASE):
            return cls(url=text)
        match = _DEST_RE.match(text)
        if not match:
            raise ValueError(f"destination {text!r} is not AET@HOST:PORT or an http(s):// STOW-RS URL")
        return cls(ae_title=match["aet"], host=match["host"], port=int(match["port"]), tls=bool(match["tls"]))

    def __str__(self) -> str:
        if self.url is not None:
            return self.url
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

    @model_validator(mode="after")
    def _tls_needs_certificate(self) -> DicomConfig:
        # Checked here, not when the listener starts: `config check` must catch what `serve` dies on.
        if self.tls.enabled and not (self.tls.cert_file and self.tls.key_file):
            raise ValueError("tls.enabled = true needs tls.cert_file and tls.key_file (the server certificate "
                             "and its key); without them the listener cannot start")
        return self

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
    threads: int = Field(0, ge=0)  # ONNX Runtime threads; 0: one per core (gateway/work/prefetch.py model_threads)
    # Images of a slow codec (JPEG 2000, JPEG-LS, JPEG lossless) decoded at once; 0: one per core, at
    # most 4. Others are decoded one at a time beside the model (gateway/work/prefetch.py decode_plan).
    decoders: int = Field(0, ge=0, le=64)
    decode_in_subprocess: bool = True  # those decoders are processes (gateway/work/decoding.py); false: threads


class ReportConfig(_Section):
    """What is sent back for each result: the SR always; the result card image when enabled."""

    result_card: bool = True


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

    def resolve(self, text: str) -> Destination:
        """The destination a delivery row names (``str(destination)``): the configured one, with
        its credentials and TLS settings, or else parsed from the text (``resend --to``)."""
        for destination in self.destinations:
            if str(destination) == text:
                return destination
        return Destination.parse(text)


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
    # "section.key" -> where its value came from (filled by load_settings; see source_of).
    _sources: dict[str, str] = PrivateAttr(default_factory=dict)

    dicom: DicomConfig = Field(default_factory=DicomConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    study: StudyConfig = Field(default_factory=StudyConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    worker: WorkerConfig = Field(default_factory=WorkerConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    delivery: DeliveryConfig = Field(default_factory=DeliveryConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    retention: RetentionConfig = Field(default_factory=RetentionConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    groundtruth: GroundTruthConfig = Field(default_factory=GroundTruthConfig)

    @model_validator(mode="after")
    def _check_calling_aet(self) -> Settings:
        if self.delivery.calling_ae_title:
            _check_ae_title(self.delivery.calling_ae_title)
        return self

    @property
    def delivery_calling_aet(self) -> str:
        return self.delivery.calling_ae_title or self.dicom.ae_title

    def source_of(self, key: str) -> str:
        """Where a setting (``section.key``) came from, for messages: "the command line",
        "OSTEOGATE_STORAGE_DATA_DIR in the environment", "the configuration file X" or "the default"."""
        return self._sources.get(key, "the default")


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


_SECRET_KEYS = {"password", "token"}


def _redacted(value: Any) -> Any:
    """The rejected input as shown in an error message, with inline secrets masked."""
    if isinstance(value, Mapping):
        return {k: "**********" if k in _SECRET_KEYS and v else _redacted(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redacted(v) for v in value]
    return value


def _format_errors(exc: ValidationError) -> list[str]:
    problems = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        value = err.get("input")
        # A whole section (a model-level check) is not worth echoing back.
        got = "" if isinstance(value, dict) else f" (got {_redacted(value)!r})"
        message = err["msg"].removeprefix("Value error, ")
        problems.append(f"{key}: {message}{got}")
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
        except OSError as exc:
            raise ConfigError([f"config file {path} cannot be read: {exc.strerror or exc}"]) from None
    data_file = data
    env_values, env_problems = env_overrides(environ)
    problems.extend(env_problems)
    data = _merge(data, env_values)
    data = _merge(data, overrides or {})
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(problems + _format_errors(exc), source=str(path) if path else None) from None
    if problems:
        raise ConfigError(problems, source=str(path) if path else None)
    sources = settings._sources
    for origin, values in ((f"the configuration file {path}", data_file),
                           ("the environment", env_values), ("the command line", overrides or {})):
        for section, items in values.items():
            for key in items if isinstance(items, Mapping) else ():
                name = f"{ENV_PREFIX}{section.upper()}_{key.upper()}" if origin == "the environment" else None
                sources[f"{section}.{key}"] = f"{name} in {origin}" if name else origin
    return settings
