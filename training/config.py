"""Training configuration: dataclass defaults <- TOML file (`--config`) <- command-line flags."""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from osteogate.model.card import InputSpec
from osteogate.training.augment import AugmentConfig

# From-scratch single-channel models: grey radiographs need no RGB replication, and ImageNet
# statistics mean nothing without ImageNet weights. --pretrained switches to 3 channels + ImageNet.
GREY_MEAN = (0.5,)
GREY_STD = (0.25,)


@dataclass
class TrainConfig:
    architecture: str = "efficientnet_b0"
    mode: str = "patches"  # "whole" | "patches"
    size: int = 224  # whole-image input size
    patch_size: int = 128
    patches_per_image: int = 8  # at evaluation/serving (deterministic grid)
    train_patches: int = 4  # random patches per image per training step
    working_size: int = 1024  # long side of the image patches are cut from (near-native here)
    epochs: int = 12
    batch_size: int = 16  # images per step (x train_patches network inputs in patches mode)
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    patience: int = 4  # early stopping: epochs without validation improvement
    seed: int = 0
    threads: int = 2
    pretrained: bool = False
    init_from: str = ""
    amp: bool = True  # only on CUDA
    balance: str = "loss"  # "loss" (class-balanced weights) | "sampler" | "none"
    val_fraction: float = 0.2
    target_sensitivity: float = 0.90  # low-BMD operating point
    # The osteoporosis grade's operating point (training/metrics.OperatingRule): "label_f1" maximises
    # the reported label's macro-F1 with specificity >= osteoporosis_specificity; "specificity" takes
    # that specificity as its target; "sensitivity" is the 1.1.0 rule (over-calls; comparison only).
    osteoporosis_rule: str = "label_f1"
    osteoporosis_specificity: float = 0.80
    folds: int = 5
    phash_distance: int = 4
    conflict_policy: str = "resolve"
    progress: bool = True
    bootstrap: int = 1000  # resamples for the 95 % CIs of the CV metrics
    fusion: bool = True  # fit the covariate fusion heads (training/fusion.py) when the data has covariates
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    @property
    def channels(self) -> int:
        return 3 if self.pretrained else 1

    def input_spec(self) -> InputSpec:
        mean, std = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)) if self.pretrained else (GREY_MEAN, GREY_STD)
        return InputSpec(
            mode=self.mode,
            size=self.size,
            channels=self.channels,
            mean=mean,
            std=std,
            patch_size=self.patch_size,
            patches_per_image=self.patches_per_image,
            working_size=self.working_size,
            pooling="mean",
        )

    def operating_rule(self) -> Any:
        from osteogate.training.metrics import OperatingRule

        return OperatingRule(self.target_sensitivity, self.osteoporosis_rule, self.osteoporosis_specificity)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown training option(s): {', '.join(unknown)}")
        values = dict(values)
        if isinstance(values.get("augment"), dict):
            values["augment"] = AugmentConfig.from_dict(values["augment"])
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        if self.mode not in ("whole", "patches"):
            raise ValueError(f"mode must be 'whole' or 'patches', not {self.mode!r}")
        if self.balance not in ("loss", "sampler", "none"):
            raise ValueError(f"balance must be loss, sampler or none, not {self.balance!r}")
        if self.pretrained and self.init_from:
            raise ValueError("--pretrained and --init-from are mutually exclusive")
        self.input_spec()  # InputSpec validates sizes
        self.operating_rule()  # OperatingRule validates the rule and its targets


def load_config(path: Path | None, overrides: dict[str, Any]) -> TrainConfig:
    """TOML `[train]` table (or top level) then non-None overrides (command-line flags)."""
    values: dict[str, Any] = {}
    if path:
        with Path(path).open("rb") as handle:
            document = tomllib.load(handle)
        values.update(document.get("train", document))
    values.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig.from_dict(values)
