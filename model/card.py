"""ModelCard: the JSON description that travels inside every checkpoint.

The card is the single source of truth for how an image becomes a model input (``InputSpec``) and how
the outputs are named (``classes``, ``regions``). Serving and training both read it, so a checkpoint is
self-describing and the gateway never needs side files. Validation is strict and names the bad field,
because a wrong card silently produces wrong reports.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, datetime
from typing import Any

from osteogate.model.taxonomy import CLASSES as DEFAULT_CLASSES
from osteogate.model.taxonomy import REGIONS as DEFAULT_REGIONS

FORMAT_VERSION = 1
IMAGENET_MEAN: tuple[float, ...] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, ...] = (0.229, 0.224, 0.225)
INPUT_MODES = ("whole", "patches")
POOLINGS = ("mean",)


def _now() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat()


def _require(condition: bool, name: str, message: str) -> None:
    if not condition:
        raise ValueError(f"model card field {name!r}: {message}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(float(value))


@dataclass(frozen=True)
class InputSpec:
    """How pixels are turned into network input; see model/preprocess.py."""

    mode: str = "whole"
    size: int = 224
    channels: int = 3
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    patch_size: int = 224
    patches_per_image: int = 8
    working_size: int = 1024
    pooling: str = "mean"

    def __post_init__(self) -> None:
        # Lists from JSON become tuples so the frozen dataclass stays hashable.
        object.__setattr__(self, "mean", tuple(self.mean))
        object.__setattr__(self, "std", tuple(self.std))
        self.validate()

    def validate(self) -> None:
        _require(self.mode in INPUT_MODES, "input.mode", f"must be one of {INPUT_MODES}, got {self.mode!r}")
        for name in ("size", "channels", "patch_size", "patches_per_image", "working_size"):
            value = getattr(self, name)
            _require(_is_int(value) and value > 0, f"input.{name}", f"must be a positive integer, got {value!r}")
        _require(self.channels in (1, 3), "input.channels", f"must be 1 or 3, got {self.channels}")
        _require(self.size <= 4096, "input.size", f"too large: {self.size}")
        _require(self.patch_size <= self.working_size, "input.patch_size",
                 f"must not exceed working_size ({self.patch_size} > {self.working_size})")
        for name in ("mean", "std"):
            values = getattr(self, name)
            _require(len(values) in (1, self.channels), f"input.{name}",
                     f"needs 1 or {self.channels} values, got {len(values)}")
            _require(all(_is_number(v) for v in values), f"input.{name}", "values must be finite numbers")
        _require(all(float(v) > 0 for v in self.std), "input.std", "values must be > 0")
        _require(self.pooling in POOLINGS, "input.pooling", f"must be one of {POOLINGS}, got {self.pooling!r}")

    @property
    def model_size(self) -> int:
        """Spatial size of one network input: the patch size in patches mode, else ``size``."""
        return self.patch_size if self.mode == "patches" else self.size

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["mean"], data["std"] = list(self.mean), list(self.std)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InputSpec:
        _require(isinstance(data, dict), "input", f"must be an object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        _require(not unknown, "input", f"unknown keys {unknown}")
        for name in ("mean", "std"):
            if name in data:
                _require(isinstance(data[name], list | tuple), f"input.{name}", "must be a list of numbers")
        return cls(**data)


@dataclass(frozen=True)
class ModelCard:
    """Everything a consumer must know about a checkpoint (ARCHITECTURE.md, "Model contract")."""

    name: str = "osteogate"
    version: str = "0.0.0"
    architecture: str = "efficientnet_b0"
    classes: tuple[str, ...] = DEFAULT_CLASSES
    regions: tuple[str, ...] = DEFAULT_REGIONS
    input: InputSpec = field(default_factory=InputSpec)
    temperature: float = 1.0
    thresholds: dict[str, float] = field(default_factory=dict)
    trained: bool = False
    weights_source: str = "random init"
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    # Late-fusion heads (image score + header covariates) with their per-input-situation grouped-CV
    # figures; schema in model/fusion.py. Empty for an image-only checkpoint.
    fusion: dict[str, Any] = field(default_factory=dict)
    intended_use: str = ""
    limitations: str = ""
    created: str = field(default_factory=_now)
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", tuple(self.classes))
        object.__setattr__(self, "regions", tuple(self.regions))
        self.validate()

    def validate(self) -> None:
        _require(self.format_version == FORMAT_VERSION, "format_version",
                 f"unsupported {self.format_version!r} (this code reads {FORMAT_VERSION})")
        for name in ("name", "version", "architecture"):
            value = getattr(self, name)
            _require(isinstance(value, str) and value.strip() != "", name, "must be a non-empty string")
        for name in ("classes", "regions"):
            values = getattr(self, name)
            _require(len(values) >= 1 and all(isinstance(v, str) and v for v in values), name,
                     "must be a non-empty list of non-empty strings")
            _require(len(set(values)) == len(values), name, f"duplicates in {list(values)}")
        _require(len(self.classes) >= 2, "classes", "needs at least two classes")
        _require(isinstance(self.input, InputSpec), "input", "must be an InputSpec")
        _require(_is_number(self.temperature) and self.temperature > 0, "temperature",
                 f"must be a finite number > 0, got {self.temperature!r}")
        _require(isinstance(self.thresholds, dict), "thresholds", "must be an object")
        for key, value in self.thresholds.items():
            _require(isinstance(key, str) and _is_number(value), "thresholds",
                     f"entry {key!r} must map a name to a number")
        _require(isinstance(self.trained, bool), "trained", "must be true or false")
        for name in ("weights_source", "intended_use", "limitations", "created"):
            _require(isinstance(getattr(self, name), str), name, "must be a string")
        for name in ("training", "metrics", "fusion"):
            _require(isinstance(getattr(self, name), dict), name, "must be an object")

    @property
    def display_name(self) -> str:
        """Name shown in the SR algorithm identification; untrained models must be obvious to a reader."""
        # The version travels separately (SR algorithm version, results table), so not repeated here.
        return self.name if self.trained else f"UNTRAINED {self.name}"

    def with_updates(self, **changes: Any) -> ModelCard:
        """Copy with fields changed (the dataclass is frozen); validation runs again."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["classes"], data["regions"] = list(self.classes), list(self.regions)
        data["input"] = self.input.to_dict()
        # Round-trip through JSON so callers get plain, JSON-safe containers (no shared references).
        return json.loads(json.dumps(data))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelCard:
        if not isinstance(data, dict):
            raise ValueError(f"model card must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        _require(not unknown, "card", f"unknown keys {unknown}")
        data = dict(data)
        _require("format_version" in data, "format_version", "missing")
        for name in ("classes", "regions"):
            if name in data:
                _require(isinstance(data[name], list | tuple), name, "must be a list of strings")
        if "input" in data:
            data["input"] = InputSpec.from_dict(data["input"])
        try:
            return cls(**data)
        except TypeError as exc:  # should not happen after the key check, but never leak a TypeError
            raise ValueError(f"model card: {exc}") from exc

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> ModelCard:
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"model card is not valid JSON: {exc}") from exc
        return cls.from_dict(data)
