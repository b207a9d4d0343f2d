"""`osteogate evaluate CHECKPOINT DATA`: metrics with CIs, plots and JSON for a checkpoint on a dataset.

Predictions use the checkpoint's own card (input spec, temperature) and serving's preprocessing and
pooling, so the numbers describe what the gateway would report. Only samples with true 3-class
labels are scored (binary-source labels cannot grade a 3-class output).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from osteogate.training.metrics import bootstrap, pooled_probs
from osteogate.training.reports import (
    plot_confusion,
    plot_reliability,
    plot_roc,
    plot_training_curves,
    write_json,
)


def load_network(checkpoint: Path) -> tuple[Any, Any]:
    """(torch network in eval mode, ModelCard)."""
    from osteogate.model.checkpoint import load_checkpoint
    from osteogate.model.network import build_network

    state, card = load_checkpoint(checkpoint)
    net = build_network(card)
    net.load_state_dict(state, strict=True)
    return net.eval(), card


def evaluate_checkpoint(checkpoint: Path, data: Path, out_dir: Path, n_boot: int = 1000, gradcam_samples: int = 8,
                        cache_dir: Path | None = None) -> dict[str, Any]:
    import torch
    from osteogate.model.taxonomy import CLASSES
    from osteogate.training.cache import ImageCache
    from osteogate.training.data import binary_sources, load_samples
    from osteogate.training.engine import predict_logits

    net, card = load_network(Path(checkpoint))
    samples = load_samples(Path(data))
    binary = binary_sources(samples)
    samples = [s for s in samples if s.source not in binary and s.region in card.regions]
    if not samples:
        raise ValueError(f"{data}: no 3-class labelled images for this model's regions {list(card.regions)}")
    cache = ImageCache(card.input.working_size, cache_dir)
    images = [cache.get(s.path) for s in samples]
    logits = predict_logits(net, images, [s.region for s in samples], card.input, torch.device("cpu"))
    y = np.array([CLASSES.index(s.label) for s in samples])
    raw = pooled_probs(logits)
    calibrated = pooled_probs(logits, card.temperature)
    metrics = bootstrap(y, calibrated, n_boot=n_boot)
    metrics["ece_before_calibration"] = bootstrap(y, raw, n_boot=n_boot)["ece"]
    out_dir = Path(out_dir)
    plots = [
        plot_confusion(out_dir / "confusion.png", y, calibrated, f"{card.name} on {Path(data).name}"),
        plot_roc(out_dir / "roc.png", {card.name: (y, calibrated)}),
        plot_reliability(out_dir / "reliability.png", y, {"uncalibrated": raw, f"T={card.temperature:.2f}": calibrated}),
    ]
    histories = card.training.get("history")
    if histories:
        plots.append(plot_training_curves(out_dir / "training_curves.png", [histories], "final model"))
    if gradcam_samples:
        from osteogate.training.gradcam import plot_gradcam

        pick = np.random.default_rng(0).choice(len(samples), min(gradcam_samples, len(samples)), replace=False)
        with torch.enable_grad():
            plots.append(plot_gradcam(
                out_dir / "gradcam.png", net, [images[i].astype(np.float32) / 255.0 for i in pick],
                [f"{samples[i].label} / p_op={calibrated[i, 2]:.2f}" for i in pick], card.input,
                [list(card.regions).index(samples[i].region) for i in pick],
            ))
    report = {
        "checkpoint": str(checkpoint),
        "data": str(data),
        "n_images": len(samples),
        "class_counts": {c: int((y == k).sum()) for k, c in enumerate(CLASSES)},
        "temperature": card.temperature,
        "metrics": metrics,
        "plots": [str(p) for p in plots],
    }
    write_json(out_dir / "evaluation.json", report)
    return report


def format_metrics(metrics: dict[str, dict[str, float]]) -> str:
    lines = [f"{'metric':<28}{'value':>8}  95% CI"]
    for key, value in metrics.items():
        lines.append(f"{key:<28}{value['value']:>8.3f}  [{value['ci_low']:.3f}, {value['ci_high']:.3f}]")
    return "\n".join(lines)
