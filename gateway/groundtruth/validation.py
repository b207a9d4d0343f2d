"""The site's own validation: the gateway's results against the DXA exams of the same patients.

Input: ``MatchedPair`` rows (``matching.load_pairs``); only pairs whose result carried figures
count (assessed, or withheld by the site gate in "required" mode, see ``gate``). Truth is the DXA
exam's lowest T-score: low bone density is T < -1.0 (osteopenia or osteoporosis,
``model.taxonomy``), osteoporosis T <= -2.5. Every interval is a 95 % bootstrap over patients
(``stats.PatientBootstrap``); every figure is reported beside what the shipped model card claims.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from osteogate.gateway.groundtruth.matching import MatchedPair
from osteogate.gateway.groundtruth.stats import (
    MIN_PAIRS,
    MIN_PER_CLASS,
    NOT_ENOUGH,
    Figure,
    PatientBootstrap,
    auc,
    bland_altman,
    ece,
    pearson,
    proportion,
    reliability,
)
from osteogate.model.taxonomy import T_SCORE_OSTEOPENIA, T_SCORE_OSTEOPOROSIS

# The card situation whose figures the site is compared with: the head that uses every header
# covariate (what a complete DICOM header gets; REPORT.md quotes it first).
CLAIM_SITUATION = "age+sex+weight+height"
AGE_BANDS = ((0, 50, "<50"), (50, 65, "50-64"), (65, 80, "65-79"), (80, 200, ">=80"))
FIGURES = ("low_bmd_auc", "osteoporosis_auc", "sensitivity", "specificity", "ece", "t_score_mae", "t_score_r")


def usable(pair: MatchedPair) -> bool:
    """A pair whose result carried the figures validation needs."""
    return pair.assessed and pair.p_low is not None


@dataclass
class PairTable:
    """The usable pairs as arrays (one row per pair)."""

    patient: list[str]
    low: np.ndarray  # DXA T < -1.0
    osteoporosis: np.ndarray  # DXA T <= -2.5
    p_low: np.ndarray
    p_osteoporosis: np.ndarray  # NaN where the result had none
    referral: np.ndarray  # 1 referral, 0 below threshold, NaN unknown
    t_estimate: np.ndarray  # NaN where none
    t_dxa: np.ndarray
    groups: dict[str, list[str]]  # dimension -> level of each pair

    @classmethod
    def from_pairs(cls, pairs: Sequence[MatchedPair]) -> PairTable:
        rows = [p for p in pairs if usable(p)]
        t_dxa = np.array([p.dxa_t_score for p in rows], dtype=float)
        nan = float("nan")
        return cls(
            patient=[p.patient_hash for p in rows],
            low=t_dxa < T_SCORE_OSTEOPENIA, osteoporosis=t_dxa <= T_SCORE_OSTEOPOROSIS,
            p_low=np.array([p.p_low for p in rows], dtype=float),
            p_osteoporosis=np.array([nan if p.p_osteoporosis is None else p.p_osteoporosis for p in rows]),
            referral=np.array([nan if p.referral is None else float(p.referral) for p in rows]),
            t_estimate=np.array([nan if p.t_score_estimate is None else p.t_score_estimate for p in rows]),
            t_dxa=t_dxa,
            groups={"sex": [_sex(p.sex) for p in rows], "age band": [age_band(p.age) for p in rows],
                    "region": [p.region or "unknown" for p in rows],
                    "manufacturer": [(p.manufacturer or "unknown").strip() or "unknown" for p in rows]},
        )

    def __len__(self) -> int:
        return int(self.t_dxa.size)


def _sex(value: str | None) -> str:
    return {"F": "female", "M": "male"}.get((value or "").strip().upper()[:1], "unknown")


def age_band(age: float | None) -> str:
    """The age band a patient's age falls in ("unknown" without one)."""
    if age is None:
        return "unknown"
    return next((name for low, high, name in AGE_BANDS if low <= age < high), "unknown")


def _auc_metric(table: PairTable, truth: np.ndarray, score: np.ndarray) -> Callable[[np.ndarray], float | None]:
    def metric(i: np.ndarray) -> float | None:
        keep = i[~np.isnan(score[i])]
        return auc(truth[keep], score[keep])
    return metric


def _class_note(truth: np.ndarray, i: np.ndarray, what: str) -> str | None:
    pos = int(truth[i].sum())
    if i.size < MIN_PAIRS:
        return f"{NOT_ENOUGH}: {i.size} pairs (at least {MIN_PAIRS} needed)"
    if pos < MIN_PER_CLASS or i.size - pos < MIN_PER_CLASS:
        return f"{NOT_ENOUGH}: {pos} of {i.size} pairs with {what} at DXA (both classes needed)"
    return None


def figures(table: PairTable, boot: PatientBootstrap, i: np.ndarray) -> dict[str, Figure]:
    """Every figure on the pairs ``i`` (all, or one subgroup), with patient-bootstrap intervals."""
    few = f"{NOT_ENOUGH}: {i.size} pairs (at least {MIN_PAIRS} needed)" if i.size < MIN_PAIRS else None
    has_ost = i[~np.isnan(table.p_osteoporosis[i])]
    with_ref = i[~np.isnan(table.referral[i])]
    with_t = i[~np.isnan(table.t_estimate[i])]
    low_ref, not_low_ref = with_ref[table.low[with_ref]], with_ref[~table.low[with_ref]]

    def sens(j: np.ndarray) -> float | None:
        j = j[~np.isnan(table.referral[j]) & table.low[j]]
        return proportion(table.referral[j] == 1)

    def spec(j: np.ndarray) -> float | None:
        j = j[~np.isnan(table.referral[j]) & ~table.low[j]]
        return proportion(table.referral[j] == 0)

    def mae(j: np.ndarray) -> float | None:
        j = j[~np.isnan(table.t_estimate[j])]
        return float(np.mean(np.abs(table.t_estimate[j] - table.t_dxa[j]))) if j.size else None

    def corr(j: np.ndarray) -> float | None:
        j = j[~np.isnan(table.t_estimate[j])]
        return pearson(table.t_estimate[j], table.t_dxa[j])

    def calib(j: np.ndarray) -> float | None:
        return ece(table.low[j], table.p_low[j])

    return {
        "low_bmd_auc": boot.figure(_auc_metric(table, table.low, table.p_low), i,
                                   note=_class_note(table.low, i, "low bone density")),
        "osteoporosis_auc": boot.figure(_auc_metric(table, table.osteoporosis, table.p_osteoporosis), has_ost,
                                        note=_class_note(table.osteoporosis, has_ost, "osteoporosis")),
        "sensitivity": boot.figure(sens, with_ref, note=few or (None if low_ref.size >= MIN_PER_CLASS else
                                   f"{NOT_ENOUGH}: {low_ref.size} pairs with low bone density at DXA")),
        "specificity": boot.figure(spec, with_ref, note=few or (None if not_low_ref.size >= MIN_PER_CLASS else
                                   f"{NOT_ENOUGH}: {not_low_ref.size} pairs without low bone density at DXA")),
        "ece": boot.figure(calib, i, note=few),
        "t_score_mae": boot.figure(mae, with_t, note=few or (None if with_t.size >= MIN_PAIRS else
                                   f"{NOT_ENOUGH}: {with_t.size} pairs with a T-score estimate")),
        "t_score_r": boot.figure(corr, with_t, note=few or (None if with_t.size >= MIN_PAIRS else
                                 f"{NOT_ENOUGH}: {with_t.size} pairs with a T-score estimate")),
    }


def card_claims(card: Any, situation: str = CLAIM_SITUATION) -> dict[str, Figure]:
    """The shipped card's grouped-CV figures for ``situation`` (empty when the card has none).

    Parameters
    ----------
    card : ModelCard or mapping
        A model card (``.fusion``) or its ``fusion`` dict.
    """
    fusion = card.get("fusion", card) if isinstance(card, Mapping) else getattr(card, "fusion", {}) or {}
    validation = (fusion.get("situations", {}).get(situation) or {}).get("validation") or {}
    low = (validation.get("operating_points") or {}).get("low_bmd") or {}
    n = int(validation.get("n_images") or 0)

    def fig(entry: Any) -> Figure | None:
        if not isinstance(entry, Mapping) or entry.get("value") is None:
            return None
        ci = (entry["ci_low"], entry["ci_high"]) if entry.get("ci_low") is not None else None
        return Figure(float(entry["value"]), ci, n)

    found = {"low_bmd_auc": fig(validation.get("auc_low_bmd")),
             "osteoporosis_auc": fig(validation.get("auc_osteoporosis")),
             "sensitivity": fig(low.get("sensitivity")), "specificity": fig(low.get("specificity")),
             "ece": fig(validation.get("ece")), "t_score_mae": fig(validation.get("t_score_mae")),
             "t_score_r": fig(validation.get("t_score_pearson_r"))}
    return {k: v for k, v in found.items() if v is not None}


def verdict(name: str, site: Figure, claim: Figure | None, *, higher_is_better: bool = True) -> str:
    """One sentence: the site figure beside the claim and where it falls.

    e.g. "site AUC 0.81 [0.74, 0.88] vs claimed 0.94 [0.90, 0.98]: below the claimed interval".
    """
    if not site.known:
        return f"site {name}: {site.text()}"
    if claim is None or claim.ci is None:
        return f"site {name} {site.text()}: the model card claims no figure to compare"
    head = f"site {name} {site.text()} vs claimed {claim.text()}"
    if site.ci is None:
        return f"{head}: no site interval, not compared"
    # "below"/"above" literally; whether that is worse depends on the figure (higher_is_better).
    if site.ci[1] < claim.ci[0]:
        return f"{head}: below the claimed interval" + ("" if higher_is_better else " (better)")
    if site.ci[0] > claim.ci[1]:
        return f"{head}: above the claimed interval" + (" (worse)" if not higher_is_better else "")
    if claim.ci[0] <= site.value <= claim.ci[1]:  # type: ignore[operator]
        return f"{head}: within the claimed interval"
    return f"{head}: intervals overlap, not shown to differ"


NAMES = {"low_bmd_auc": "low-BMD AUC", "osteoporosis_auc": "osteoporosis AUC", "sensitivity": "referral sensitivity",
         "specificity": "referral specificity", "ece": "ECE", "t_score_mae": "T-score MAE", "t_score_r": "T-score r"}
LOWER_IS_BETTER = {"ece", "t_score_mae"}


@dataclass
class SiteValidation:
    """The whole report's figures (``to_dict`` is report.json and ``osteogate validate --json``)."""

    pairs: int
    patients: int
    pairs_without_figures: int
    overall: dict[str, Figure]
    subgroups: dict[str, dict[str, dict[str, Figure]]]
    claims: dict[str, Figure]
    verdicts: dict[str, str]
    reliability: list[dict[str, float]]
    bland_altman: dict[str, float] | None
    table: PairTable
    n_boot: int
    seed: int
    card_name: str = ""
    filters: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "pairs": self.pairs, "patients": self.patients, "pairs_without_figures": self.pairs_without_figures,
            "low_bmd_auc": self.overall["low_bmd_auc"].to_dict(),
            "osteoporosis_auc": self.overall["osteoporosis_auc"].to_dict(),
            "referral_sensitivity": self.overall["sensitivity"].to_dict(),
            "referral_specificity": self.overall["specificity"].to_dict(),
            "ece": self.overall["ece"].to_dict(),
            "t_score_mae": self.overall["t_score_mae"].value, "t_score_mae_ci": self.overall["t_score_mae"].to_dict()["ci"],
            "t_score_r": self.overall["t_score_r"].value, "t_score_r_ci": self.overall["t_score_r"].to_dict()["ci"],
            "bland_altman": self.bland_altman, "reliability": self.reliability,
            "claimed": {"card": self.card_name, "situation": CLAIM_SITUATION,
                        **{k: v.to_dict() for k, v in self.claims.items()}},
            "verdicts": self.verdicts,
            "subgroups": {dim: {level: {k: f.to_dict() for k, f in figs.items()} for level, figs in levels.items()}
                          for dim, levels in self.subgroups.items()},
            "method": {"truth": "DXA lowest T-score: low BMD T < -1.0, osteoporosis T <= -2.5",
                       "intervals": f"95 % percentile bootstrap over patients, {self.n_boot} resamples, seed {self.seed}"},
            "filters": self.filters,
        }
        return out


def validate(pairs: Sequence[MatchedPair], *, card: Any = None, n_boot: int = 1000, seed: int = 20261203,
             progress: Callable[[int, int], None] | None = None, subgroups: bool = True,
             filters: Mapping[str, str] | None = None) -> SiteValidation:
    """The site's validation from its DXA-matched pairs.

    Parameters
    ----------
    pairs : sequence of MatchedPair
        From ``matching.load_pairs``; pairs without figures (not assessed) are counted, not scored.
    card : ModelCard, optional
        The model card whose claims go beside the site's figures.
    n_boot, seed : int
        Patient-bootstrap resamples and their seed (fixed: same pairs, same report).
    progress : callable, optional
        ``progress(done, total)`` while resampling (the CLI prints it on stderr).

    Returns
    -------
    SiteValidation
        Never raises for too little data: such figures say "not enough evidence".
    """
    table = PairTable.from_pairs(pairs)
    boot = PatientBootstrap(table.patient, n_boot=n_boot, seed=seed)
    boot.draws(progress)
    everything = np.arange(len(table))
    overall = figures(table, boot, everything)
    groups: dict[str, dict[str, dict[str, Figure]]] = {}
    if subgroups:
        for dim, levels in table.groups.items():
            groups[dim] = {level: figures(table, boot, np.flatnonzero(np.array(levels) == level))
                           for level in sorted(set(levels))}
    claims = card_claims(card) if card is not None else {}
    verdicts = {k: verdict(NAMES[k], overall[k], claims.get(k), higher_is_better=k not in LOWER_IS_BETTER)
                for k in FIGURES}
    with_t = everything[~np.isnan(table.t_estimate)]
    return SiteValidation(
        pairs=len(table), patients=len(set(table.patient)), pairs_without_figures=len(pairs) - len(table),
        overall=overall, subgroups=groups, claims=claims, verdicts=verdicts,
        reliability=reliability(table.low, table.p_low) if len(table) else [],
        bland_altman=bland_altman(table.t_estimate[with_t], table.t_dxa[with_t]),
        table=table, n_boot=n_boot, seed=seed, card_name=getattr(card, "display_name", "") if card else "",
        filters=dict(filters or {}),
    )
