"""The site's validation: figures checked against scikit-learn on the same pairs, patient-bootstrap
intervals, degenerate inputs, the verdict sentence and ``osteogate validate`` end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from osteogate.gateway.groundtruth.stats import Figure, PatientBootstrap
from osteogate.gateway.groundtruth.validation import PairTable, card_claims, validate, verdict
from osteogate.gateway.store.db import Database
from osteogate.model.checkpoint import read_card
from sklearn.metrics import confusion_matrix, mean_absolute_error, roc_auc_score

from tests.helpers.pairs import store_pairs, synthetic_pairs

SHIPPED = Path(__file__).resolve().parents[1] / "model" / "shipped" / "osteogate-knee.safetensors"


def test_figures_agree_with_sklearn_on_the_same_pairs() -> None:
    pairs = synthetic_pairs()
    result = validate(pairs, n_boot=200)
    y_low = np.array([p.dxa_t_score < -1.0 for p in pairs])
    y_ost = np.array([p.dxa_t_score <= -2.5 for p in pairs])
    p_low = np.array([p.p_low for p in pairs])
    assert result.pairs == 240 and result.patients == 120
    assert result.overall["low_bmd_auc"].value == pytest.approx(roc_auc_score(y_low, p_low), abs=1e-12)
    assert result.overall["osteoporosis_auc"].value == pytest.approx(
        roc_auc_score(y_ost, [p.p_osteoporosis for p in pairs]), abs=1e-12)
    tn, fp, fn, tp = confusion_matrix(y_low, [p.referral for p in pairs]).ravel()
    assert result.overall["sensitivity"].value == pytest.approx(tp / (tp + fn))
    assert result.overall["specificity"].value == pytest.approx(tn / (tn + fp))
    est = np.array([p.t_score_estimate for p in pairs])
    dxa = np.array([p.dxa_t_score for p in pairs])
    assert result.overall["t_score_mae"].value == pytest.approx(mean_absolute_error(dxa, est))
    assert result.overall["t_score_r"].value == pytest.approx(np.corrcoef(est, dxa)[0, 1])
    # ECE: independent binning with numpy histograms (10 equal-width bins, count weighted).
    counts, edges = np.histogram(p_low, bins=10, range=(0, 1))
    index = np.clip(np.digitize(p_low, edges[1:-1]), 0, 9)
    expected = sum(abs(y_low[index == b].mean() - p_low[index == b].mean()) * c for b, c in enumerate(counts) if c)
    assert result.overall["ece"].value == pytest.approx(expected / len(pairs))
    diff = est - dxa
    assert result.bland_altman["bias"] == pytest.approx(diff.mean())
    assert result.bland_altman["loa_high"] - result.bland_altman["loa_low"] == pytest.approx(2 * 1.96 * diff.std(ddof=1))
    # Subgroups use the same computation on their own pairs.
    women = [p for p in pairs if p.sex == "F"]
    assert result.subgroups["sex"]["female"]["low_bmd_auc"].value == pytest.approx(
        roc_auc_score([p.dxa_t_score < -1.0 for p in women], [p.p_low for p in women]))
    assert set(result.subgroups) == {"sex", "age band", "region", "manufacturer"}


def test_intervals_resample_patients_and_are_deterministic() -> None:
    pairs = synthetic_pairs()
    a = validate(pairs, n_boot=300, subgroups=False)
    b = validate(pairs, n_boot=300, subgroups=False)
    assert a.to_dict() == b.to_dict()
    low = a.overall["low_bmd_auc"]
    assert low.ci[0] < low.value < low.ci[1]
    # The same patient draws, scored by sklearn: the same percentile interval.
    table = PairTable.from_pairs(pairs)
    boot = PatientBootstrap(table.patient, n_boot=300, seed=a.seed)
    values = []
    for draw in boot.draws():
        assert all(np.sum(draw == i) == np.sum(draw == i + 1) for i in (0, 2, 4))  # both studies of a patient
        if 0 < table.low[draw].sum() < draw.size:
            values.append(roc_auc_score(table.low[draw], table.p_low[draw]))
    assert np.percentile(values, [2.5, 97.5]) == pytest.approx(list(low.ci), abs=1e-12)


@pytest.mark.parametrize("case", ["empty", "few", "one_class", "not_assessed"])
def test_degenerate_inputs_say_not_enough_evidence(case: str) -> None:
    pairs = synthetic_pairs(40)
    if case == "empty":
        pairs = []
    elif case == "few":
        pairs = pairs[:7]
    elif case == "one_class":
        pairs = [replace(p, dxa_t_score=-2.0) for p in pairs]
    else:
        pairs = [replace(p, assessed=False, p_low=None) for p in pairs]
    result = validate(pairs, n_boot=50)
    low = result.to_dict()["low_bmd_auc"]
    assert low["value"] is None and low["note"].startswith("not enough evidence")
    assert "not enough evidence" in result.verdicts["low_bmd_auc"]
    if case == "one_class":
        assert result.overall["t_score_mae"].known  # T-score agreement does not need two classes


def test_verdict_sentence_and_card_claims() -> None:
    site = Figure(0.81, (0.74, 0.88), 120)
    claim = Figure(0.94, (0.90, 0.98), 167)
    assert verdict("AUC", site, claim) == "site AUC 0.81 [0.74, 0.88] vs claimed 0.94 [0.90, 0.98]: below the claimed interval"
    assert verdict("AUC", Figure(0.93, (0.85, 0.97)), claim).endswith("within the claimed interval")
    assert verdict("AUC", Figure(0.86, (0.80, 0.91)), claim).endswith("intervals overlap, not shown to differ")
    claims = card_claims(read_card(SHIPPED))
    assert claims["low_bmd_auc"].ci[0] < claims["low_bmd_auc"].value < claims["low_bmd_auc"].ci[1]
    assert {"osteoporosis_auc", "sensitivity", "specificity", "ece"} <= set(claims)


def test_validate_command_json_and_offline_report(tmp_path: Path) -> None:
    # One study per patient here (each DXA exam is one patient-day).
    pairs = [replace(p, patient_hash=f"P{i:04d}") for i, p in enumerate(synthetic_pairs(60))]
    db = Database(f"sqlite:///{tmp_path / 'osteogate.db'}")
    db.migrate()
    store_pairs(db, pairs)
    db.engine.dispose()
    cli = [sys.executable, "-m", "osteogate.gateway.operate.cli", "validate", "--data-dir", str(tmp_path),
           "--bootstrap", "200"]
    done = subprocess.run([*cli, "--json", "--out", str(tmp_path / "report")], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["pairs"] == 60 and data["patients"] == 60
    expected = roc_auc_score([p.dxa_t_score < -1.0 for p in pairs], [p.p_low for p in pairs])
    assert data["low_bmd_auc"]["value"] == pytest.approx(expected, abs=1e-4)
    assert len(data["low_bmd_auc"]["ci"]) == 2 and data["osteoporosis_auc"]["value"] is not None
    assert data["t_score_mae"] == pytest.approx(np.mean([abs(p.t_score_estimate - p.dxa_t_score) for p in pairs]))
    assert "vs claimed" in data["verdicts"]["low_bmd_auc"]
    assert "bootstrap over patients: 200/200" in done.stderr
    page = (tmp_path / "report" / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert json.loads((tmp_path / "report" / "report.json").read_text())["pairs"] == 60
    assert "P0001" not in page and "; all pairs." in page
    # --region filters; text output names the verdicts.
    text = subprocess.run([*cli, "--region", "spine", "--quiet"], capture_output=True, text=True, timeout=300)
    assert text.returncode == 0, text.stderr
    assert text.stdout.startswith("15 DXA-matched studies") and "low-BMD AUC" in text.stdout
    narrowed = subprocess.run([*cli, "--region", "knee", "--quiet", "--out", str(tmp_path / "knee")],
                              capture_output=True, text=True, timeout=300)
    assert narrowed.returncode == 0, narrowed.stderr
    assert "; only region knee." in (tmp_path / "knee" / "report.html").read_text()
