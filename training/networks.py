"""Thin layer over model/network.py: weight sources for training, region-row selection."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch
from osteogate.model.card import ModelCard
from osteogate.model.network import build_network
from osteogate.training.config import TrainConfig
from torch import nn


class PretrainedUnavailable(RuntimeError):
    """--pretrained asked for timm hub weights and they could not be fetched (offline machine)."""


def hub_unreachable_reason(timeout: float = 3.0) -> str | None:
    """Why the timm/Hugging Face hub cannot be used right now, or None if it answers.

    huggingface_hub retries with back-off for about a minute before giving up on an offline machine;
    one short TCP connect tells the user at once. HF_ENDPOINT (a mirror) is honoured.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        return f"cannot reach {host}:{port} ({exc})"


def create_network(card: ModelCard, config: TrainConfig) -> tuple[nn.Module, str]:
    """(network, weights_source text for the card)."""
    init_from = Path(config.init_from) if config.init_from else None
    if config.pretrained:
        reason = hub_unreachable_reason()
        if reason:
            raise PretrainedUnavailable(
                f"cannot download timm hub weights for {card.architecture!r}: {reason}. Without network access, "
                "train from scratch (default) or use --init-from FILE with a local safetensors/.pth state dict"
            )
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
