"""The site gate end to end: modality (storescu) -> osteogate serve -> PACS (storescp).

Shadow: the result is made and stored, its SR held (the PACS gets nothing) while the site has
fewer DXA-matched studies than ``gate.site_min_pairs``; DXA-matched pairs arrive (SQL rows, as
the worker and the HL7 listener would write them), the gate opens and the held SR reaches the
PACS; then the last ``drift_window`` pairs stop discriminating, the gate closes again, /healthz
says degraded naming it, the Prometheus gauges show it, and the next study is held again.
Required: the SR, the card and ``show`` say "not assessed: awaiting site validation (37 of 100
DXA-matched studies)", while the model's figures are kept beside the row for the validation; once
the gate opens the study is replayed and its assessed SR reaches the PACS as version 2.
"""

from __future__ import annotations

import json
import urllib.request
from datetime import date, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from osteogate.gateway.report.sr import read_result
from osteogate.gateway.store.db import Database, Delivery, DeliveryStatus, Study, StudyResult
from sqlalchemy import func, select

from tests.gateway_harness import GatewayProcess
from tests.helpers import StoreSCP, free_port, make_dataset, storescu, wait_until, write_dataset
from tests.helpers.pairs import store_pairs, synthetic_pairs
from tests.report_data import fused_checkpoint, require

DEMOGRAPHICS = {"PatientAge": "071Y", "PatientSex": "F", "PatientWeight": "62", "PatientSize": "1.60"}


@pytest.fixture(scope="module")
def fused_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fused_checkpoint(tmp_path_factory.mktemp("fused") / "fused.safetensors")


def _store(data_dir: Path, pairs: int) -> Database:
    data_dir.mkdir(parents=True, exist_ok=True)
    db = Database(f"sqlite:///{(data_dir / 'osteogate.db').resolve()}")
    db.migrate()
    store_pairs(db, synthetic_pairs(pairs))
    return db


def _deliveries(db: Database, status: DeliveryStatus) -> int:
    with db.session() as session:
        return int(session.execute(select(func.count()).select_from(Delivery).where(Delivery.status == status))
                   .scalar_one())


def _health(port: int) -> dict[str, Any]:
    return json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10).read())


def _gauges(port: int) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {s.labels["figure"]: s.value for f in text_string_to_metric_families(text) if f.name == "osteogate_site_gate"
            for s in f.samples}


def _send(gw: GatewayProcess, work: Path, name: str, patient: str) -> str:
    ds = make_dataset(seed=7, PatientID=patient, **DEMOGRAPHICS)
    assert storescu([write_dataset(ds, work / f"{name}.dcm")], "127.0.0.1", gw.port, "OSTEOGATE").returncode == 0
    return str(ds.StudyInstanceUID)


def test_shadow_holds_until_validated_then_drift_closes_the_gate(
        tmp_path: Path, fused_model: Path, dcmtk_pacs: StoreSCP) -> None:
    require("storescu", "storescp")
    db = _store(tmp_path / "gw", 60)
    http = free_port()
    env = {"OSTEOGATE_GATE_SITE_VALIDATION": "shadow", "OSTEOGATE_GATE_REFRESH_SECONDS": "0.5",
           "OSTEOGATE_GATE_DRIFT_WINDOW": "100", "OSTEOGATE_HTTP_ENABLED": "true", "OSTEOGATE_HTTP_PORT": str(http)}
    with GatewayProcess(tmp_path / "gw", model=fused_model, destinations=[f"PACS@127.0.0.1:{dcmtk_pacs.port}"],
                        env=env) as gw:
        _send(gw, tmp_path, "first", "SITE-0001")
        wait_until(lambda: _deliveries(db, DeliveryStatus.HELD) == 1 or None, 120)  # one row: the SR and the card
        health = _health(http)
        assert health["status"] == "ok" and health["site_gate"]["kind"] == "awaiting"
        assert health["site_gate"]["reason"] == "awaiting site validation (60 of 100 DXA-matched studies)"
        assert _gauges(http)["open"] == 0
        assert dcmtk_pacs.files("SR*.dcm") == []
        with db.session() as session:  # made and stored: the result itself is not held back
            assert session.execute(select(StudyResult.assessed).join(Study)
                                   .where(Study.patient_id == "SITE-0001")).scalar_one() is True

        # The site's DXA results arrive: 500 matched studies that discriminate well.
        store_pairs(db, synthetic_pairs(440, start=60))
        [sr] = dcmtk_pacs.wait_for_files("SR*.dcm", count=1, timeout=60)
        assert read_result(pydicom.dcmread(sr)).groups[0].assessed
        dcmtk_pacs.wait_for_files("SC*.dcm", count=1, timeout=60)
        assert _deliveries(db, DeliveryStatus.HELD) == 0
        gauges = _gauges(http)
        assert gauges["open"] == 1 and gauges["pairs"] == 500 and gauges["auc_lower"] > 0.70
        assert _health(http)["site_gate"]["open"] is True

        # Drift: the last 100 pairs carry nothing; the gate closes, health says so, results are held.
        store_pairs(db, synthetic_pairs(100, seed=9, noise=8.0, start=500))
        health = wait_until(lambda: (h := _health(http))["status"] == "degraded" and h, 30)
        assert health["healthy"] is True and health["site_gate"]["kind"] == "drift"
        assert health["degraded_reason"].startswith("site gate closed: drift: low-BMD AUC of the last 100")
        gauges = _gauges(http)
        assert gauges["open"] == 0 and gauges["rolling_pairs"] == 100 and gauges["rolling_auc_lower"] < 0.70
        _send(gw, tmp_path, "second", "SITE-0002")
        wait_until(lambda: _deliveries(db, DeliveryStatus.HELD) == 1 or None, 120)
        assert len(dcmtk_pacs.files("SR*.dcm")) == 1
    assert '"site_gate"' in gw.log() and "SITE-0001" not in gw.log()


def test_required_reports_not_assessed_awaiting_site_validation(
        tmp_path: Path, fused_model: Path, dcmtk_pacs: StoreSCP) -> None:
    require("storescu", "storescp")
    db = _store(tmp_path / "gw", 37)
    env = {"OSTEOGATE_GATE_SITE_VALIDATION": "required", "OSTEOGATE_GATE_REFRESH_SECONDS": "0.5"}
    with GatewayProcess(tmp_path / "gw", model=fused_model, destinations=[f"PACS@127.0.0.1:{dcmtk_pacs.port}"],
                        env=env) as gw:
        study_uid = _send(gw, tmp_path, "one", "SITE-0003")
        [sr] = dcmtk_pacs.wait_for_files("SR*.dcm", count=1, timeout=120)
        dcmtk_pacs.wait_for_files("SC*.dcm", count=1, timeout=60)
        show = gw.cli("show", study_uid).stdout
        row = next(r for r in gw.studies() if r["study_uid"] == study_uid)
        # The site's evidence arrives: the gate opens and the withheld result is replayed, reaching
        # the PACS as version 2 (its predecessor, the "not assessed" SR, was sent).
        store_pairs(db, synthetic_pairs(120, start=37))
        second = next(p for p in dcmtk_pacs.wait_for_files("SR*.dcm", count=2, timeout=120) if p != sr)
        replayed = read_result(pydicom.dcmread(second))
        assert replayed.groups[0].assessed and replayed.groups[0].decision in (
            "DXA referral suggested", "below the referral threshold")
    reason = "awaiting site validation (37 of 100 DXA-matched studies)"
    reading = read_result(pydicom.dcmread(sr))
    assert not reading.groups[0].assessed and reading.summary.startswith("NOT ASSESSED - ")
    assert any(reason in c for c in reading.groups[0].comments) or reason in reading.summary
    assert f"NOT ASSESSED: {reason}" in show and "estimated T-score" not in show
    assert row["assessed"] is False
    with db.session() as session:
        result = session.execute(select(StudyResult).join(Study).where(Study.patient_id == "SITE-0003",
                                                                       StudyResult.version == 1)).scalar_one()
        # The model's figures, kept for the site's validation only.
        assert result.withheld["probabilities"] and result.withheld["t_score"] is not None
        assert result.probabilities is None and result.t_score is None and result.decision is None
    # The site refit's rows: the screened study (its instances still in the spool) with its DXA
    # result; the 37 SQL-only pairs have no instances and are counted as skipped.
    from osteogate.gateway.groundtruth.exams import DxaResult, DxaSiteValue, save_results

    with db.session() as session:
        study_date = session.execute(select(Study.study_date).where(Study.patient_id == "SITE-0003")).scalar_one()
    day = datetime.strptime(study_date, "%Y%m%d").date() if study_date else date.today()
    with db.session(write=True) as session:
        save_results(session, [DxaResult("SITE-0003", None, day, "csv", "test", (DxaSiteValue("hip", -2.7),))])
    rows_path = tmp_path / "rows.npz"
    gw.cli("validate", "--export-rows", str(rows_path), "--quiet")
    with np.load(rows_path) as rows:
        assert rows["t"].tolist() == [-2.7] and int(rows["skipped"]) == 157
        assert rows["age"].tolist() == [71.0] and rows["sex"].tolist() == [1.0]
        assert np.isfinite(rows["image_probs"]).all() and "SITE-0003" not in rows["patient"][0]

