"""ONNX export of a checkpoint (for the torch-free CPU serving path) and a numerical parity check.

The exported graph carries ``osteogate.checkpoint_sha256`` and ``osteogate.card`` in its metadata_props,
so a stale ONNX sibling (checkpoint retrained, same file name) is detected and re-exported.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from osteogate.model.checkpoint import CARD_KEY, checkpoint_sha256, load_checkpoint

log = logging.getLogger(__name__)

SHA_KEY = "osteogate.checkpoint_sha256"
INPUT_NAME, OUTPUT_NAME = "image", "logits"


def _load_network(checkpoint_path: Path):  # noqa: ANN202 - returns (OsteoNet, ModelCard); torch imported lazily
    from osteogate.model.network import build_network

    state, card = load_checkpoint(checkpoint_path)
    network = build_network(card)
    network.load_state_dict(state, strict=True)
    return network.eval(), card


def _torch_export(network: Any, dummy: Any, target: Path, opset: int) -> None:
    """TorchScript exporter first (dynamo=False: seconds faster, no onnxscript, fine for CNNs); the
    dynamo exporter only if the legacy one fails (it is deprecated and may disappear in a later torch)."""
    import torch

    common = {"input_names": [INPUT_NAME], "output_names": [OUTPUT_NAME], "opset_version": opset,
              "dynamic_axes": {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # we chose the legacy exporter on purpose
            torch.onnx.export(network, (dummy,), str(target), dynamo=False, do_constant_folding=True, **common)
    except Exception as exc:  # noqa: BLE001 - any failure: try the other exporter before giving up
        log.warning("TorchScript ONNX export failed (%s); retrying with the dynamo exporter", exc)
        torch.onnx.export(network, (dummy,), str(target), dynamo=True, external_data=False, **common)


def export_onnx(checkpoint_path: Path | str, onnx_path: Path | str | None = None, opset: int = 17) -> Path:
    """Export to ONNX (dynamic batch axis) next to the checkpoint unless ``onnx_path`` is given.

    Parameters
    ----------
    checkpoint_path : Path or str
        The checkpoint.
    onnx_path : Path or str or None
        Target (default: the ``.onnx`` sibling).
    opset : int
        ONNX opset.

    Returns
    -------
    pathlib.Path
        The ONNX file.
    """
    import onnx
    import torch

    checkpoint_path = Path(checkpoint_path)
    onnx_path = Path(onnx_path) if onnx_path is not None else checkpoint_path.with_suffix(".onnx")
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    sha = checkpoint_sha256(checkpoint_path)
    network, card = _load_network(checkpoint_path)
    size = card.input.model_size
    dummy = torch.zeros(1, card.input.channels, size, size)
    tmp = onnx_path.with_name(f".{onnx_path.name}.{os.getpid()}.tmp")
    try:
        _torch_export(network, dummy, tmp, opset)
        proto = onnx.load(str(tmp))
        del proto.metadata_props[:]
        for key, value in ((SHA_KEY, sha), (CARD_KEY, card.to_json())):
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))
        os.replace(tmp, onnx_path)
    finally:
        tmp.unlink(missing_ok=True)
    return onnx_path


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def check_parity(checkpoint_path: Path | str, onnx_path: Path | str, atol: float = 1e-4) -> float:
    """Max |p_torch - p_onnx| over all regions/classes on a fixed random batch; ValueError above ``atol``.

    Parameters
    ----------
    checkpoint_path : Path or str
        The checkpoint.
    onnx_path : Path or str
        Its ONNX export.
    atol : float
        Largest allowed difference.

    Returns
    -------
    float
        The largest difference found.

    Raises
    ------
    ValueError
        When it exceeds ``atol``.
    """
    import onnxruntime as ort
    import torch

    network, card = _load_network(Path(checkpoint_path))
    size = card.input.model_size
    # Fixed seed + ImageNet-like scale: deterministic and exercises the full dynamic range of BN layers.
    batch = np.random.default_rng(0).normal(0.0, 1.0, (2, card.input.channels, size, size)).astype(np.float32)
    with torch.inference_mode():
        expected = _softmax(network(torch.from_numpy(batch)).numpy().astype(np.float64))
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    actual = _softmax(session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0].astype(np.float64))
    if actual.shape != expected.shape:
        raise ValueError(f"ONNX output shape {actual.shape} != torch {expected.shape}")
    difference = float(np.max(np.abs(actual - expected)))
    if difference > atol:
        raise ValueError(f"ONNX/torch probability mismatch {difference:.3g} > atol {atol:g}")
    return difference


def main(argv: list[str] | None = None) -> int:
    """``python -m osteogate.model.export CHECKPOINT [ONNX]``: used by serving to export in a child process,
    so the serving process itself never imports torch (hundreds of MB of RSS).

    Parameters
    ----------
    argv : list of str or None
        Command-line arguments.

    Returns
    -------
    int
        Exit status.
    """
    import argparse

    parser = argparse.ArgumentParser(description="export an OsteoGate checkpoint to ONNX and check parity")
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("onnx", type=Path, nargs="?")
    args = parser.parse_args(argv)
    out = export_onnx(args.checkpoint, args.onnx)
    diff = check_parity(args.checkpoint, out)
    print(f"{out} (max probability difference {diff:.2e})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
