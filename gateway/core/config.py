"""Gateway configuration: one TOML file, every key overridable by an environment variable.

A key ``port`` in section ``[dicom]`` is overridden by ``OSTEOGATE_DICOM_PORT``. Values are
validated once at start; a bad value stops the gateway with a message naming the key, because a
half-configured gateway that silently falls back to defaults is worse than one that refuses to
start.
"""

from __future__ import annotations

import difflib
import json
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from osteogate.gateway.core.backfill_config import BackfillConfig
from osteogate.gateway.core.destinations import Destination, check_ae_title
from osteogate.gateway.core.errors import ConfigurationError, ExitCode, OsteoGateError
from osteogate.gateway.core.gate_config import GateConfig
from osteogate.gateway.core.groundtruth_config import GroundTruthConfig
from osteogate.gateway.core.sections import (
    DeliveryConfig,
    DicomConfig,
    HttpConfig,
    LoggingConfig,
    ModelConfig,
    ReportConfig,
    RetentionConfig,
    SchedulerConfig,
    Section,
    StorageConfig,
    StudyConfig,
    TlsConfig,
    WorkerConfig,
)
from pydantic import (
    Field,
    PrivateAttr,
    ValidationError,
    model_validator,
)

__all__ = ["ConfigError", "Destination", "Settings", "load_settings", "SECTIONS", "TlsConfig", "DicomConfig", "StorageConfig", "StudyConfig", "ModelConfig", "ReportConfig", "WorkerConfig", "DeliveryConfig", "HttpConfig", "RetentionConfig", "SchedulerConfig", "LoggingConfig"]

ENV_PREFIX = "OSTEOGATE_"
# OSTEOGATE_* variables that are not gateway settings: the config file path, and the training
# pipeline's image cache directory (training/cache.py).
NOT_SETTINGS = {"OSTEOGATE_CONFIG", "OSTEOGATE_CACHE"}
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


class ConfigFileMissing(ConfigError):
    """The configuration file named (--config, OSTEOGATE_CONFIG) does not exist: exit 66 as for
    any named input that is missing, not 78 (a wrong file)."""

    exit_code = ExitCode.NOINPUT

    def __init__(self, path: str) -> None:
        self.problems = [f"config file {path} does not exist"]
        OsteoGateError.__init__(self, f"config file {path} does not exist", None,
                                "Check the path given to --config or OSTEOGATE_CONFIG")


class Settings(Section):
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
    backfill: BackfillConfig = Field(default_factory=BackfillConfig)
    gate: GateConfig = Field(default_factory=GateConfig)

    @model_validator(mode="after")
    def _check_calling_aet(self) -> Settings:
        if self.delivery.calling_ae_title:
            check_ae_title(self.delivery.calling_ae_title)
        return self

    @property
    def delivery_calling_aet(self) -> str:
        return self.delivery.calling_ae_title or self.dicom.ae_title

    def source_of(self, key: str) -> str:
        """Where a setting (``section.key``) came from, for messages: "the command line",
        "OSTEOGATE_STORAGE_DATA_DIR in the environment", "the configuration file X" or "the default"."""
        return self._sources.get(key, "the default")


SECTIONS: dict[str, type[Section]] = {
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


def _env_target(model: type[Section], key: str) -> tuple[list[str], Any] | None:
    """Map ``key`` (e.g. ``tls_cert_file``) to a field path in ``model`` (one nested level)."""
    if key in model.model_fields:
        return [key], model.model_fields[key].annotation
    for name, field in model.model_fields.items():
        nested = field.annotation
        if isinstance(nested, type) and issubclass(nested, Section) and key.startswith(name + "_"):
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


def _nul_bytes(data: Any, prefix: str = "") -> list[str]:
    """Keys whose text holds a NUL byte: no path or name can, and the OS would refuse it later
    as an internal error."""
    if isinstance(data, Mapping):
        return [p for key, value in data.items() for p in _nul_bytes(value, f"{prefix}{key}.")]
    if isinstance(data, list):
        return [p for value in data for p in _nul_bytes(value, prefix)]
    if isinstance(data, str) and "\x00" in data:
        return [f"{prefix.rstrip('.')}: contains a NUL byte"]
    return []


def _did_you_mean(loc: tuple[Any, ...]) -> str:
    """For an unknown key: ``; did you mean `port`?`` when a known key of its section is close."""
    model: Any = Settings
    for part in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(part)
        model = getattr(field, "annotation", None) if field else None
        if model is None:
            return ""
    known = list(getattr(model, "model_fields", {}))
    close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
    return f" (did you mean `{close[0]}`?)" if close else f" (known keys: {', '.join(known)})"


def _format_errors(exc: ValidationError) -> list[str]:
    problems = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        value = err.get("input")
        if err["type"] == "extra_forbidden":  # pydantic says "Extra inputs are not permitted"
            problems.append(f"{key}: unknown key{_did_you_mean(tuple(err['loc']))}")
            continue
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
        if "\x00" in str(path):
            raise ConfigError(["the config file path contains a NUL byte"])
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigFileMissing(str(path)) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError([f"{path}: not valid TOML: {exc}"]) from None
        except OSError as exc:
            raise ConfigError([f"config file {path} cannot be read: {exc.strerror or exc}"]) from None
    data_file = data
    env_values, env_problems = env_overrides(environ)
    problems.extend(env_problems)
    data = _merge(data, env_values)
    data = _merge(data, overrides or {})
    problems.extend(_nul_bytes(data))
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
