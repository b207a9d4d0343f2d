"""The site gate: its pure rule (awaiting, below, one class, open, drift), withholding a result,
and the gate over a real SQLite store (held deliveries released on opening, gauges, withheld
figures still counted by the validation)."""

from __future__ import annotations

from dataclasses import replace
from datetime import date
from pathlib import Path

import numpy as np
import pytest
from osteogate.gateway.core.gate_config import GateConfig
from osteogate.gateway.core.metrics import REGISTRY
from osteogate.gateway.groundtruth.gate import SiteGate, decide, withheld_figures, withhold
from osteogate.gateway.groundtruth.matching import load_pairs
from osteogate.gateway.store.db import Database, Delivery, DeliveryStatus, StudyResult
from osteogate.model.assessment import Assessment, ImageAssessment, StudyAssessment
from osteogate.model.covariates import Covariates
from sqlalchemy import select

from tests.helpers.pairs import store_pairs, synthetic_pairs


def config(**changes: object) -> GateConfig:
    return GateConfig(site_validation="shadow", **changes)


def test_off_is_always_open() -> None:
    state = decide([], GateConfig())
    assert state.open and state.kind == "off" and not state.holds and not state.withholds


def test_awaiting_pairs_names_the_count_in_the_issue_wording() -> None:
    state = decide(synthetic_pairs(37), config())
    assert not state.open and state.kind == "awaiting" and state.holds
    assert state.reason == "awaiting site validation (37 of 100 DXA-matched studies)"
    required = decide(synthetic_pairs(37), GateConfig(site_validation="required"))
    assert required.withholds and not required.holds


def test_pairs_without_figures_do_not_count() -> None:
    pairs = synthetic_pairs(120)
    pairs = [replace(p, assessed=False, p_low=None) if i % 2 else p for i, p in enumerate(pairs)]
    assert decide(pairs, config()).reason == "awaiting site validation (60 of 100 DXA-matched studies)"


def test_good_site_opens_and_weak_site_stays_closed() -> None:
    good = decide(synthetic_pairs(160), config())
    assert good.open and good.kind == "open" and good.reason is None
    assert good.auc_lower > 0.70 and good.rolling_pairs == 160
    weak = decide(synthetic_pairs(160, noise=6.0), config())
    assert not weak.open and weak.kind == "below" and not weak.degraded
    assert "lower bound not above gate.site_min_auc 0.70" in weak.reason and "160 DXA-matched" in weak.reason
    # A higher bar closes the good site too.
    assert decide(synthetic_pairs(160), config(site_min_auc=0.95)).kind == "below"


def test_one_class_only_is_not_enough_evidence_not_a_crash() -> None:
    pairs = [replace(p, dxa_t_score=-2.0) for p in synthetic_pairs(150)]
    state = decide(pairs, config())
    assert not state.open and state.kind == "not_enough" and "not enough evidence" in state.reason


def test_drift_in_the_last_window_closes_the_gate_again() -> None:
    # 500 good pairs, then 100 where the scores carry nothing (a new scanner, another population).
    pairs = synthetic_pairs(500) + synthetic_pairs(100, seed=9, noise=8.0, start=500)
    overall = decide(pairs, config(drift_window=100))
    assert overall.auc_lower > 0.70  # the whole history still looks fine ...
    assert not overall.open and overall.kind == "drift" and overall.degraded  # ... the window does not
    assert overall.rolling_pairs == 100 and overall.rolling_lower < 0.70
    assert overall.reason.startswith("drift: low-BMD AUC of the last 100 DXA-matched studies")
    assert decide(pairs[:500], config(drift_window=100)).open


def _assessment() -> StudyAssessment:
    study = Assessment(assessed=True, label="osteopenia", probabilities={"normal": 0.2, "osteopenia": 0.6,
                                                                         "osteoporosis": 0.2},
                       t_score=-1.8, t_score_interval=(-2.4, -1.2), decision="DXA referral suggested",
                       referral_threshold=0.6, inputs_used=("age", "sex"), model_name="osteogate-covariates")
    image = ImageAssessment("knee", Assessment(assessed=True, label="osteopenia", probabilities=study.probabilities))
    return StudyAssessment("knee", study, (image,), Covariates())


def test_withhold_reports_not_assessed_and_keeps_the_figures_aside() -> None:
    original = _assessment()
    shown = withhold(original, "awaiting site validation (37 of 100 DXA-matched studies)")
    assert not shown.study.assessed and shown.study.reason.startswith("awaiting site validation (37 of 100")
    assert shown.study.probabilities is None and shown.study.t_score is None and shown.study.decision is None
    assert shown.study.inputs_used == ("age", "sex") and shown.study.model_name == "osteogate-covariates"
    assert all(not i.assessment.assessed for i in shown.images)
    kept = withheld_figures(original.study)
    assert kept["probabilities"]["normal"] == 0.2 and kept["t_score"] == -1.8 and kept["decision"].startswith("DXA")


@pytest.fixture
def db(tmp_path: Path) -> Database:
    database = Database(f"sqlite:///{tmp_path / 'gate.db'}")
    database.migrate()
    return database


def _gauge(name: str) -> float:
    value = REGISTRY.get_sample_value("osteogate_site_gate", {"figure": name})
    assert value is not None
    return value


def test_gate_over_the_store_releases_held_deliveries_when_it_opens(db: Database) -> None:
    store_pairs(db, synthetic_pairs(60))
    with db.session() as session:
        result = session.execute(select(StudyResult).limit(1)).scalar_one()
        result.deliveries.append(Delivery(destination="PACS@127.0.0.1:1", status=DeliveryStatus.HELD))
    now = [0.0]
    released: list[int] = []
    gate = SiteGate(config(refresh_seconds=30), db, on_release=released.append, clock=lambda: now[0])
    state = gate.state()
    assert not state.open and state.reason == "awaiting site validation (60 of 100 DXA-matched studies)"
    assert _gauge("open") == 0 and _gauge("pairs") == 60 and _gauge("needed") == 100 and np.isnan(_gauge("auc_lower"))
    store_pairs(db, synthetic_pairs(80, start=60))
    assert gate.state() is state  # cached until refresh_seconds pass
    now[0] = 31.0
    opened = gate.state()
    assert opened.open and opened.pairs == 140 and released == [1]
    assert _gauge("open") == 1 and _gauge("auc_lower") == pytest.approx(opened.auc_lower)
    assert _gauge("rolling_auc_lower") == pytest.approx(opened.rolling_lower)
    with db.session() as session:
        assert session.execute(select(Delivery.status)).scalar_one() == DeliveryStatus.PENDING


def test_withheld_results_still_count_for_validation(db: Database) -> None:
    store_pairs(db, synthetic_pairs(12))
    with db.session() as session:
        for result in session.execute(select(StudyResult)).scalars():
            figures = {"probabilities": result.probabilities, "t_score": result.t_score, "t_score_low": None,
                       "t_score_high": None, "decision": result.decision, "label": result.label}
            result.withheld, result.assessed, result.reason, result.label = figures, False, "awaiting", None
            result.probabilities, result.t_score, result.decision = None, None, None
    pairs = load_pairs(db)
    assert len(pairs) == 12 and all(p.assessed and p.p_low is not None and p.t_score_estimate is not None
                                    for p in pairs)
    expected = synthetic_pairs(12)
    assert [p.referral for p in pairs] == [p.referral for p in sorted(expected, key=lambda p: p.study_date)]
    assert pairs[0].dxa_date == date(2025, 1, 1)


def test_release_sends_only_each_studys_newest_held_result(db: Database) -> None:
    """A study replayed while the gate was closed has two held results: the newest is released,
    the older withdrawn (never sent, so never a predecessor), and nothing else moves."""
    from osteogate.gateway.groundtruth.gate import release_held
    from osteogate.gateway.store.db import Job, JobStatus, StudyStatus

    store_pairs(db, synthetic_pairs(2))
    with db.session() as session:
        first, other = session.execute(select(StudyResult).order_by(StudyResult.id)).scalars().all()
        job = Job(study_id=first.study_id, study_version=1, status=JobStatus.DONE)
        session.add(job)
        session.flush()
        newer = StudyResult(study_id=first.study_id, job_id=job.id, version=2, status=StudyStatus.DONE, assessed=True,
                            label="osteopenia", model_name="m", model_version="2", model_sha256="0" * 64, backend="onnx")
        session.add(newer)
        for result, status in ((first, DeliveryStatus.HELD), (newer, DeliveryStatus.HELD), (other, DeliveryStatus.SENT)):
            result.deliveries.append(Delivery(destination="PACS@127.0.0.1:1", status=status))
    assert release_held(db) == 1
    with db.session() as session:
        rows = session.execute(select(StudyResult.study_id, StudyResult.version, Delivery.status, Delivery.last_error)
                               .join(Delivery).order_by(StudyResult.study_id, StudyResult.version)).all()
    assert [(version, status) for _, version, status, _ in rows] == [
        (1, DeliveryStatus.WITHDRAWN), (2, DeliveryStatus.PENDING), (1, DeliveryStatus.SENT)]
    assert "superseded" in rows[0][3]
    assert release_held(db) == 0


def test_retention_is_not_blocked_by_a_withdrawn_delivery_but_waits_for_a_held_one() -> None:
    from osteogate.gateway.operate.admin import _purge_safe
    from osteogate.gateway.store.db import Instance, Study, StudyStatus

    def study(*statuses: DeliveryStatus) -> Study:
        results = [StudyResult(version=v, deliveries=[Delivery(destination="PACS@h:104", status=s)])
                   for v, s in enumerate(statuses, start=1)]
        return Study(status=StudyStatus.DONE, instances=[Instance(purged_at=None)], jobs=[], results=results)

    assert _purge_safe(study(DeliveryStatus.WITHDRAWN, DeliveryStatus.SENT))
    assert not _purge_safe(study(DeliveryStatus.HELD))
    assert not _purge_safe(study(DeliveryStatus.WITHDRAWN, DeliveryStatus.HELD))
