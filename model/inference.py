"""Classifier: checkpoint -> predictions, on ONNX Runtime (CPU) or torch (CUDA).

The CPU path never imports torch (torch costs ~1 s of import and a few hundred MB of RSS per process);
torch is imported only for the torch backend or when an ONNX file must be (re-)exported.

Scoring (``score_images``): logits of the image's region row, divided by ``card.temperature``
(calibration), softmax over classes; in patches mode the per-patch probabilities are averaged (mean
pooling of probabilities, not logits, so one extreme patch cannot dominate). ``assess`` then fuses the
image scores with the header covariates and applies the gate (model/scoring.py, numpy only); the
legacy ``predict`` labels each image alone with the card's thresholds (model/scoring.decide_label).
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from osteogate.model.assessment import ImageScore, StudyAssessment
from osteogate.model.card import ModelCard
from osteogate.model.checkpoint import checkpoint_sha256, read_card
from osteogate.model.covariates import Covariates
from osteogate.model.preprocess import Box, PreparedImage, prepare_image
from osteogate.model.scoring import assess_study, decide_label, load_fusion_heads
from osteogate.model.taxonomy import check_card_taxonomy

log = logging.getLogger(__name__)

SHA_KEY = "osteogate.checkpoint_sha256"  # same value as model.export.SHA_KEY (export imports torch)
INPUT_NAME, OUTPUT_NAME = "image", "logits"
DEFAULT_CACHE_DIR = Path("~/.cache/osteogate")


@dataclass
class Prediction:
    """The image network's output for one image (legacy ``Classifier.predict``).

    Attributes
    ----------
    probabilities : dict of str to float
        Class name -> probability, from the image alone.
    label : str
        The most probable class.
    region : str
        The region head that scored it.
    n_inputs : int
        Network inputs pooled into it (patches per image in patches mode).
    """

    probabilities: dict[str, float]
    label: str
    region: str
    n_inputs: int = 1  # network inputs pooled into this prediction (patches_per_image in patches mode)


class Backend(Protocol):
    """An inference engine for the image network: ONNX Runtime on CPU, torch on CUDA.

    Attributes
    ----------
    name : str
        The backend's name as results record it ("onnxruntime", "torch-cuda").
    """

    name: str

    def run(self, batch: np.ndarray) -> np.ndarray:
        """float32 [B, C, H, W] -> float32 logits [B, n_regions, n_classes]."""
        ...


def cuda_present() -> bool:
    """Cheap GPU probe that avoids importing torch on machines without an NVIDIA driver.

    Returns
    -------
    bool
    """
    if Path("/dev/nvidiactl").exists():
        return True
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        result = subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0 and b"GPU" in result.stdout


class OnnxBackend:
    """ONNX Runtime on CPU. Must not import torch."""

    def __init__(self, onnx_path: Path, intra_op_threads: int | None = None, spin_wait: bool = True) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if intra_op_threads:
            options.intra_op_num_threads = int(intra_op_threads)
        if not spin_wait:
            # Idle pool threads sleep instead of spinning: the cores are shared with decoders that
            # run while the model does (spinning threads took their CPU: benchmarks/inference.py).
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(onnx_path), sess_options=options,
                                            providers=["CPUExecutionProvider"])
        self.path = Path(onnx_path)
        self.name = "onnxruntime-cpu"
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(batch, dtype=np.float32)})[0]


class TorchBackend:
    """torch eager: CUDA (channels_last + fp16 autocast) when available, else CPU fp32."""

    def __init__(self, checkpoint_path: Path, device: str = "auto") -> None:
        import torch
        from osteogate.model.checkpoint import load_checkpoint
        from osteogate.model.network import build_network

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' requested but torch sees no CUDA GPU")
        state, card = load_checkpoint(checkpoint_path)
        network = build_network(card)
        network.load_state_dict(state, strict=True)
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        network = network.to(self.device).eval()
        if self.cuda:
            network = network.to(memory_format=torch.channels_last)  # faster convs on tensor cores
        self.network = network
        self.name = f"torch-{self.device.type}"
        self._torch = torch

    def run(self, batch: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            tensor = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)
            if self.cuda:
                tensor = tensor.contiguous(memory_format=torch.channels_last)
                with torch.autocast("cuda", dtype=torch.float16):
                    logits = self.network(tensor)
            else:
                logits = self.network(tensor)
            return logits.float().cpu().numpy()


def _fresh_session(path: Path, sha256: str, threads: int | None, spin_wait: bool = True) -> OnnxBackend | None:
    """An ONNX Runtime backend for ``path`` if it exists and was exported from this exact checkpoint.

    The sha is read from the session's metadata, so serving never needs the ``onnx`` package; the
    session is kept when it matches (no second parse of the model)."""
    if not path.is_file():
        return None
    try:
        backend = OnnxBackend(path, threads, spin_wait)
    except Exception as exc:  # corrupt/truncated file: treated as stale and re-exported
        log.warning("ignoring unreadable ONNX file %s: %s", path, exc)
        return None
    return backend if backend.metadata.get(SHA_KEY) == sha256 else None


class ModelUnavailable(RuntimeError):
    """No ONNX file for this checkpoint, and no torch to export one (a serving-only install)."""


def open_onnx(checkpoint_path: Path, sha256: str, cache_dir: Path | None, threads: int | None = None,
              spin_wait: bool = True) -> OnnxBackend:
    """ONNX backend for the checkpoint: the ``<stem>.onnx`` sibling if its sha matches, else
    ``<cache_dir>/<stem>-<sha16>.onnx`` (exported now if missing or stale; without torch that
    is refused with ModelUnavailable instead of attempted).

    Parameters
    ----------
    checkpoint_path : Path
        The checkpoint.
    sha256 : str
        Its sha256 (the sibling must match it).
    cache_dir : Path or None
        Where an export is cached when there is no current sibling.
    threads : int or None
        ONNX Runtime intra-op threads.
    spin_wait : bool
        Let ONNX Runtime spin-wait.

    Returns
    -------
    OnnxBackend
    """
    sibling = checkpoint_path.with_suffix(".onnx")
    cache = Path(cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR).expanduser()
    cached = cache / f"{checkpoint_path.stem}-{sha256[:16]}.onnx"
    for candidate in (sibling, cached):
        backend = _fresh_session(candidate, sha256, threads, spin_wait)
        if backend is not None:
            return backend
    if importlib.util.find_spec("torch") is None:
        raise ModelUnavailable(
            f"no ONNX file made from {checkpoint_path} (looked for {sibling} and {cached}, with its sha256) and "
            "torch, needed to export one, is not installed: export it where torch is "
            f"(osteogate export {checkpoint_path}) or install osteogate[train]")
    log.info("exporting %s to ONNX in %s (sibling missing or stale)", checkpoint_path.name, cache)
    cache.mkdir(parents=True, exist_ok=True)
    # A child process does the export: torch would otherwise stay loaded in the serving process.
    child = subprocess.run([sys.executable, "-m", "osteogate.model.export", str(checkpoint_path), str(cached)],
                           capture_output=True, text=True)
    if child.returncode != 0:
        raise RuntimeError(f"no up-to-date ONNX file for {checkpoint_path.name} and exporting one failed "
                           f"(is torch installed?): {child.stderr.strip()[-800:]}")
    backend = _fresh_session(cached, sha256, threads, spin_wait)
    if backend is None:
        raise RuntimeError(f"exported {cached} but it does not carry the checkpoint sha256")
    return backend


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


class Classifier:
    """Loaded model + card; ``predict`` turns decoded images into Predictions."""

    def __init__(self, card: ModelCard, sha256: str, backend: Backend, path: Path) -> None:
        # A checkpoint naming other classes or regions would put wrong names into every report.
        check_card_taxonomy(card.classes, card.regions, f"model card of {Path(path).name}")
        self.fusion_heads = load_fusion_heads(card)  # malformed fusion parameters fail here, at start
        self.card = card
        self.sha256 = sha256
        self.backend = backend
        self.path = path
        self.last_timings: dict[str, float] = {}

    @property
    def backend_name(self) -> str:
        return self.backend.name

    @property
    def untrained(self) -> bool:
        return not self.card.trained

    @classmethod
    def load(cls, path: Path | str, backend: str = "auto", device: str = "auto",
             cache_dir: Path | str | None = None, intra_op_threads: int | None = None,
             spin_wait: bool = True) -> Classifier:
        """backend: "auto" (torch on a CUDA GPU, else ONNX Runtime), "onnx" or "torch";
        device: "auto", "cpu" or "cuda" (torch backend only; "cpu" with "auto" means ONNX Runtime);
        spin_wait=False: ONNX Runtime's idle threads sleep (for a process that decodes meanwhile)."""
        path = Path(path)
        card = read_card(path)
        check_card_taxonomy(card.classes, card.regions, f"model card of {path.name}")
        load_fusion_heads(card)
        sha = checkpoint_sha256(path)
        if backend not in ("auto", "onnx", "torch"):
            raise ValueError(f"backend must be auto, onnx or torch, got {backend!r}")
        if device not in ("auto", "cpu") and not device.startswith("cuda"):
            raise ValueError(f"device must be auto, cpu or cuda[:N], got {device!r}")
        chosen = backend
        if backend == "auto":
            chosen = "onnx"
            if device != "cpu" and cuda_present():
                import torch

                if torch.cuda.is_available():
                    chosen = "torch"
            if device.startswith("cuda") and chosen != "torch":
                raise RuntimeError("device 'cuda' requested but no usable CUDA GPU was found")
        if chosen == "torch":
            engine: Backend = TorchBackend(path, device=device)
        else:
            if device.startswith("cuda"):
                raise ValueError("the onnx backend runs on CPU only; use backend='torch' for CUDA")
            # Thread count comes from the caller's configuration (the gateway's model.threads).
            engine = open_onnx(path, sha, Path(cache_dir) if cache_dir else None, intra_op_threads or None,
                               spin_wait)
        return cls(card, sha, engine, path)

    def _check_request(self, images: Sequence[np.ndarray | PreparedImage], regions: Sequence[str], batch_size: int) -> None:
        if len(images) != len(regions):
            raise ValueError(f"{len(images)} images but {len(regions)} regions")
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        for region in regions:
            if region not in self.card.regions:
                raise ValueError(f"region {region!r} not supported by this model (expects {list(self.card.regions)})")

    def prepare(self, image: np.ndarray | PreparedImage) -> PreparedImage:
        """The network inputs for one decoded image (patches or the letterboxed whole image)."""
        return image if isinstance(image, PreparedImage) else prepare_image(image, self.card.input)

    def _score(self, images: Sequence[np.ndarray | PreparedImage], regions: Sequence[str], batch_size: int
               ) -> list[tuple[np.ndarray, np.ndarray, int, tuple[Box, ...]]]:
        """Per image: (calibrated pooled probabilities, mean raw logits of its region row, inputs, boxes)."""
        if not images:
            self.last_timings = {"preprocess_ms": 0.0, "model_ms": 0.0, "n_images": 0, "n_inputs": 0}
            return []
        region_index = {region: i for i, region in enumerate(self.card.regions)}
        t0 = time.perf_counter()
        prepared = [self.prepare(image) for image in images]
        counts = [len(p.inputs) for p in prepared]
        boxes = [p.boxes for p in prepared]
        stacked = np.concatenate([p.inputs for p in prepared], axis=0)
        del prepared
        rows = np.repeat([region_index[r] for r in regions], counts)
        t1 = time.perf_counter()
        logits = np.concatenate([self.backend.run(stacked[i:i + batch_size])
                                 for i in range(0, len(stacked), batch_size)], axis=0)
        t2 = time.perf_counter()
        selected = logits[np.arange(len(rows)), rows].astype(np.float64)
        probabilities = _softmax(selected / self.card.temperature)
        out = []
        start = 0
        for count, image_boxes in zip(counts, boxes, strict=True):
            part = slice(start, start + count)
            out.append((probabilities[part].mean(axis=0), selected[part].mean(axis=0), count, image_boxes))
            start += count
        self.last_timings = {"preprocess_ms": (t1 - t0) * 1000, "model_ms": (t2 - t1) * 1000,
                             "n_images": len(images), "n_inputs": len(stacked)}
        return out

    def predict(self, images: Sequence[np.ndarray | PreparedImage], regions: Sequence[str], batch_size: int = 8) -> list[Prediction]:
        """Image-alone label per image (the pre-fusion API; the gateway moves to score_images + assess)."""
        self._check_request(images, regions, batch_size)
        predictions: list[Prediction] = []
        for region, (pooled, _, count, _) in zip(regions, self._score(images, regions, batch_size), strict=True):
            probs = {name: float(p) for name, p in zip(self.card.classes, pooled, strict=True)}
            predictions.append(Prediction(probs, decide_label(probs, self.card.thresholds), region, count))
        return predictions

    def score_images(self, images: Sequence[np.ndarray | PreparedImage], regions: Sequence[str],
                     batch_size: int = 8) -> list[ImageScore]:
        """The image network alone: one ImageScore per image (no label, no gate: see ``assess``).

        Call it with one image or a small batch at a time to overlap decoding with inference; images
        already made into inputs by ``prepare`` (on the decode thread) are used as they are."""
        self._check_request(images, regions, batch_size)
        scores = []
        for region, (pooled, logits, count, boxes) in zip(regions, self._score(images, regions, batch_size),
                                                          strict=True):
            scores.append(ImageScore(
                region=region,
                probabilities={name: float(p) for name, p in zip(self.card.classes, pooled, strict=True)},
                features=tuple(round(float(v), 6) for v in logits),
                boxes=tuple(boxes),
                n_inputs=count,
            ))
        return scores

    def assess(self, scores: Sequence[ImageScore], covariates: Covariates | None, region: str) -> StudyAssessment:
        """Fusion, calibration, T-score with its 80 % interval, thresholds and the gate (model/gate.py)
        for one study's images of ``region``. Pure numpy; never raises on missing inputs."""
        if region not in self.card.regions:
            raise ValueError(f"region {region!r} not supported by this model (expects {list(self.card.regions)})")
        wrong = [s.region for s in scores if s.region != region]
        if wrong:
            raise ValueError(f"assess({region!r}) got image scores of region(s) {sorted(set(wrong))}")
        return assess_study(self.card, self.fusion_heads, scores, covariates or Covariates(), region)
