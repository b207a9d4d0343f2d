"""Scale-out: two `osteogate worker` processes share one PostgreSQL database and one spool.

Each study must be classified exactly once (exclusive claims), both workers must take part, and
nothing may fail.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from osteogate.gateway.receive.ingest import Ingestor
from osteogate.gateway.receive.tracker import StudyTracker
from osteogate.gateway.store.db import Database, Job, JobStatus, Study, StudyResult
from osteogate.gateway.store.spool import Spool
from sqlalchemy import func, select

from tests.helpers import make_dataset, wait_until, write_dataset

REPO = Path(__file__).resolve().parent.parent
STUDIES = 50

pytestmark = pytest.mark.postgres


def _start_worker(name: str, data_dir: Path, url: str, model: Path, logs: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OSTEOGATE_")}
    env |= {"OSTEOGATE_LOGGING_FORMAT": "json", "OSTEOGATE_WORKER_POLL_INTERVAL_SECONDS": "0.1",
            "OSTEOGATE_STORAGE_MIN_FREE_MB": "0", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with (logs / f"{name}.log").open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "osteogate.gateway.operate.cli", "worker", "--data-dir", str(data_dir), "--database-url", url,
             "--model", str(model)], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def test_two_workers_share_the_queue(tmp_path: Path, fresh_postgres_url: str, tiny_model: Path) -> None:
    data_dir = tmp_path / "shared"
    db = Database(fresh_postgres_url)
    db.migrate()
    spool = Spool(data_dir / "spool")
    ingestor = Ingestor(db, spool)
    work = tmp_path / "in"
    work.mkdir()
    for n in range(STUDIES):
        path = write_dataset(make_dataset(size=(48, 48)), work / f"{n}.dcm")
        ingestor.store(path.read_bytes(), calling_ae="TEST")

    workers = [_start_worker(f"worker{i}", data_dir, fresh_postgres_url, tiny_model, tmp_path) for i in (1, 2)]
    try:
        # Queue only once both are polling, so neither can drain the queue before the other starts.
        def started() -> bool:
            logs = [(tmp_path / f"worker{i}.log").read_text(errors="replace") for i in (1, 2)]
            assert all(proc.poll() is None for proc in workers), "\n".join(logs)
            return all("worker_started" in log for log in logs)

        wait_until(started, 90, interval=0.2)
        assert StudyTracker(db, stable_seconds=0).queue_stable_studies() == STUDIES

        def all_finished() -> bool:
            for proc in workers:
                assert proc.poll() is None, (tmp_path / "worker1.log").read_text() + (tmp_path / "worker2.log").read_text()
            with db.session() as session:
                return session.execute(select(func.count()).select_from(Job).where(
                    Job.status.in_([JobStatus.DONE, JobStatus.FAILED]))).scalar_one() == STUDIES

        wait_until(all_finished, 120, interval=0.5)
    finally:
        for proc in workers:
            _stop(proc)

    with db.session() as session:
        jobs = session.execute(select(Job)).scalars().all()
        results_per_study = Counter(session.execute(select(StudyResult.study_id)).scalars())
        study_ids = set(session.execute(select(Study.id)).scalars())
    db.dispose()
    assert len(jobs) == STUDIES
    assert Counter(j.status for j in jobs) == {JobStatus.DONE: STUDIES}
    assert {j.study_id for j in jobs} == study_ids  # one done job per study
    assert set(results_per_study) == study_ids and set(results_per_study.values()) == {1}
    by_worker = Counter(j.worker for j in jobs)
    assert len(by_worker) == 2, by_worker  # both workers took part
    assert all(j.attempts == 1 for j in jobs)
