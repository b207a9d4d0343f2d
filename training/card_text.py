"""The card's fixed texts (intended use, limitations) and the statements made from the fusion
figures: shared by the training pipeline and the fusion-only route (training/fusion_report.py), so
neither imports the other."""

from __future__ import annotations

from typing import Any

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
    """What the decision and the category mean at the all-covariates situation (card limitations)."""
    situations = fusion.get("situations") or {}
    entry = situations.get("image+age+sex+weight+height") or situations.get("age+sex+weight+height")
    points = ((entry or {}).get("validation") or {}).get("operating_points") or {}
    low, grade = points.get("low_bmd") or {}, points.get("osteoporosis") or {}
    if not all(isinstance(p.get(k), dict) for p in (low, grade) for k in ("sensitivity", "specificity")):
        return ""
    return (f"ONE ESTIMAND (all covariates, grouped CV): every result is one predictive distribution of the T-score; "
            f"'DXA referral suggested' when P(T < -1.0) reaches the referral threshold (sensitivity "
            f"{low['sensitivity']['value']:.2f} / specificity {low['specificity']['value']:.2f}); the WHO category "
            f"named is that of the estimate (osteoporosis range: sensitivity {grade['sensitivity']['value']:.2f} / "
            f"specificity {grade['specificity']['value']:.2f}). ")
