"""model/network.py: real forward passes, local init, untrained checkpoints."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from osteogate.model.card import InputSpec, ModelCard
from osteogate.model.checkpoint import load_checkpoint, read_card
from osteogate.model.network import build_network, create_untrained_checkpoint
from safetensors.torch import save_file


@pytest.mark.parametrize("architecture", ["efficientnet_b0", "osteogate_smallcnn"])
def test_forward_shape(architecture):
    card = ModelCard(architecture=architecture, regions=("knee", "spine", "hip"), input=InputSpec(size=64))
    network = build_network(card).eval()
    with torch.inference_mode():
        logits = network(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 3, 3)
    assert torch.isfinite(logits).all()
    # Heads are independent: different regions give different logits for the same image.
    assert not torch.allclose(logits[:, 0], logits[:, 1])


def test_single_channel_input():
    card = ModelCard(architecture="osteogate_smallcnn", input=InputSpec(channels=1, mean=[0.5], std=[0.25]))
    with torch.inference_mode():
        assert build_network(card).eval()(torch.randn(1, 1, 32, 32)).shape == (1, 2, 3)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_init_from_local_file(tmp_path, suffix):
    card = ModelCard(architecture="osteogate_smallcnn")
    source = build_network(card)
    backbone_state = {k: v.clone() for k, v in source.backbone.state_dict().items()}
    backbone_state["classifier.weight"] = torch.zeros(10, 256)  # timm-style head: ignored
    path = tmp_path / f"backbone{suffix}"
    if suffix == ".pth":
        torch.save({"state_dict": backbone_state}, path)
    else:
        save_file(backbone_state, str(path))
    target = build_network(card, init_from=path)
    for key, value in source.backbone.state_dict().items():
        assert torch.equal(target.backbone.state_dict()[key], value), key


def test_init_from_whole_checkpoint_and_mismatch(tmp_path):
    path = create_untrained_checkpoint(tmp_path / "small.safetensors", "osteogate_smallcnn", seed=5)
    state, card = load_checkpoint(path)
    network = build_network(card, init_from=path)
    assert torch.equal(network.backbone.features[0].weight, state["backbone.features.0.weight"])
    with pytest.raises(ValueError, match="no tensor matches"):
        build_network(ModelCard(architecture="efficientnet_b0", input=InputSpec(size=64)), init_from=path)


def test_untrained_checkpoint(tmp_path):
    a = create_untrained_checkpoint(tmp_path / "a.safetensors", "osteogate_smallcnn", seed=1)
    b = create_untrained_checkpoint(tmp_path / "b.safetensors", "osteogate_smallcnn", seed=1)
    c = create_untrained_checkpoint(tmp_path / "c.safetensors", "osteogate_smallcnn", seed=2)
    card = read_card(a)
    assert card.trained is False and card.display_name.startswith("UNTRAINED ")
    assert "not for clinical use" in card.intended_use.lower() and card.limitations
    sa, sb, sc = (load_checkpoint(p)[0] for p in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["heads.knee.weight"], sc["heads.knee.weight"])


def test_pretrained_offline_gives_clear_error(tmp_path):
    with pytest.raises(RuntimeError, match="init-from"):
        build_network(ModelCard(architecture="osteogate_smallcnn"), pretrained=True)
    # Simulate "no network" for the hub path in a subprocess (HF_HUB_OFFLINE is read at import time).
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path)}
    code = (
        "from osteogate.model.card import ModelCard; from osteogate.model.network import build_network\n"
        "try:\n    build_network(ModelCard(), pretrained=True)\nexcept RuntimeError as e:\n"
        "    assert 'could not download pretrained weights' in str(e) and '--init-from' in str(e), e\n"
        "else:\n    raise SystemExit('no error')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, env=env)
