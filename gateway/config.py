"""Gateway configuration: one TOML file, every key overridable by an environment variable.

A key ``port`` in section ``[dicom]`` is overridden by ``OSTEOGATE_DICOM_PORT``. Values are
validated once at start; a bad value stops the gateway with a message naming the key, because a
half-configured gateway that silently falls back to defaults is worse than one that refuses to
start.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

ENV_PREFIX = "OSTEOGATE_"
_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # DICOM AE VR: no backslash, no control chars
_DEST_RE = re.compile(r"^(?P<aet>[^@]{1,16})@(?P<host>[^:@]+):(?P<port>\d{1,5})$")


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

    @field_validator("ae_title")
    @classmethod
    def _valid_ae_title(cls, value: str) -> str:
        return _check_ae_title(value)

    @classmethod
    def parse(cls, text: str) -> Destination:
        """Parse ``AET@HOST:PORT`` as written on the command line."""
        match = _DEST_RE.match(text.strip())
        if not match:
            raise ValueError(f"destination {text!r} is not AET@HOST:PORT")
        return cls(ae_title=match["aet"], host=match["host"], port=int(match["port"]))

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DicomConfig(_Section):
    ae_title: str = "OSTEOGATE"
    bind: str = "0.0.0.0"
    port: int = Field(11112, ge=1, le=65535)
    max_associations: int = Field(16, ge=1)
    # Calling AE titles allowed to store; empty means any.
    allowed_calling_aets: list[str] = []
    # Largest instance accepted, in MB; bigger ones are refused with 0xA700.
    max_instance_mb: int = Field(512, ge=1)
    network_timeout_seconds: float = Field(60, gt=0)

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

    @field_validator("destinations", mode="before")
    @classmethod
    def _parse_destinations(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if isinstance(value, list):
            return [Destination.parse(v) if isinstance(v, str) else v for v in value]
        return value


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
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

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


def env_overrides(environ: Mapping[str, str]) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Collect ``OSTEOGATE_<SECTION>_<KEY>`` values; unknown names are problems, not ignored."""
    values: dict[str, dict[str, Any]] = {}
    problems: list[str] = []
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or name in {"OSTEOGATE_CONFIG"}:
            continue
        rest = name[len(ENV_PREFIX):].lower()
        for section, model in SECTIONS.items():
            if rest.startswith(section + "_"):
                key = rest[len(section) + 1:]
                if key in model.model_fields:
                    annotation = model.model_fields[key].annotation
                    try:
                        values.setdefault(section, {})[key] = _coerce_env(raw, annotation)
                    except json.JSONDecodeError as exc:
                        problems.append(f"{section}.{key} (from {name}): not valid JSON: {exc}")
                    break
        else:
            problems.append(f"{name}: unknown setting (expected OSTEOGATE_<SECTION>_<KEY>)")
    return values, problems


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    merged = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for section, items in extra.items():
        if isinstance(items, Mapping):
            merged.setdefault(section, {}).update(items)
        else:
            merged[section] = items
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
