"""Checkpoint files: a safetensors state_dict with the ModelCard JSON in the header metadata.

``read_card`` and ``checkpoint_sha256`` deliberately avoid torch: the CPU serving path (ONNX Runtime)
must be able to identify a checkpoint without paying torch's import time and memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from osteogate.model.card import ModelCard

if TYPE_CHECKING:
    import torch

CARD_KEY = "osteogate.card"
# safetensors caps its header at 100 MB; a bigger length field means "not a safetensors file".
_MAX_HEADER = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """A file that is not a usable OsteoGate checkpoint (missing, malformed, or without a card)."""


def _read_header(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) != 8:
            raise CheckpointError(f"{path} is not a safetensors file (shorter than 8 bytes)")
        (length,) = struct.unpack("<Q", prefix)
        if length < 2 or length > _MAX_HEADER or length > path.stat().st_size - 8:
            raise CheckpointError(f"{path} is not a safetensors file (bad header length {length})")
        raw = handle.read(length)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not a safetensors file (header is not JSON)") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is not a safetensors file (header is not an object)")
    return header


def read_metadata(path: Path | str) -> dict[str, str]:
    """The ``__metadata__`` string map of a safetensors file (empty when absent).

    Parameters
    ----------
    path : Path or str
        A safetensors file.

    Returns
    -------
    dict of str to str
    """
    metadata = _read_header(Path(path)).get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: __metadata__ is not an object")
    return metadata


def read_card(path: Path | str) -> ModelCard:
    """Parse the card straight from the safetensors header (no torch import).

    Parameters
    ----------
    path : Path or str
        A checkpoint.

    Returns
    -------
    ModelCard

    Raises
    ------
    ValueError
        When the file has no valid card.
    """
    metadata = read_metadata(path)
    if CARD_KEY not in metadata:
        raise CheckpointError(f"{path} has no {CARD_KEY!r} metadata: not an OsteoGate checkpoint")
    try:
        return ModelCard.from_json(metadata[CARD_KEY])
    except ValueError as exc:
        raise CheckpointError(f"{path}: invalid model card: {exc}") from exc


def checkpoint_sha256(path: Path | str) -> str:
    """sha256 of the whole file: the identity recorded in results, SRs and the ONNX sibling.

    Parameters
    ----------
    path : Path or str
        A checkpoint.

    Returns
    -------
    str
        Hex digest.
    """
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(path: Path | str, state_dict: Mapping[str, torch.Tensor], card: ModelCard) -> str:
    """Write weights + card atomically (temp file then rename); returns the file's sha256.

    Parameters
    ----------
    path : Path or str
        Where to write.
    state_dict : Mapping[str, torch.Tensor]
        The weights.
    card : ModelCard
        The card stored in the header.

    Returns
    -------
    str
        The written file's sha256.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    card.validate()
    # safetensors refuses shared or non-contiguous storage; clone makes each tensor standalone.
    tensors = {key: value.detach().to("cpu").contiguous().clone() for key, value in state_dict.items()}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata={CARD_KEY: card.to_json()})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return checkpoint_sha256(path)


def load_checkpoint(path: Path | str) -> tuple[dict[str, torch.Tensor], ModelCard]:
    """Weights (on CPU) and card.

    Parameters
    ----------
    path : Path or str
        A checkpoint.

    Returns
    -------
    tuple of (dict of str to torch.Tensor, ModelCard)

    Raises
    ------
    ValueError
        When the card is missing or invalid.
    """
    from safetensors.torch import load_file

    card = read_card(path)
    return load_file(str(path), device="cpu"), card
