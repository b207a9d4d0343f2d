"""Network construction: a timm (or custom) backbone shared by all regions + one linear head per region.

Output is logits ``[B, n_regions, n_classes]``; inference picks the row of the image's region. One
backbone for knee and spine keeps a single ONNX graph and lets the regions share radiographic features,
while separate heads allow region-specific decision boundaries (bone density appears differently).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch
from osteogate.model.card import InputSpec, ModelCard
from osteogate.model.checkpoint import save_checkpoint
from torch import nn

log = logging.getLogger(__name__)

SMALLCNN = "osteogate_smallcnn"


class SmallCNN(nn.Module):
    """Custom CNN baseline (the original study compared a custom CNN against EfficientNet-B0).

    Five conv-bn-relu blocks with stride-2 downsampling then global average pooling; ~0.4 M parameters.
    Exposes ``num_features`` like a timm backbone created with ``num_classes=0``.
    """

    def __init__(self, in_chans: int = 3, widths: tuple[int, ...] = (16, 32, 64, 128, 256)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        previous = in_chans
        for width in widths:
            layers += [nn.Conv2d(previous, width, 3, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                       nn.Conv2d(width, width, 3, padding=1, bias=False),
                       nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            previous = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = previous
        # He init (as torchvision/timm CNNs): PyTorch's default conv init shrinks activations ~1.7x per
        # layer, so after 10 layers an eval-mode net would emit near-constant features.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.features(x)), 1)


# Custom architectures by name; anything else is looked up in timm.
CUSTOM_ARCHITECTURES: dict[str, Callable[[InputSpec], nn.Module]] = {
    SMALLCNN: lambda spec: SmallCNN(in_chans=spec.channels),
}


class OsteoNet(nn.Module):
    """Shared backbone + per-region linear heads -> logits ``[B, n_regions, n_classes]``."""

    def __init__(self, backbone: nn.Module, regions: tuple[str, ...], n_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        features = int(backbone.num_features)
        # ModuleDict keyed by region keeps state_dict keys readable (heads.knee.weight) and ordered.
        self.heads = nn.ModuleDict({region: nn.Linear(features, n_classes) for region in regions})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.backbone(x)
        return torch.stack([head(features) for head in self.heads.values()], dim=1)


def _timm_backbone(card: ModelCard, pretrained: bool) -> nn.Module:
    import timm

    if not pretrained:
        return timm.create_model(card.architecture, pretrained=False, num_classes=0,
                                 in_chans=card.input.channels)
    # Short hub timeouts so an offline machine fails in seconds rather than minutes; the user's own
    # settings win (setdefault). HF_HUB_OFFLINE is left alone: with a network, downloading is wanted.
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "10")
    try:
        return timm.create_model(card.architecture, pretrained=True, num_classes=0,
                                 in_chans=card.input.channels)
    except Exception as exc:  # timm/hf_hub raise many types (OSError, HTTPError, LocalEntryNotFound...)
        raise RuntimeError(
            f"could not download pretrained weights for {card.architecture!r} ({type(exc).__name__}: {exc}); "
            "without network access use --init-from FILE with a local safetensors/.pth state dict"
        ) from exc


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"init weights not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    else:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        # Training scripts often wrap the weights: {"state_dict": ...} or {"model": ...}.
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not contain a tensor state dict")
    return state


def load_backbone_weights(backbone: nn.Module, path: Path) -> tuple[list[str], list[str]]:
    """Load a local backbone state dict (strict=False); returns (missing, unexpected) keys.

    Accepts a bare timm state dict or an OsteoGate checkpoint (``backbone.`` prefix stripped); timm's
    classifier head keys are dropped because the backbone is built with ``num_classes=0``.

    Parameters
    ----------
    backbone : torch.nn.Module
        The backbone.
    path : Path
        A local state dict.

    Returns
    -------
    tuple of (list of str, list of str)
        Missing and unexpected keys.
    """
    state = _read_state_dict(Path(path))
    if any(key.startswith("backbone.") for key in state):
        state = {key[len("backbone."):]: value for key, value in state.items() if key.startswith("backbone.")}
    own = backbone.state_dict()
    head_keys = [k for k in state if k not in own and k.split(".")[0] in ("classifier", "fc", "head")]
    state = {k: v for k, v in state.items() if k not in head_keys}
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    state = {k: v for k, v in state.items() if k not in mismatched}
    result = backbone.load_state_dict(state, strict=False)
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys) + mismatched
    # BN step counters match on any architecture: they do not count as evidence of a right file.
    loaded = len([k for k in state if k in own and not k.endswith("num_batches_tracked")])
    if loaded == 0:
        raise ValueError(f"{path}: no tensor matches the backbone (wrong architecture?)")
    log.info("init_from %s: loaded %d/%d tensors, %d missing, %d unexpected/mismatched",
             path, loaded, len(own), len(missing), len(unexpected))
    if missing:
        log.warning("init_from missing keys (first 10): %s", missing[:10])
    if unexpected:
        log.warning("init_from unexpected or shape-mismatched keys (first 10): %s", unexpected[:10])
    return missing, unexpected


def build_network(card: ModelCard, pretrained: bool = False, init_from: Path | None = None) -> OsteoNet:
    """Network for ``card``: backbone by ``card.architecture``, heads per ``card.regions``.

    Parameters
    ----------
    card : ModelCard
        The card (architecture, regions, classes, input).
    pretrained : bool
        Load pretrained backbone weights where available locally.
    init_from : Path or None
        A local backbone state dict.

    Returns
    -------
    OsteoNet
    """
    if card.architecture in CUSTOM_ARCHITECTURES:
        if pretrained:
            raise RuntimeError(f"{card.architecture!r} has no pretrained weights; use --init-from FILE")
        backbone = CUSTOM_ARCHITECTURES[card.architecture](card.input)
    else:
        backbone = _timm_backbone(card, pretrained)
    if init_from is not None:
        load_backbone_weights(backbone, Path(init_from))
    return OsteoNet(backbone, card.regions, len(card.classes))


UNTRAINED_INTENDED_USE = (
    "Integration testing of the OsteoGate gateway only (DICOM receive, SR generation, delivery). "
    "Not for clinical use."
)
UNTRAINED_LIMITATIONS = (
    "Randomly initialised weights: outputs are meaningless and carry no diagnostic information. "
    "Every report produced with this model is labelled UNTRAINED."
)


def create_untrained_checkpoint(path: Path | str, architecture: str = "efficientnet_b0", seed: int = 0) -> Path:
    """Write a randomly initialised checkpoint (trained=False) so the gateway runs end to end without data.

    Parameters
    ----------
    path : Path or str
        Where to write.
    architecture : str
        Backbone name.
    seed : int
        Initialisation seed.

    Returns
    -------
    pathlib.Path
    """
    path = Path(path)
    card = ModelCard(
        name=f"osteogate-{architecture}", version="0.0.0", architecture=architecture, trained=False,
        weights_source=f"random init (seed {seed})", intended_use=UNTRAINED_INTENDED_USE,
        limitations=UNTRAINED_LIMITATIONS,
    )
    # fork_rng: seeding must not disturb the caller's global torch RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network = build_network(card)
    save_checkpoint(path, network.state_dict(), card)
    return path
