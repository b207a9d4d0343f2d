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
from osteogate.training.config import TrainConfig

VERSION = "1.2.0"  # the shipped card's version: the one command of REPORT.md reproduces it

INTENDED_USE = (
    "Research prototype: estimates the densitometry T-score and flags knee (and, by the covariates alone, "
    "spine) studies that may show low bone mineral density, from the patient's age, sex, weight and height in "
    "the DICOM header and the radiograph, as a prompt for DXA referral. Not a diagnosis and not a substitute "
    "for densitometry. Not cleared for clinical use."
)
LIMITATIONS = (
    "The image network was trained from scratch (no ImageNet/timm hub weights could be fetched on the training "
    "machine) on a few hundred public knee radiographs from two small collections with overlapping, partly noisy "
    "labels. All figures come from 5-fold grouped cross-validation on the 167 m7md images of one public patient "
    "table (ages 17-107) and have wide confidence intervals; covariates outside the validated ranges are not used. "
    "The spine image head is untrained on real data (synthetic tests only): spine studies get the covariates-only "
    "estimate. Unknown behaviour on other scanners, populations, implants, fractures, children. Operating "
    "thresholds were chosen on out-of-fold predictions of this small set."
)


def signal_warning(metrics: dict[str, Any], fusion: dict[str, Any] | None = None) -> str:
    """A loud first sentence for the card when the image network's cross-validation shows no discrimination.

    Readers of a card (and of the SR that cites it) must not mistake a chance-level model for a
    screening tool; the rule is mechanical so nobody has to remember to write it. With fusion heads
    the warning is about the image network alone (the covariate heads have their own figures).
    """
    auc = metrics.get("cross_validation", {}).get("pooled_out_of_fold", {}).get("auc_low_bmd")
    if not auc or auc["ci_low"] > 0.5:
        return ""
    figures = (f"cross-validated low-BMD ROC-AUC {auc['value']:.2f} "
               f"(95 % CI {auc['ci_low']:.2f}-{auc['ci_high']:.2f}, includes 0.5 = chance)")
    if fusion and fusion.get("situations"):
        return (f"IMAGE NETWORK: NO DEMONSTRATED DISCRIMINATION: {figures}; the image network's own outputs carry no "
                "reliable information about bone density and are never reported alone. ")
    return f"NO DEMONSTRATED DISCRIMINATION: {figures}; outputs carry no reliable information about bone density. "


def fusion_statement(fusion: dict[str, Any]) -> str:
    """First words of the card's limitations: what the reported results rest on."""
    if not fusion:
        return ""
    decisions = fusion.get("image_decisions") or {}
    full = decisions.get("image+age+sex+weight+height")
    statement = ""
    if full is not None and not full["image_used"]:
        d = full["delta_auc_low_bmd"]
        statement = (f"COVARIATES FIRST: the reported estimates rest on the patient's age, sex, weight and height from "
                     f"the header; the image added nothing measurable in grouped validation (low-BMD AUC with minus "
                     f"without the image {d['value']:+.3f}, 95 % CI {d['ci_low']:+.3f} to {d['ci_high']:+.3f}). ")
    return statement + labels_statement(fusion)


def labels_statement(fusion: dict[str, Any]) -> str:
    """What a label means at the operating points of the all-covariates situation (card limitations)."""
    situations = fusion.get("situations") or {}
    entry = situations.get("image+age+sex+weight+height") or situations.get("age+sex+weight+height")
    points = ((entry or {}).get("validation") or {}).get("operating_points") or {}
    low, grade = points.get("low_bmd") or {}, points.get("osteoporosis") or {}
    if not all(isinstance(p.get(k), dict) for p in (low, grade) for k in ("sensitivity", "specificity")):
        return ""
    return (f"LABELS (all covariates, grouped CV): low BMD (osteopenia or osteoporosis) is flagged at sensitivity "
            f"{low['sensitivity']['value']:.2f} / specificity {low['specificity']['value']:.2f}, a prompt for DXA; "
            f"'osteoporosis' is a severity grade within that flag at sensitivity {grade['sensitivity']['value']:.2f} / "
            f"specificity {grade['specificity']['value']:.2f}. ")


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

