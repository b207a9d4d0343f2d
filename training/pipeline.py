"""`osteogate train`: (optional) k-fold cross-validation, then the final model, its card and report.

One command produces everything shipped: CV metrics with CIs (the card's `metrics`), the final
network trained on all data but a grouped validation hold-out (early stopping, temperature,
thresholds), the checkpoint (model/checkpoint.py), a JSON copy of the card and report plots.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from osteogate.model.card import ModelCard
from osteogate.training.card_text import (  # noqa: F401 - re-exported
    INTENDED_USE,
    LIMITATIONS,
    fusion_statement,
    labels_statement,
    signal_warning,
)
from osteogate.training.config import TrainConfig

VERSION = "1.3.0"  # the shipped card's version: the one command of REPORT.md reproduces it

def base_card(config: TrainConfig, name: str = "osteogate-knee") -> ModelCard:
    return ModelCard(name=name, version=VERSION, architecture=config.architecture, input=config.input_spec())


def run_training(
    data: Path,
    config: TrainConfig,
    out: Path,
    report_dir: Path | None = None,
    command: str = "",
    cache_dir: Path | None = None,
    save_predictions: Path | None = None,
    cv_only: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    import torch
    from osteogate.model.checkpoint import save_checkpoint
    from osteogate.training.crossval import cross_validate
    from osteogate.training.engine import NetworkMethod, device_for, predict_logits, train_network
    from osteogate.training.fusion_report import fusion_stage, summaries
    from osteogate.training.metrics import fit_temperature, operating_thresholds, pooled_probs
    from osteogate.training.networks import create_network
    from osteogate.training.pool import build_pool
    from osteogate.training.reports import (
        plot_confusion,
        plot_reliability,
        plot_roc,
        plot_training_curves,
        write_json,
    )
    from osteogate.training.splits import holdout

    started = time.perf_counter()
    out = Path(out)
    create_network(base_card(config), config)  # fail fast (offline --pretrained, bad --init-from) before decoding
    report_dir = Path(report_dir) if report_dir else out.parent
    pool = build_pool(Path(data), config.working_size, cache_dir, config.phash_distance, config.conflict_policy, config.progress)
    log(f"pool: {len(pool)} images kept of {len(pool.all_samples)}, {len(np.unique(pool.groups))} groups, "
        f"{len(pool.dedup.conflicts)} label conflicts")
    card = base_card(config)
    metrics: dict[str, Any] = {}
    fusion: dict[str, Any] = {}
    plots: list[Path] = []
    histories: list[dict[str, list[float]]] = []
    if config.folds >= 2:
        cv = cross_validate(pool, lambda: NetworkMethod(config, card, log), config.architecture, config.folds,
                            config.seed, config.val_fraction, config.operating_rule(), log=log)
        metrics = {"cross_validation": cv.summary(n_boot=config.bootstrap), "evaluated_on": "out-of-fold predictions, 3-class-labelled images"}
        plots += [
            plot_confusion(report_dir / "cv_confusion.png", cv.y_true, cv.probs, f"{config.folds}-fold CV (calibrated)"),
            plot_roc(report_dir / "cv_roc.png", {config.architecture: (cv.y_true, cv.probs)}, f"{config.folds}-fold CV"),
            plot_reliability(report_dir / "cv_reliability.png", cv.y_true, {"uncalibrated": cv.probs_raw, "temperature-scaled": cv.probs}),
        ]
        histories = list(cv.history)
        if config.fusion:
            fused = fusion_stage(pool, cv.indices, cv.y_true, cv.probs, cv.folds, config.operating_rule(),
                                 config.seed, config.bootstrap, report_dir, log)
            if fused is not None:
                fusion, fusion_report = fused
                metrics["fusion_comparison"] = {key: fusion_report[key] for key in
                                                ("table", "paired_deltas", "n_images", "n_groups")}
                (report_dir / "fusion_table.md").write_text(fusion_report["markdown"] + "\n\n" + summaries(fusion)
                                                            + "\n")
                plots += [Path(p) for p in fusion_report.get("plots", [])]
        if save_predictions:
            np.savez(save_predictions, indices=cv.indices, y_true=cv.y_true, logits=cv.logits,
                     temperatures=cv.temperatures, folds=cv.folds)
    if cv_only:
        # Method comparisons: CV metrics and plots only, no final model (saves one training run).
        summary = {"config": config.to_dict(), "data": pool.summary(), "metrics": metrics, "fusion": fusion,
                   "command": command,
                   "plots": [str(p) for p in plots], "seconds": round(time.perf_counter() - started, 1)}
        write_json(report_dir / "cv_summary.json", summary)
        log(f"wrote {report_dir / 'cv_summary.json'}")
        return summary
    train, val = holdout(np.arange(len(pool)), pool.strata, pool.groups, config.val_fraction, config.seed)
    log(f"final model: {len(train)} training images, {len(val)} validation images")
    result = train_network(pool, train, val, config, card, log)
    val_eval = pool.evaluable(val)
    y_val = pool.labels[val_eval]
    val_logits = predict_logits(result.net, [pool.images[i] for i in val_eval], [pool.samples[i].region for i in val_eval],
                                card.input, device_for(config))
    temperature = fit_temperature(val_logits, y_val) if len(val_eval) else 1.0
    thresholds = operating_thresholds(y_val, pooled_probs(val_logits, temperature), config.operating_rule())
    training_info = {
        "data": pool.summary(),
        "config": config.to_dict(),
        "command": command,
        "epochs_run": len(result.history.get("train_loss", [])),
        "best_epoch": result.best_epoch,
        "final_model_train_seconds": round(result.seconds, 1),
        "total_seconds": round(time.perf_counter() - started, 1),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {config.threads} torch thread(s) per job, "
                   f"{'CUDA ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'CPU only'}",
        "history": result.history,
        "thresholds_rule": (
            "chosen on the final model's validation split (temperature-scaled, patch-pooled probabilities): "
            + "; ".join(rule["rule"] for rule in config.operating_rule().describe().values())
        ),
        "labels_rule": "binary-source 'osteoporosis' trains as the set {osteopenia, osteoporosis}; "
                       "duplicate groups resolved to 3-class labels, else dropped",
    }
    card = card.with_updates(
        temperature=round(float(temperature), 6), thresholds=thresholds, trained=True,
        weights_source=result.weights_source, training=training_info, metrics=metrics, fusion=fusion,
        intended_use=INTENDED_USE, limitations=fusion_statement(fusion) + signal_warning(metrics, fusion) + LIMITATIONS,
    )
    sha = save_checkpoint(out, {k: v.cpu() for k, v in result.net.state_dict().items()}, card)
    card_path = out.with_name(out.name.replace(".safetensors", "") + ".card.json")
    card_path.write_text(card.to_json(indent=2) + "\n")
    labels = [f"CV fold {k + 1}" for k in range(len(histories))] + ["final model"]
    plots.append(plot_training_curves(report_dir / "training_curves.png", [*histories, result.history], "", labels))
    summary = {"checkpoint": str(out), "sha256": sha, "card": str(card_path), "temperature": temperature,
               "thresholds": thresholds, "metrics": metrics, "plots": [str(p) for p in plots],
               "seconds": round(time.perf_counter() - started, 1)}
    log(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, sha256 {sha[:12]}) in {summary['seconds']:.0f}s")
    return summary

