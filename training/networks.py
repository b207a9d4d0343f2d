"""Thin layer over model/network.py: weight sources for training, region-row selection."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from model.card import ModelCard
from model.network import build_network
from training.config import TrainConfig


class PretrainedUnavailable(RuntimeError):
    """--pretrained asked for timm hub weights and they could not be fetched (offline machine)."""


def create_network(card: ModelCard, config: TrainConfig) -> tuple[nn.Module, str]:
    """(network, weights_source text for the card)."""
    init_from = Path(config.init_from) if config.init_from else None
    try:
        net = build_network(card, pretrained=config.pretrained, init_from=init_from)
    except RuntimeError as exc:
        if config.pretrained:
            raise PretrainedUnavailable(str(exc)) from exc
        raise
    if config.pretrained:
        return net, f"timm hub ({card.architecture} pretrained weights)"
    if init_from is not None:
        return net, f"local file {init_from.name}"
    return net, (
        "random init (trained from scratch: no ImageNet/timm hub weights could be fetched on the "
        "training machine, which has no network access)"
    )


def region_rows(logits: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
    """[B, R, C] logits + [B] region indices -> [B, C] (each image's own region head)."""
    return logits[torch.arange(logits.shape[0], device=logits.device), regions]
