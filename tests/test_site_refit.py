"""The site refit: the shipped fusion procedure on a site's rows (patients as groups), a site card
served like any checkpoint, and the image left out where it adds nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from osteogate.model.checkpoint import checkpoint_sha256, read_card
from osteogate.training.site_refit import site_data

from tests.report_data import fused_checkpoint

REPO = Path(__file__).resolve().parents[1]


def site_rows(n: int = 120, seed: int = 5) -> dict[str, np.ndarray]:
    """A site where age and weight carry the T-score and the image scores are noise."""
    rng = np.random.default_rng(seed)
    age = rng.uniform(45, 90, n)
    weight = rng.uniform(45, 100, n)
    t = np.round(-0.06 * (age - 50) + 0.03 * (weight - 70) + rng.normal(0, 0.5, n), 1)
    noise = rng.dirichlet([2, 2, 2], n)
    return {"age": age, "sex": np.where(rng.random(n) < 0.8, 1.0, 0.0), "weight": weight,
            "height": rng.uniform(1.5, 1.85, n), "image_probs": noise, "t": t,
            "patient": np.array([f"p{i // 2:03d}" for i in range(n)]), "region": np.array(["knee"] * n),
            "skipped": np.asarray(3), "model_sha256": np.asarray("0" * 64)}


def test_folds_group_patients() -> None:
    data = site_data(site_rows())
    for group in np.unique(data.groups):
        assert len(set(data.folds[data.groups == group])) == 1  # a patient's studies share a fold
    assert sorted(set(data.folds)) == [0, 1, 2, 3, 4]


def test_refit_site_writes_a_served_site_card(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    shipped = fused_checkpoint(tmp_path / "fused.safetensors")
    rows = tmp_path / "rows.npz"
    np.savez(rows, **site_rows())
    out = tmp_path / "site" / "site.safetensors"
    done = subprocess.run([sys.executable, "-m", "osteogate.gateway.operate.cli", "refit-site", str(rows),
                           "--checkpoint", str(shipped), "--out", str(out), "--bootstrap", "200"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    card = read_card(out)
    base = read_card(shipped)
    assert card.version.startswith(f"{base.version}+site.") and card.name == base.name
    assert card.fusion["population"].startswith("60 patients of this site")
    assert card.training["site_refit"]["rows"] == 120
    head = card.fusion["situations"]["age+sex+weight+height"]["validation"]
    assert head["auc_low_bmd"]["value"] > 0.75  # age and weight carry the T-score at this site
    # Noise image scores earn no place: every image situation falls back to its covariates head.
    decisions = card.fusion["image_decisions"]
    assert decisions and not any(d["image_used"] for d in decisions.values())
    # Served like any checkpoint: the ONNX sibling carries the new checkpoint's sha256.
    import onnx
    from osteogate.model.inference import SHA_KEY

    props = {p.key: p.value for p in onnx.load(str(out.with_suffix(".onnx"))).metadata_props}
    assert props[SHA_KEY] == checkpoint_sha256(out)
    report = (out.parent / "SITE_REPORT.md").read_text()
    assert "| age+sex+weight+height | 120 |" in report and "the image is not used" in report
