"""model/checkpoint.py: safetensors + card round trip; read_card without torch."""

from __future__ import annotations

import hashlib
import json
import struct
import subprocess
import sys

import pytest
import torch
from osteogate.model.card import ModelCard
from osteogate.model.checkpoint import (
    CheckpointError,
    checkpoint_sha256,
    load_checkpoint,
    read_card,
    save_checkpoint,
)


def _state() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(4, 5, generator=generator)
    return {"a.weight": weight, "a.bias": torch.arange(4.0), "view": weight.t()}  # .t(): non-contiguous view


def test_round_trip(tmp_path):
    card = ModelCard(name="rt", version="2.0", trained=True, metrics={"auc": 0.8})
    path = tmp_path / "sub" / "m.safetensors"
    sha = save_checkpoint(path, _state(), card)
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest() == checkpoint_sha256(path)
    state, loaded = load_checkpoint(path)
    assert loaded == card and read_card(path) == card
    for key, value in _state().items():
        assert torch.equal(state[key], value)
    assert not list(tmp_path.glob("sub/.*tmp"))  # atomic write left no temp file


def test_read_card_does_not_import_torch(tmp_path):
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, _state(), ModelCard(name="no-torch"))
    code = (
        "import sys; from osteogate.model.checkpoint import read_card, checkpoint_sha256; "
        f"card = read_card({str(path)!r}); checkpoint_sha256({str(path)!r}); "
        "assert card.name == 'no-torch'; assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_card(tmp_path / "missing.safetensors")
    (tmp_path / "short").write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="not a safetensors"):
        read_card(tmp_path / "short")
    (tmp_path / "png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 100)
    with pytest.raises(CheckpointError, match="not a safetensors"):
        read_card(tmp_path / "png")
    header = json.dumps({"__metadata__": {"other": "x"}}).encode()
    (tmp_path / "nocard.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(CheckpointError, match="no 'osteogate.card'"):
        read_card(tmp_path / "nocard.safetensors")
    header = json.dumps({"__metadata__": {"osteogate.card": '{"format_version": 1, "temperature": -2}'}}).encode()
    (tmp_path / "badcard.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(CheckpointError, match="temperature"):
        read_card(tmp_path / "badcard.safetensors")
