"""The site's refit data: each DXA-matched study's header covariates and the served image
network's probabilities, read again from the spool, with the DXA T-score and the patient (salted
hash) as the CV group. ``osteogate validate --export-rows FILE.npz`` writes it; ``osteogate train
--site FILE.npz`` (training/site_refit.py) refits the fusion heads on it.

The image probabilities come from the served network, which never saw the site's images: they
are out-of-sample for the refit, as the out-of-fold scores are for the shipped fusion.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from osteogate.gateway.core.config import Settings
from osteogate.gateway.groundtruth.matching import MatchedPair
from osteogate.gateway.store.db import Study
from osteogate.gateway.work.pipeline import StudyPipeline
from osteogate.model.taxonomy import CLASSES
from sqlalchemy import select


def collect_site_rows(settings: Settings, store: object, pairs: Sequence[MatchedPair],
                      progress: Callable[[int, int], None] | None = None) -> dict[str, np.ndarray]:
    """One row per paired study whose instances are still in the spool (others are counted).

    Returns
    -------
    dict of str to ndarray
        age, sex (1 female, 0 male, NaN), weight, height (NaN when missing), image_probs [N, 3]
        (NaN where no image was scored), t (DXA T-score), patient (hash), region, skipped (count).
    """
    from osteogate.gateway.operate.preflight import ClassifierCache

    classifier = ClassifierCache(settings)()
    pipeline = StudyPipeline(settings, store.spool)  # type: ignore[attr-defined]
    db = store.db  # type: ignore[attr-defined]
    firsts: dict[str, MatchedPair] = {}
    for pair in pairs:
        firsts.setdefault(pair.study_key, pair)
    cols: dict[str, list] = {k: [] for k in ("age", "sex", "weight", "height", "image_probs", "t", "patient", "region")}
    skipped = 0
    try:
        for done, (key, pair) in enumerate(firsts.items(), start=1):
            with db.session() as session:
                study = session.execute(select(Study).where(Study.study_key == key)).scalar_one_or_none()
                instances = [i for i in study.instances if i.purged_at is None] if study else []
            outcome = pipeline.classify(instances, classifier) if instances else None
            if outcome is None or outcome.assessment is None:
                skipped += 1  # purged by retention, or nothing in scope
                continue
            cov = outcome.assessment.covariates
            scores = [[float(i.score.probabilities[c]) for c in CLASSES] for i in outcome.scored if i.score]
            cols["age"].append(np.nan if cov.age_years is None else cov.age_years)
            cols["sex"].append({"F": 1.0, "M": 0.0}.get(cov.sex or "", np.nan))
            cols["weight"].append(np.nan if cov.weight_kg is None else cov.weight_kg)
            cols["height"].append(np.nan if cov.height_m is None else cov.height_m)
            cols["image_probs"].append(np.mean(scores, axis=0) if scores else [np.nan] * len(CLASSES))
            cols["t"].append(pair.dxa_t_score)
            cols["patient"].append(pair.patient_hash)
            cols["region"].append(outcome.assessment.region)
            if progress and (done % 10 == 0 or done == len(firsts)):
                progress(done, len(firsts))
    finally:
        pipeline.close_decoders()
    out = {k: np.asarray(v, dtype=float) for k, v in cols.items() if k not in ("patient", "region")}
    out["image_probs"] = out["image_probs"].reshape(-1, len(CLASSES))
    out["patient"] = np.asarray(cols["patient"], dtype=str)
    out["region"] = np.asarray(cols["region"], dtype=str)
    out["skipped"] = np.asarray(skipped)
    out["model_sha256"] = np.asarray(classifier.sha256)
    return out


def write_site_rows(path: Path, rows: dict[str, np.ndarray]) -> None:
    """Save the rows (no patient identifiers: the patient column is a salted hash)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **rows)
