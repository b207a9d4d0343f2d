"""Refit the fusion heads on the site's own DXA-matched studies (``osteogate refit-site``).

Input: the rows ``osteogate validate --export-rows FILE.npz`` wrote (header covariates, the served
image network's probabilities, the DXA T-score, the patient as a salted hash). The same procedure
as the shipped model (training/fusion.build_fusion): grouped nested CV with patients as groups,
ridge penalty, sigma and the referral threshold chosen inside the training folds, and a paired
bootstrap of whether the image scores add low-BMD AUC over the covariates: the image gets a place
in a head only where that interval excludes zero. The image network's weights are not touched.

Output: a checkpoint (the served weights, a site card: fusion heads and figures from this site,
version ``<shipped>+site.<date>``), its ONNX sibling, and SITE_REPORT.md with the shipped card's
figures beside the site's. The gateway serves it like any checkpoint (``model.path``); its SRs
name it (algorithm version).
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from osteogate.model.card import ModelCard
from osteogate.model.covariates import Covariates
from osteogate.model.fusion import situation_key
from osteogate.model.taxonomy import CLASSES, class_from_t_score
from osteogate.training.fusion import MIN_ROWS, FusionData, build_fusion
from osteogate.training.metrics import OperatingRule

FOLDS = 5


def _value(x: float) -> float | None:
    return None if not np.isfinite(x) else float(x)


def site_data(rows: dict[str, np.ndarray], folds: int = FOLDS, seed: int = 0) -> FusionData:
    """FusionData from the exported rows: patients are the groups, and the outer folds are drawn
    over patients (all of a patient's studies in one fold)."""
    n = len(rows["t"])
    sexes = {1.0: "F", 0.0: "M"}
    covariates = [Covariates(age_years=_value(rows["age"][i]), sex=sexes.get(float(rows["sex"][i])),
                             weight_kg=_value(rows["weight"][i]), height_m=_value(rows["height"][i]))
                  for i in range(n)]
    image = np.asarray(rows["image_probs"], dtype=float).reshape(n, len(CLASSES))
    patients, groups = np.unique(rows["patient"], return_inverse=True)
    order = np.random.default_rng(seed).permutation(len(patients))
    fold_of_patient = np.empty(len(patients), dtype=int)
    fold_of_patient[order] = np.arange(len(patients)) % folds
    t = np.asarray(rows["t"], dtype=float)
    y = np.array([CLASSES.index(class_from_t_score(v)) for v in t])
    return FusionData(covariates=covariates, image_probs=image if np.isfinite(image).all() else None,
                      y=y, t=t, groups=groups, folds=fold_of_patient[groups])


def _figure(validation: dict[str, Any], name: str) -> str:
    entry = validation.get(name) or {}
    if entry.get("value") is None:
        return "-"
    return f"{entry['value']:.2f} [{entry.get('ci_low', float('nan')):.2f}, {entry.get('ci_high', float('nan')):.2f}]"


def site_report(site: dict[str, Any], shipped: dict[str, Any], rows: int, patients: int, skipped: int) -> str:
    """Markdown: per situation, the site's grouped-CV figures beside the shipped card's, and the
    image decisions (paired bootstrap of the AUC the image adds)."""
    lines = [f"# Site refit of the fusion heads ({datetime.now(UTC).date().isoformat()})", "",
             f"{rows} DXA-matched studies of {patients} patients ({skipped} no longer in the spool or out of "
             "scope). Grouped nested 5-fold CV, patients as groups; 95 % bootstrap over patients.", "",
             "| situation | n | site low-BMD AUC | shipped low-BMD AUC | site MAE | shipped MAE | site referral sens |",
             "|---|---|---|---|---|---|---|"]
    for key, entry in sorted(site.get("situations", {}).items()):
        v = entry.get("validation", {})
        s = (shipped.get("situations", {}).get(key) or {}).get("validation", {})
        sens = ((v.get("operating_points") or {}).get("low_bmd") or {}).get("sensitivity") or {}
        lines.append(f"| {key} | {v.get('n_images', '-')} | {_figure(v, 'auc_low_bmd')} | {_figure(s, 'auc_low_bmd')} "
                     f"| {_figure(v, 't_score_mae')} | {_figure(s, 't_score_mae')} | "
                     f"{_figure({'x': sens}, 'x')} |")
    lines += ["", "## Does the image add anything here?", ""]
    decisions = site.get("image_decisions") or {}
    if not decisions:
        lines.append("No image scores in the rows (or too few rows): every head is covariates only.")
    for key, d in sorted(decisions.items()):
        delta = d["delta_auc_low_bmd"]
        lines.append(f"- {key}: low-BMD AUC with minus without the image {delta['value']:+.3f} "
                     f"[{delta['ci_low']:+.3f}, {delta['ci_high']:+.3f}]: "
                     + ("the image is used" if d["image_used"] else "the image is not used (interval includes zero)"))
    return "\n".join(lines) + "\n"


def refit_site(rows_path: Path, checkpoint: Path, out: Path, *, seed: int = 0, n_boot: int = 1000,
               log: Callable[[str], None] = print) -> tuple[Path, Path]:
    """Refit on the site's rows; write the site checkpoint, its ONNX sibling and SITE_REPORT.md.

    Returns
    -------
    (checkpoint, report) paths.

    Raises
    ------
    ValueError
        Fewer usable rows than a head needs (``training.fusion.MIN_ROWS``), or no head could be fitted.
    """
    from osteogate.model.checkpoint import load_checkpoint, save_checkpoint
    from osteogate.model.export import export_onnx

    try:
        with np.load(rows_path, allow_pickle=False) as loaded:
            rows = {k: loaded[k] for k in loaded.files}
        if "t" not in rows:  # the DXA T-scores: every rows file has them
            raise KeyError("t")
    except (ValueError, KeyError, EOFError, zipfile.BadZipFile):
        raise ValueError(f"{rows_path} is not a rows file written by `osteogate validate --export-rows`") from None
    if len(rows["t"]) < MIN_ROWS:
        raise ValueError(f"{rows_path}: {len(rows['t'])} DXA-matched studies; a site refit needs at least {MIN_ROWS} "
                         "(and far more for figures worth shipping)")
    state, card = load_checkpoint(checkpoint)
    shipped = card.fusion or {}
    data = site_data(rows, seed=seed)
    operating = OperatingRule(target_sensitivity=float(shipped.get("target_sensitivity", 0.9)))
    fusion, _cvs, _decisions = build_fusion(data, shipped.get("image_regions", ["knee"]), operating, seed, n_boot, log)
    if not fusion["situations"]:
        raise ValueError(f"{rows_path}: no head could be fitted on these rows")
    fusion["population"] = f"{len(set(rows['patient'].tolist()))} patients of this site (DXA-matched studies)"
    fusion["shipped"] = {"version": card.version, "population": shipped.get("population", "")}
    stamp = datetime.now(UTC).strftime("%Y%m%d")
    site_card: ModelCard = card.with_updates(
        version=f"{card.version}+site.{stamp}", fusion=fusion,
        training={**card.training, "site_refit": {"rows": int(len(rows["t"])), "seed": seed, "bootstrap": n_boot,
                                                  "from": str(rows_path.name), "served_sha256": str(rows["model_sha256"])}})
    out.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out, state, site_card)
    export_onnx(out)
    report = out.with_name("SITE_REPORT.md")
    report.write_text(site_report(fusion, shipped, len(rows["t"]), len(set(rows["patient"].tolist())),
                                  int(rows.get("skipped", 0))), encoding="utf-8")
    used = sorted(k for k, d in fusion.get("image_decisions", {}).items() if d["image_used"])
    log(f"site card {site_card.version}: {len(fusion['situations'])} situations; image used in "
        f"{', '.join(used) or 'none'}; covariates head {situation_key(('age', 'sex', 'weight', 'height'))}")
    return out, report
