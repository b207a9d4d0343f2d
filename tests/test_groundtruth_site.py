"""The DXA loop at a simulated site, end to end with real parts: knee films of the shared dataset
sent as DICOM (storescu) to `osteogate serve` with its MLLP port open, their DXA T-scores sent as
ORU^R01 over MLLP, and every study paired with its DXA result by `load_pairs`.

Skipped where the shared dataset or dcmtk is missing; the images only pass through a temporary
folder.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from osteogate.gateway.groundtruth.matching import load_pairs
from osteogate.gateway.operate.preflight import SHIPPED_MODEL
from osteogate.gateway.store.db import Database, Study, StudyResult
from sqlalchemy import func, select

from tests.gateway_harness import GatewayProcess
from tests.helpers import dcmtk_available, free_port, port_open, storescu, wait_until
from tests.helpers.mllp_client import MllpClient
from tests.helpers.site import dataset_dir, dxa_csv, oru_messages, site_patients, write_studies

COUNT = 6


@pytest.fixture
def dataset() -> Path:
    found = dataset_dir()
    if found is None:
        pytest.skip("../shared/datasets/knee-xray is not on this machine")
    return found


def test_simulated_site_studies_and_oru_results_pair_up(tmp_path: Path, dataset: Path) -> None:
    if not dcmtk_available("storescu"):
        pytest.skip("dcmtk (storescu) not installed")
    patients = site_patients(dataset, COUNT)
    files = write_studies(dataset, patients, tmp_path / "studies")
    mllp_port = free_port()
    env = {"OSTEOGATE_GROUNDTRUTH_MLLP_PORT": str(mllp_port), "OSTEOGATE_GROUNDTRUTH_BIND": "127.0.0.1",
           "OSTEOGATE_GROUNDTRUTH_ALLOWED_HOSTS": "127.0.0.1/32"}
    with GatewayProcess(tmp_path / "gw", model=SHIPPED_MODEL, env=env) as gw:
        wait_until(lambda: port_open("127.0.0.1", mllp_port), 30)
        with MllpClient(mllp_port) as client:  # results may arrive before the images: order does not matter
            acks = [client.send(message) for message in oru_messages(patients[: COUNT // 2])]
        assert storescu(files, "127.0.0.1", gw.port, "OSTEOGATE").returncode == 0
        with MllpClient(mllp_port) as client:
            acks += [client.send(message) for message in oru_messages(patients[COUNT // 2:])]
        assert [a.code for a in acks] == ["AA"] * COUNT
        db = Database(f"sqlite:///{tmp_path / 'gw' / 'osteogate.db'}")
        try:
            def results() -> int:
                with db.session() as session:
                    return session.execute(select(func.count(func.distinct(StudyResult.study_id)))).scalar_one()

            wait_until(lambda: results() == COUNT, 180, interval=0.5)
            with db.session() as session:
                stored = {s.patient_id: s for s in session.execute(select(Study)).scalars()}
            assert {p.patient_id for p in patients} == set(stored)
            first = stored[patients[0].patient_id]
            assert (first.issuer_of_patient_id, first.patient_sex, first.patient_age) == (
                "SITE_A", patients[0].sex, float(patients[0].age))
            pairs = load_pairs(db)
        finally:
            db.dispose()
        # The CSV export of the same results changes nothing: the exams are already there.
        imported = gw.cli("dxa", "import", str(dxa_csv(patients, tmp_path / "dxa.csv")))
        assert f"{COUNT} exam(s): 0 new, {COUNT} already present" in imported.stdout
    by_key = {p.study_key: p for p in pairs}
    assert len(pairs) == COUNT and len({p.patient_hash for p in pairs}) == COUNT
    expected = {stored[p.patient_id].study_key: p for p in patients}
    for key, pair in by_key.items():
        patient = expected[key]
        assert pair.dxa_t_score == pytest.approx(patient.t_score)
        assert pair.days_apart == abs((patient.dxa_date - patient.study_date).days)
        assert pair.study_date == patient.study_date and pair.region == "knee"
        assert pair.model_name and (pair.p_low is None or 0 <= pair.p_low <= 1)
    log = gw.log()
    assert all(p.patient_id not in log for p in patients)  # identifiers stay in SQL
