"""The fusion stage of `osteogate train`: card.fusion, the comparison table and its figures.

One table, same grouped folds, group-bootstrap 95 % CIs, rows:
age alone; age + sex + BMI (logistic); the OST index as published; the image alone (the network's
own calibrated output); the covariates-only head; the fused model (image + covariates); the fused
model with the covariates removed (what a study without demographics gets). A paired bootstrap
of the fused minus the covariates-only low-BMD AUC says whether the image adds anything.

Refit the fusion only, from saved out-of-fold image predictions (minutes instead of a full run):

    python -m osteogate.training.fusion_report DATA --image-cv CV.npz --out DIR [--checkpoint IN.safetensors]

Operating thresholds (training/metrics.OperatingRule): low BMD at ``--target-sensitivity``; the
osteoporosis grade by ``--osteoporosis-rule`` (``label_f1``: maximise the reported label's macro-F1
with specificity >= ``--osteoporosis-specificity``; ``specificity``: that specificity as the target;
``sensitivity``: the 1.1.0 rule, for comparison).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from osteogate.model.taxonomy import T_SCORE_OSTEOPENIA
from osteogate.training.fusion import (
    MIN_ROWS,
    Candidate,
    FusionData,
    Predictions,
    build_fusion,
    cross_validate_head,
    group_bootstrap_indices,
    paired_delta,
    with_ci,
)
from osteogate.training.metrics import OperatingRule
from osteogate.training.pool import Pool

ALL_COVARIATES = ("age", "sex", "weight", "height")
TABLE_COLUMNS = (("accuracy", "Acc"), ("precision_macro", "Prec (macro)"), ("recall_macro", "Rec (macro)"),
                 ("f1_macro", "F1 (macro)"), ("auc_low_bmd", "AUC low BMD"), ("auc_osteoporosis", "AUC osteoporosis"),
                 ("label_f1_macro", "F1 (macro), reported label"), ("ece", "ECE"), ("t_score_mae", "T-score MAE"),
                 ("t_score_pearson_r", "Pearson r"))
# OST (Koh et al. 2001): 0.2 x (weight kg - age years); risk high < -4, moderate -4..-1, low > -1.
OST_CUTS = (-4.0, -1.0)
FIXED_LOGISTIC = Candidate("multinomial", 1.0)


def fusion_data(pool: Pool, indices: np.ndarray, y: np.ndarray, probs: np.ndarray | None, folds: np.ndarray
                ) -> FusionData:
    """Rows for the 3-class-labelled images that carry a T-score (out-of-fold image probabilities)."""
    keep = np.array([k for k, i in enumerate(indices) if pool.samples[i].t_score is not None], dtype=int)
    chosen = indices[keep]
    return FusionData(
        covariates=[pool.samples[i].covariates for i in chosen],
        image_probs=None if probs is None else probs[keep],
        y=np.asarray(y)[keep],
        t=np.array([pool.samples[i].t_score for i in chosen], dtype=np.float64),
        groups=np.asarray(pool.groups)[chosen],
        folds=np.asarray(folds)[keep],
    )


def ost_predictions(data: FusionData) -> Predictions | None:
    weight, age = data.columns["weight"], data.columns["age"]
    if not (np.isfinite(weight).all() and np.isfinite(age).all()):
        return None
    ost = 0.2 * (weight - age)
    labels = np.where(ost < OST_CUTS[0], 2, np.where(ost <= OST_CUTS[1], 1, 0))
    return Predictions(low_bmd_score=-ost, osteoporosis_score=-ost, labels=labels, correlate=ost)


def _head_predictions(cv: Any) -> Predictions:
    return Predictions(probs=cv.probs, labels=cv.labels, mu=cv.mu, low=cv.low, high=cv.high)


def comparison(data: FusionData, operating: OperatingRule, seed: int, n_boot: int, fusion_cvs: dict[str, Any],
               log: Callable[[str], None] = print) -> dict[str, Any]:
    """The table rows (metrics with CIs) and the paired image-contribution test."""
    draws = group_bootstrap_indices(data.groups, n_boot, seed)
    everything = np.arange(len(data))
    rows: list[dict[str, Any]] = []
    predictions: dict[str, Predictions] = {}

    def add(name: str, p: Predictions | None, note: str = "") -> None:
        if p is None:
            return
        predictions[name] = p
        rows.append({"method": name, "note": note, "metrics": with_ci(data.y, data.t, p, draws)})

    def full_rows(cv: Any) -> Predictions | None:
        return None if cv is None or not np.array_equal(cv.rows, everything) else _head_predictions(cv)

    age = cross_validate_head(data, ("age",), operating, seed, names=("age",), fixed=FIXED_LOGISTIC,
                              fixed_alpha=1e-6)
    add("age alone (logistic; linear T-score)", full_rows(age))
    asb = cross_validate_head(data, ("age", "sex", "weight", "height"), operating, seed,
                              names=("age", "female", "bmi"), fixed=FIXED_LOGISTIC, fixed_alpha=1e-6)
    add("age + sex + BMI (logistic; linear T-score)", full_rows(asb))
    add("OST index as published, 0.2 x (weight - age)", ost_predictions(data),
        "no probabilities: Acc/P/R/F1 from the published risk bands (< -4, -4..-1, > -1); r = corr(OST, T-score)")
    if data.image_probs is not None:
        add("image alone (the network's own calibrated output)", Predictions(probs=data.image_probs))
    add("covariates only (fusion head: age, sex, weight, height)", full_rows(fusion_cvs.get("age+sex+weight+height")))
    add("fused: image + age, sex, weight, height", full_rows(fusion_cvs.get("image+age+sex+weight+height")))
    add("fused with covariates removed (image only, recalibrated)", full_rows(fusion_cvs.get("image")))
    deltas = {}
    fused, covariates_only = predictions.get("fused: image + age, sex, weight, height"), \
        predictions.get("covariates only (fusion head: age, sex, weight, height)")
    if fused is not None and covariates_only is not None:
        deltas["fused_minus_covariates_only_auc_low_bmd"] = paired_delta(
            data.y, fused.probs[:, 1] + fused.probs[:, 2], covariates_only.probs[:, 1] + covariates_only.probs[:, 2],
            draws)
    image = predictions.get("image alone (the network's own calibrated output)")
    if image is not None and covariates_only is not None:
        deltas["image_alone_minus_covariates_only_auc_low_bmd"] = paired_delta(
            data.y, image.probs[:, 1] + image.probs[:, 2],
            covariates_only.probs[:, 1] + covariates_only.probs[:, 2], draws)
    for row in rows:
        m = row["metrics"]
        log(f"{row['method'][:58]:<58} " + " ".join(
            f"{label.split()[0]}={m[key]['value']:.3f}" for key, label in TABLE_COLUMNS if key in m))
    for name, delta in deltas.items():
        log(f"{name}: {delta['value']:+.3f} [{delta['ci_low']:+.3f}, {delta['ci_high']:+.3f}]")
    return {"n_images": len(data), "n_groups": int(len(np.unique(data.groups))), "rows": rows,
            "paired_deltas": deltas, "predictions": predictions}


def markdown_table(table: dict[str, Any]) -> str:
    header = "| method | " + " | ".join(label for _, label in TABLE_COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(TABLE_COLUMNS) + 1)]
    for row in table["rows"]:
        cells = []
        for key, _ in TABLE_COLUMNS:
            m = row["metrics"].get(key)
            cells.append("n/a" if m is None else f"{m['value']:.2f} [{m['ci_low']:.2f}, {m['ci_high']:.2f}]")
        lines.append(f"| {row['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_figures(out_dir: Path, data: FusionData, table: dict[str, Any]) -> list[Path]:
    from osteogate.training.reports import plot_label_confusion, plot_reliability, plot_roc, plot_t_scores

    predictions: dict[str, Predictions] = table["predictions"]
    curves = {name[:44]: (data.y, p.probs) for name, p in predictions.items() if p.probs is not None}
    for name, p in predictions.items():
        if p.probs is None and p.low_bmd_score is not None:  # OST: a rank-equivalent stand-in for probabilities
            s = 1.0 / (1.0 + np.exp(-p.low_bmd_score))
            curves[name[:44]] = (data.y, np.stack([1 - s, np.zeros_like(s), s], axis=1))
    labelled = {name: p for name, p in predictions.items() if p.probs is not None and p.labels is not None}
    shown = next((name for name in labelled if name.startswith("covariates only")), None)
    points = {}
    if shown is not None:
        flags = labelled[shown].labels
        y_low, y_op = data.y >= 1, data.y == 2
        points["covariates-only head"] = ((float((flags >= 1)[y_low].mean()), float((flags < 1)[~y_low].mean())),
                              (float((flags == 2)[y_op].mean()), float((flags != 2)[~y_op].mean())))
    paths = [plot_roc(out_dir / "fusion_roc.png", curves, "grouped 5-fold CV, out-of-fold", points)]
    if shown is not None:
        paths.append(plot_label_confusion(
            out_dir / "fusion_labels.png", data.y,
            {"most probable class": labelled[shown].probs.argmax(axis=1),
             "reported label (operating thresholds)": labelled[shown].labels},
            f"{shown}: grouped 5-fold CV, out-of-fold"))
    calibrated = {name[:44]: p.probs for name, p in predictions.items()
                  if p.probs is not None and not name.startswith("age")}
    paths.append(plot_reliability(out_dir / "fusion_reliability.png", data.y, calibrated))
    estimates = {name[:44]: (p.mu, p.low, p.high) for name, p in predictions.items() if p.mu is not None
                 and ("fused" in name or "covariates only" in name)}
    paths.append(plot_t_scores(out_dir / "fusion_t_scores.png", data.t, estimates, T_SCORE_OSTEOPENIA))
    return paths


def fusion_stage(
    pool: Pool, indices: np.ndarray, y: np.ndarray, probs: np.ndarray | None, folds: np.ndarray,
    operating: OperatingRule | float, seed: int, n_boot: int, report_dir: Path | None,
    log: Callable[[str], None] = print,
) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(card.fusion, report) or None when the data has too few images with covariates and T-scores."""
    data = fusion_data(pool, indices, y, probs, folds)
    if len(data) < MIN_ROWS or not np.isfinite(data.columns["age"]).any():
        log(f"fusion: skipped ({len(data)} labelled images with a T-score; covariates "
            f"{'present' if len(data) and np.isfinite(data.columns['age']).any() else 'absent'})")
        return None
    from threadpoolctl import threadpool_limits

    regions = sorted({pool.samples[i].region for i in indices})
    # Thousands of tiny fits: multithreaded BLAS only adds overhead (6x slower on a shared 2-core box).
    with threadpool_limits(1):
        operating = OperatingRule.of(operating)
        fusion, cvs, decisions = build_fusion(data, regions, operating, seed, n_boot, log)
        table = comparison(data, operating, seed, n_boot, cvs, log)
    report: dict[str, Any] = {"table": [{k: v for k, v in row.items()} for row in table["rows"]],
                              "paired_deltas": table["paired_deltas"], "n_images": table["n_images"],
                              "n_groups": table["n_groups"], "markdown": markdown_table(table)}
    if report_dir is not None:
        report["plots"] = [str(p) for p in plot_figures(Path(report_dir), data, table)]
    return fusion, report


def _fmt(validation: dict[str, Any], name: str) -> str:
    m = validation.get(name)
    return "n/a" if not m else f"{m['value']:.2f} [{m['ci_low']:.2f}, {m['ci_high']:.2f}]"


def _pair(validation: dict[str, Any], a: str, b: str) -> str:
    first, second = validation.get(a), validation.get(b)
    return "n/a" if not first or not second else f"{first['value']:.2f} / {second['value']:.2f}"


def situation_summary(fusion: dict[str, Any], keys: Sequence[str]) -> str:
    """Markdown: the shipped head per input situation with its figures (for REPORT.md and the card)."""
    from osteogate.model.gate import situation_reason

    rules = fusion.get("operating_rules") or {}
    low_rule = (rules.get("low_bmd") or {}).get("target") or {"sensitivity": fusion.get("target_sensitivity")}
    op_rule = (rules.get("osteoporosis") or {}).get("target") or {}
    lines = ["| inputs available | head uses | low-BMD AUC | osteoporosis AUC | T-score MAE | PI80 coverage | "
             f"low BMD sens / spec ({', '.join(f'{k} {v}' for k, v in low_rule.items())}) | "
             f"osteoporosis sens / spec ({', '.join(f'{k} {v}' for k, v in op_rule.items())}) | "
             "macro-F1 most probable / reported label | reported? |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for key in keys:
        entry = fusion["situations"].get(key)
        if entry is None:
            continue
        v = entry["validation"]
        reason = situation_reason(entry, key.split("+"))
        lines.append(f"| {key} | {'+'.join(entry['inputs'])} | {_fmt(v, 'auc_low_bmd')} | {_fmt(v, 'auc_osteoporosis')} | "
                     f"{_fmt(v, 't_score_mae')} | {_fmt(v, 'pi80_coverage')} | "
                     f"{_pair(v, 'sensitivity_low_bmd', 'specificity_low_bmd')} | "
                     f"{_pair(v, 'sensitivity_osteoporosis', 'specificity_osteoporosis')} | "
                     f"{_pair(v, 'f1_macro', 'label_f1_macro')} | "
                     f"{'yes' if reason is None else 'no: ' + reason.split(':')[0]} |")
    return "\n".join(lines)


def label_summary(fusion: dict[str, Any], keys: Sequence[str]) -> str:
    """Markdown: 3-class figures of the most probable class beside those of the reported label
    (model/scoring.decide_label at the situation's operating thresholds), per input situation."""
    lines = ["| inputs available | label | Acc | Prec (macro) | Rec (macro) | F1 (macro) |", "|---|---|---|---|---|---|"]
    for key in keys:
        entry = fusion["situations"].get(key)
        if entry is None:
            continue
        v = entry["validation"]
        for label, prefix in (("most probable class", ""), ("reported (thresholded)", "label_")):
            names = ("label_accuracy" if prefix else "accuracy", f"{prefix}precision_macro", f"{prefix}recall_macro",
                     f"{prefix}f1_macro")
            lines.append(f"| {key} | {label} | " + " | ".join(_fmt(v, n) for n in names) + " |")
    return "\n".join(lines)


def operating_summary(fusion: dict[str, Any], keys: Sequence[str]) -> str:
    """Markdown: each situation's operating points (rule, shipped threshold, CV sensitivity and
    specificity with 95 % CIs), as the card states them for the SR and the result card."""
    lines = ["| inputs available | operating point | rule target | threshold | sensitivity | specificity |",
             "|---|---|---|---|---|---|"]
    for key in keys:
        entry = fusion["situations"].get(key)
        if entry is None:
            continue
        for name, point in (entry["validation"].get("operating_points") or {}).items():
            target = ", ".join(f"{k} {v}" for k, v in (point.get("target") or {}).items())
            threshold = point.get("threshold")
            lines.append(f"| {key} | {name.replace('_', '-')} | {target} | "
                         f"{'n/a' if threshold is None else f'{threshold:.3f}'} | {_fmt(point, 'sensitivity')} | "
                         f"{_fmt(point, 'specificity')} |")
    return "\n".join(lines)


def summaries(fusion: dict[str, Any]) -> str:
    """Every per-situation table (fusion_table.md)."""
    keys = sorted(fusion["situations"], key=lambda k: (len(k.split("+")), k))
    return "\n\n".join((situation_summary(fusion, keys), label_summary(fusion, keys), operating_summary(fusion, keys)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m osteogate.training.fusion_report", description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--image-cv", type=Path, required=True, help="out-of-fold image predictions (--save-predictions)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--checkpoint", type=Path, help="write a copy of this checkpoint with the new fusion")
    parser.add_argument("--working-size", type=int, default=1024)
    parser.add_argument("--target-sensitivity", type=float, default=0.9, help="low-BMD operating point")
    parser.add_argument("--osteoporosis-rule", choices=("label_f1", "specificity", "sensitivity"), default="label_f1",
                        help="how the osteoporosis grade's threshold is chosen (see the module docstring)")
    parser.add_argument("--osteoporosis-specificity", type=float, default=0.80,
                        help="osteoporosis specificity: the floor (label_f1) or the target (specificity)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--cache-dir", type=Path)
    parser.add_argument("--version", help="card version of the written checkpoint (default: unchanged)")
    args = parser.parse_args(argv)
    started = time.perf_counter()

    from osteogate.training.pool import build_pool
    from osteogate.training.reports import write_json
    from scipy.special import softmax

    pool = build_pool(args.data, args.working_size, args.cache_dir)
    saved = np.load(args.image_cv)
    logits = saved["logits"] if saved["logits"].ndim == 3 else saved["logits"][:, None]
    probs = softmax(logits / saved["temperatures"][:, None, None], axis=-1).mean(axis=1)
    args.out.mkdir(parents=True, exist_ok=True)
    operating = OperatingRule(args.target_sensitivity, args.osteoporosis_rule, args.osteoporosis_specificity)
    result = fusion_stage(pool, saved["indices"], saved["y_true"], probs, saved["folds"], operating,
                          args.seed, args.bootstrap, args.out)
    if result is None:
        return 1
    fusion, report = result
    write_json(args.out / "fusion.json", fusion)
    write_json(args.out / "fusion_table.json", report)
    (args.out / "fusion_table.md").write_text(report["markdown"] + "\n\n" + summaries(fusion) + "\n")
    print(report["markdown"])
    seconds = round(time.perf_counter() - started, 1)
    print(f"fusion stage: {seconds:.0f} s")
    if args.checkpoint:
        from osteogate.model.checkpoint import load_checkpoint, save_checkpoint
        from osteogate.training.card_text import INTENDED_USE, LIMITATIONS, fusion_statement, signal_warning

        state, card = load_checkpoint(args.checkpoint)
        metrics = dict(card.metrics)
        metrics["fusion_comparison"] = {k: report[k] for k in ("table", "paired_deltas", "n_images", "n_groups")}
        training = dict(card.training)
        training["fusion"] = {"command": "python -m osteogate.training.fusion_report " + " ".join(
            shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)), "seconds": seconds,
            "image_cv": args.image_cv.name}
        out = args.out / args.checkpoint.name
        card = card.with_updates(
            version=args.version or card.version, fusion=fusion, metrics=metrics, training=training,
            intended_use=INTENDED_USE, limitations=fusion_statement(fusion) + signal_warning(metrics, fusion) + LIMITATIONS)
        sha = save_checkpoint(out, state, card)
        out.with_name(out.name.replace(".safetensors", "") + ".card.json").write_text(card.to_json(indent=2) + "\n")
        print(f"wrote {out} (sha256 {sha[:12]}) and its card JSON")
    return 0


if __name__ == "__main__":
    sys.exit(main())
