"""Concurrent load: 20 associations at once, 20 instances each, into one gateway.

Pairs of associations share a study (and series), so the gateway also meets the race of two
associations creating the same study row at the same moment.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation

from tests.gateway_harness import GatewayProcess
from tests.helpers import make_dataset, wait_until, write_dataset

ASSOCIATIONS = 20
PER_ASSOCIATION = 20


def sender(port: int, paths: list[Path], start: threading.Barrier, results: dict[str, int],
           errors: list[str]) -> None:
    ae = AE(ae_title="LOADSCU")
    # A C-STORE that gets no answer within 30 s counts as a timeout (a missing result below).
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(DigitalXRayImageStorageForPresentation)
    datasets = [pydicom.dcmread(p) for p in paths]  # read before the barrier: send at the same time
    start.wait(60)
    assoc = ae.associate("127.0.0.1", port, ae_title="OSTEOGATE")
    if not assoc.is_established:
        errors.append("association not established")
        return
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            if not status or "Status" not in status:
                errors.append(f"no response for {ds.SOPInstanceUID}")
                break
            results[str(ds.SOPInstanceUID)] = int(status.Status)
    finally:
        if assoc.is_established:
            assoc.release()


@dataclass
class LoadRun:
    data_dir: Path
    studies: list[str]
    results: dict[str, int]
    errors: list[str]
    hung: int
    rows: list[dict]  # `osteogate studies --json` once every study is processed (empty on timeout)
    error_events: list[dict]


def run_load(tmp_path: Path, model: Path) -> LoadRun:
    work = tmp_path / "in"
    batches: list[list[Path]] = []
    studies = []
    for pair in range(ASSOCIATIONS // 2):
        study_uid, series_uid = generate_uid(), generate_uid()
        studies.append(study_uid)
        # Half the studies are chest (recorded as skipped, no SR): building a 40-image SR costs
        # ~1 s of CPU (highdicom), and ten of them would dominate the test on 2 cores.
        part = "KNEE" if pair % 2 == 0 else "CHEST"
        for half in range(2):
            batches.append([write_dataset(make_dataset(study_uid=study_uid, series_uid=series_uid, size=(64, 64),
                                                       body_part=part, study_description=f"XR {part}",
                                                       series_description=f"{part} AP"),
                                          work / f"{pair}_{half}_{i}.dcm") for i in range(PER_ASSOCIATION)])
    data_dir = tmp_path / "gw"
    results: dict[str, int] = {}
    errors: list[str] = []
    start = threading.Barrier(ASSOCIATIONS)
    # max_associations defaults to 16: raise it so all 20 really run at once (the point of the test).
    env = {"OSTEOGATE_DICOM_MAX_ASSOCIATIONS": str(ASSOCIATIONS + 4)}
    # stable_seconds 4: studies still arriving on a busy 2-core box should not be queued half-way.
    with GatewayProcess(data_dir, model=model, stable_seconds=4, env=env) as gw:
        threads = [threading.Thread(target=sender, args=(gw.port, batch, start, results, errors), daemon=True)
                   for batch in batches]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(90)

        def all_done() -> list[dict]:
            rows = gw.studies()
            return rows if len(rows) == len(studies) and all(
                r["status"] in ("done", "skipped") for r in rows) else []

        try:
            rows = wait_until(all_done, 120, interval=0.5)  # a correctness wait, not a timing goal (benchmarks/)
        except TimeoutError:
            rows = []
        error_events = [e for e in gw.events() if e.get("level") == "error"]
    return LoadRun(data_dir, studies, results, errors, sum(t.is_alive() for t in threads), rows, error_events)


@pytest.fixture(scope="module")
def load_run(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> LoadRun:
    return run_load(tmp_path_factory.mktemp("load"), tiny_model)


def check_stored_and_processed(run: LoadRun) -> None:
    total = ASSOCIATIONS * PER_ASSOCIATION
    assert run.hung == 0, "a sender hung"
    assert run.errors == []
    assert len(run.results) == total and set(run.results.values()) == {0x0000}, \
        {f"0x{c:04X}" for c in run.results.values()}
    assert run.rows, "not every study was processed"
    assert sorted(r["status"] for r in run.rows) == ["done"] * 5 + ["skipped"] * 5
    assert sorted(r["study_uid"] for r in run.rows) == sorted(run.studies)
    assert run.error_events == []
    with sqlite3.connect(f"file:{run.data_dir / 'osteogate.db'}?mode=ro", uri=True) as conn:
        assert conn.execute("SELECT count(*) FROM instances").fetchone()[0] == total
        assert conn.execute("SELECT count(*) FROM studies").fetchone()[0] == len(run.studies)
        assert conn.execute("SELECT count(DISTINCT series_uid) FROM series").fetchone()[0] == len(run.studies)
        per_study = conn.execute("SELECT count(*) FROM instances GROUP BY study_id").fetchall()
        assert {n for (n,) in per_study} == {2 * PER_ASSOCIATION}
    spooled = list((run.data_dir / "spool").rglob("*.dcm"))
    assert len(spooled) == total
    assert {p.stem for p in spooled} == set(run.results)


def test_twenty_concurrent_associations_all_stored_and_processed(load_run: LoadRun) -> None:
    check_stored_and_processed(load_run)


def test_instance_count_exact_under_concurrency(load_run: LoadRun) -> None:
    assert load_run.rows, "not every study was processed"
    # What `osteogate studies` shows must equal what is stored: 2 associations x 20 per study.
    assert sorted(r["instances"] for r in load_run.rows) == [2 * PER_ASSOCIATION] * len(load_run.studies)


@pytest.mark.slow
def test_load_repeated_rounds(tmp_path: Path, tiny_model: Path) -> None:
    """Slow variant: three rounds of the 20x20 load back to back on fresh stores."""
    for round_ in range(3):
        check_stored_and_processed(run_load(tmp_path / f"round{round_}", tiny_model))


def test_each_study_version_is_queued_once(tmp_path: Path, tiny_model: Path) -> None:
    """Single-instance studies sent one after another: each must get exactly one classify job and
    one result. The tracker runs both on its interval and at each study's own stable time; a fast
    interval makes the two runs overlap often, which must not queue a study version twice."""
    studies = [write_dataset(make_dataset(study_uid=generate_uid(), size=(64, 64)), tmp_path / "in" / f"{i}.dcm")
               for i in range(15)]
    env = {"OSTEOGATE_STUDY_CHECK_INTERVAL_SECONDS": "0.02"}
    data_dir = tmp_path / "gw"
    with GatewayProcess(data_dir, model=tiny_model, stable_seconds=0.5, env=env) as gw:
        for path in studies:
            ae = AE(ae_title="MODALITY")
            ae.add_requested_context(DigitalXRayImageStorageForPresentation)
            assoc = ae.associate("127.0.0.1", gw.port, ae_title="OSTEOGATE")
            assert assoc.is_established
            try:
                assert int(assoc.send_c_store(pydicom.dcmread(path)).Status) == 0
            finally:
                assoc.release()
            time.sleep(0.2)

        def all_done() -> list[dict]:
            rows = gw.studies()
            return rows if len(rows) == len(studies) and all(r["status"] == "done" for r in rows) else []

        wait_until(all_done, 120, interval=0.5)
        time.sleep(1)  # a duplicate job queued late would show up now
    with sqlite3.connect(f"file:{data_dir / 'osteogate.db'}?mode=ro", uri=True) as conn:
        jobs = conn.execute("SELECT study_id, study_version, count(*) FROM jobs GROUP BY 1, 2 HAVING count(*) > 1")
        duplicated = jobs.fetchall()
        results = conn.execute("SELECT count(*) FROM study_results").fetchone()[0]
    assert duplicated == [], f"study versions queued more than once: {duplicated}"
    assert results == len(studies)
