"""Synthetic DXA-matched pairs of a plausible site, as ``MatchedPair`` rows or as SQL rows
(study, result, DXA exam), for the validation and site-gate tests."""

from __future__ import annotations

from datetime import date, timedelta

import numpy as np
from osteogate.gateway.groundtruth.exams import DxaResult, DxaSiteValue, save_results
from osteogate.gateway.groundtruth.matching import MatchedPair
from osteogate.gateway.store.db import Database, Job, JobStatus, Study, StudyResult, StudyStatus


def synthetic_pairs(n: int = 240, seed: int = 3, noise: float = 0.6, start: int = 0) -> list[MatchedPair]:
    """Pairs of a plausible site: estimate = DXA T-score + noise; two studies per patient."""
    rng = np.random.default_rng(seed)
    pairs = []
    for i in range(n):
        truth = round(float(rng.normal(-1.4, 1.0)), 1)
        estimate = round(truth + float(rng.normal(0, noise)), 1)
        p_low = float(1 / (1 + np.exp(3 * (estimate + 1.0))))
        pairs.append(MatchedPair(
            patient_hash=f"patient{(start + i) // 2:04d}", study_key=f"study{start + i:04d}",
            study_date=date(2025, 1, 1) + timedelta(start + i),
            dxa_date=date(2025, 2, 1) + timedelta(start + i), days_apart=31, region="knee" if i % 4 else "spine",
            manufacturer="ACME" if i % 3 else "Other", sex="F" if i % 2 else "M", age=40.0 + (i * 7) % 50,
            assessed=True, p_low=p_low, p_osteoporosis=float(1 / (1 + np.exp(3 * (estimate + 2.5)))),
            t_score_estimate=estimate, t_score_low=estimate - 0.5, t_score_high=estimate + 0.5,
            referral=p_low >= 0.8, dxa_t_score=truth, dxa_category="-", model_name="m", model_version="1"))
    return pairs


def store_pairs(db: Database, pairs: list[MatchedPair]) -> None:
    """The same pairs as SQL rows: a study + result per pair and a DXA exam per study (own day).

    Two transactions in all (studies and results, then the DXA exams), so hundreds of pairs are
    quick even with SQLite's synchronous=FULL.
    """
    with db.session() as session:
        for p in pairs:
            uid = "1.2.826.0.1." + "".join(c for c in p.study_key if c.isdigit())
            study = Study(study_uid=uid, study_key=p.study_key, status=StudyStatus.DONE,
                          study_date=p.study_date.strftime("%Y%m%d"), patient_id=p.patient_hash,
                          patient_sex=p.sex, patient_age=p.age, manufacturer=p.manufacturer)
            session.add(study)
            session.flush()
            job = Job(study_id=study.id, study_version=1, status=JobStatus.DONE)
            session.add(job)
            session.flush()
            session.add(StudyResult(
                study_id=study.id, job_id=job.id, version=1, status=StudyStatus.DONE, region=p.region, assessed=True,
                label="osteopenia", probabilities={"normal": 1 - p.p_low, "osteopenia": p.p_low - p.p_osteoporosis,
                                                   "osteoporosis": p.p_osteoporosis},
                decision="DXA referral suggested" if p.referral else "below the referral threshold",
                t_score=p.t_score_estimate, model_name="m", model_version="1", model_sha256="0" * 64, backend="onnx"))
    with db.session(write=True) as session:
        save_results(session, [DxaResult(p.patient_hash, None, p.study_date, "csv", "test",
                                          (DxaSiteValue("hip", p.dxa_t_score),)) for p in pairs])
