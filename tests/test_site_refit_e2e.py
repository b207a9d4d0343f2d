"""The site refit at a simulated site, end to end with real parts: knee films of the shared dataset
sent as DICOM (storescu) to `osteogate serve` with the shipped model, their DXA results imported
(`osteogate dxa import`), the rows exported (`osteogate validate --export-rows`, the studies read
back from the spool), the refit run (`osteogate refit-site`), and the site checkpoint served: the
SR of the next study names the site card.

Skipped where the shared dataset or dcmtk is missing; the images only pass through a temporary folder.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from osteogate.gateway.operate.preflight import SHIPPED_MODEL
from osteogate.gateway.report.sr_read import read_result
from osteogate.gateway.store.db import Database, StudyResult
from osteogate.model.checkpoint import read_card
from sqlalchemy import func, select

from tests.gateway_harness import REPO, GatewayProcess
from tests.helpers import StoreSCP, dcmtk_available, storescu, wait_until
from tests.helpers.site import dataset_dir, dxa_csv, site_patients, write_studies

COUNT = 24


def osteogate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "osteogate.gateway.operate.cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=900, check=False)


def test_site_refit_from_the_command_line_and_its_card_served(tmp_path: Path, dcmtk_pacs: StoreSCP) -> None:
    dataset = dataset_dir()
    if dataset is None:
        pytest.skip("../shared/datasets/knee-xray is not on this machine")
    if not dcmtk_available("storescu"):
        pytest.skip("dcmtk (storescu) not installed")
    patients = site_patients(dataset, COUNT + 1)
    site, later = patients[:COUNT], patients[COUNT:]
    files = write_studies(dataset, patients, tmp_path / "studies")
    data_dir = tmp_path / "gw"
    db = Database(f"sqlite:///{data_dir / 'osteogate.db'}")

    def results() -> int:
        with db.session() as session:
            return session.execute(select(func.count(func.distinct(StudyResult.study_id)))).scalar_one()

    with GatewayProcess(data_dir, model=SHIPPED_MODEL) as gw:
        assert storescu(files[:COUNT], "127.0.0.1", gw.port, "OSTEOGATE").returncode == 0
        wait_until(lambda: results() == COUNT, 300, interval=0.5)
    imported = osteogate("dxa", "import", str(dxa_csv(site, tmp_path / "dxa.csv")), "--data-dir", str(data_dir))
    assert imported.returncode == 0, imported.stderr

    rows = tmp_path / "site-rows.npz"
    exported = osteogate("validate", "--data-dir", str(data_dir), "--export-rows", str(rows))
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert f"refit with `osteogate refit-site {rows} --checkpoint " in exported.stderr  # the command that exists
    checkpoint = tmp_path / "site-model" / "osteogate-knee-site.safetensors"
    refit = osteogate("refit-site", str(rows), "--checkpoint", str(SHIPPED_MODEL), "--out", str(checkpoint),
                      "--bootstrap", "100")
    assert refit.returncode == 0, refit.stderr[-3000:]
    card = read_card(checkpoint)
    shipped = read_card(SHIPPED_MODEL)
    assert card.version != shipped.version and card.fusion != shipped.fusion
    assert f"{COUNT} " in card.fusion["population"]  # the site's patients, not the shipped cohort
    assert (checkpoint.parent / "SITE_REPORT.md").is_file()

    # The site card served like any checkpoint: the next study's SR names it.
    dcmtk_pacs.start()
    with GatewayProcess(data_dir, model=checkpoint, destinations=[f"PACS@127.0.0.1:{dcmtk_pacs.port}"]) as gw:
        assert storescu(files[COUNT:], "127.0.0.1", gw.port, "OSTEOGATE").returncode == 0
        [sr] = dcmtk_pacs.wait_for_files("SR*.dcm", 1, timeout=180)
    reading = read_result(pydicom.dcmread(sr))
    assert f"version {card.version}" in reading.algorithm
    assert later[0].patient_id == pydicom.dcmread(sr).PatientID
