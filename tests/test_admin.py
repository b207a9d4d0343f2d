"""Admin CLI on a real store: replay, resend, purge, studies filters, config check, stale jobs.

The store is real (SQLite file, spool, reports); DICOM goes over loopback to dcmtk storescp;
the commands run as `python -m osteogate.gateway.operate.cli` subprocesses like an admin would run them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest
from osteogate.gateway.core.config import Settings, load_settings
from osteogate.gateway.deliver.delivery import DeliveryManager
from osteogate.gateway.operate.admin import recover_stale_jobs
from osteogate.gateway.operate.preflight import ClassifierCache
from osteogate.gateway.receive.ingest import Ingestor
from osteogate.gateway.receive.tracker import StudyTracker
from osteogate.gateway.report.publisher import ReportPublisher
from osteogate.gateway.store.db import (
    Database,
    Delivery,
    DeliveryStatus,
    Instance,
    Job,
    JobStatus,
    Study,
    StudyStatus,
    utcnow,
)
from osteogate.gateway.store.spool import Spool
from osteogate.gateway.work.worker import ClassifierWorker
from pydicom.uid import generate_uid
from sqlalchemy import select, update

from tests.gateway_harness import GatewayProcess
from tests.helpers import (
    StoreSCP,
    dcmtk_available,
    free_port,
    make_dataset,
    storescu,
    wait_until,
    write_dataset,
)

REPO = Path(__file__).resolve().parent.parent
needs_dcmtk = pytest.mark.skipif(not dcmtk_available("storescu", "storescp"), reason="dcmtk missing")


def osteogate(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OSTEOGATE_")}
    env |= {"OMP_NUM_THREADS": "1", "OSTEOGATE_STORAGE_MIN_FREE_MB": "0",
            "OSTEOGATE_DELIVERY_RETRY_BASE_SECONDS": "0.5"}
    result = subprocess.run([sys.executable, "-m", "osteogate.gateway.operate.cli", *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    if check and result.returncode != 0:
        raise AssertionError(f"osteogate {' '.join(args)} -> {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


# -- an in-process store, for setups a live gateway cannot produce on demand ------------------


@dataclass
class Store:
    data_dir: Path
    db: Database
    spool: Spool
    reports: Spool
    model: Path

    def settings(self, destinations: list[str]) -> Settings:
        return load_settings(environ={}, overrides={
            "storage": {"data_dir": str(self.data_dir), "min_free_mb": 0},
            "model": {"path": str(self.model)},
            "delivery": {"destinations": destinations, "timeout_seconds": 5},
        })

    def ingest_study(self, work: Path, images: int = 1, **kwargs: object) -> str:
        study_uid = generate_uid()
        ingestor = Ingestor(self.db, self.spool)
        for n in range(images):
            path = write_dataset(make_dataset(study_uid=study_uid, **kwargs), work / f"{study_uid}-{n}.dcm")  # type: ignore[arg-type]
            ingestor.store(path.read_bytes(), calling_ae="TEST")
        return study_uid

    def classify(self, study_uid: str, destinations: list[str]) -> None:
        """Queue and classify one study with the given delivery destinations."""
        StudyTracker(self.db, 0).queue_stable_studies()
        with self.db.session() as session:
            job_id = session.execute(select(Job.id).join(Study).where(
                Study.study_uid == study_uid, Job.status == JobStatus.PENDING)).scalar_one()
        settings = self.settings(destinations)
        worker = ClassifierWorker(settings, self.db, self.spool, ReportPublisher(settings, self.reports), ClassifierCache(settings))
        assert worker.run_once(only=[job_id])

    def age(self, days: float) -> None:
        with self.db.session() as session:
            session.execute(update(Study).values(last_received_at=utcnow() - timedelta(days=days)))

    def cli_args(self) -> list[str]:
        return ["--data-dir", str(self.data_dir)]


@pytest.fixture
def store(tmp_path: Path, tiny_model: Path) -> Store:
    data_dir = tmp_path / "gw"
    data_dir.mkdir()
    db = Database(f"sqlite:///{data_dir / 'osteogate.db'}")
    db.migrate()
    (tmp_path / "in").mkdir()
    return Store(data_dir, db, Spool(data_dir / "spool"), Spool(data_dir / "reports"), tiny_model)


def _spooled(store: Store, study_uid: str) -> list[Path]:
    root = store.spool.root / study_uid
    return sorted(root.rglob("*.dcm")) if root.exists() else []


# -- replay and resend -------------------------------------------------------------------------


@needs_dcmtk
def test_replay_sends_new_sr_referencing_previous_then_resend(
    tmp_path: Path, dcmtk_pacs: StoreSCP, tiny_model: Path
) -> None:
    pacs_address = f"PACS@127.0.0.1:{dcmtk_pacs.port}"
    image = write_dataset(make_dataset(), tmp_path / "knee.dcm")
    study_uid = str(pydicom.dcmread(image).StudyInstanceUID)
    with GatewayProcess(tmp_path / "gw", model=tiny_model, destinations=[pacs_address]) as gw:
        assert storescu([image], "127.0.0.1", gw.port, "OSTEOGATE").returncode == 0
        first = dcmtk_pacs.wait_for_files("SR*.dcm", count=1, timeout=120)
        wait_until(lambda: gw.studies()[0]["delivered"] == "1/1", 30)
    first_uid = str(pydicom.dcmread(first[0]).SOPInstanceUID)
    common = ["--model", str(tiny_model), "--to", pacs_address, "--data-dir", str(gw.data_dir)]

    # The gateway is stopped: the CLI's own in-process worker does the run, then delivers.
    dry = osteogate("replay", study_uid, "--dry-run", *common)
    assert "dry run" in dry.stdout and "replay" in dry.stdout
    assert len(dcmtk_pacs.files("SR*.dcm")) == 1
    done = osteogate("replay", study_uid, *common)
    assert "replayed 1 of 1" in done.stdout, done.stdout

    srs = sorted((pydicom.dcmread(p) for p in dcmtk_pacs.wait_for_files("SR*.dcm", count=2, timeout=60)),
                 key=lambda d: int(d.InstanceNumber))
    assert [int(d.InstanceNumber) for d in srs] == [1, 2]
    assert srs[0].SOPInstanceUID == first_uid and srs[1].SOPInstanceUID != first_uid
    predecessor = srs[1].PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert predecessor.ReferencedSOPInstanceUID == first_uid
    second_uid = str(srs[1].SOPInstanceUID)

    show = osteogate("show", study_uid, "--data-dir", str(gw.data_dir)).stdout
    assert "SR history (2)" in show
    assert f"SOP {second_uid}  predecessor {first_uid}" in show
    assert "(replay)" in show and "Latest SR (version 2)" in show

    # resend: the same SR (same SOP Instance UID) goes again, here to a second PACS.
    other = StoreSCP(tmp_path / "pacs2", ae_title="PACS2").start()
    try:
        sent = osteogate("resend", study_uid, "--to", f"PACS2@127.0.0.1:{other.port}", "--data-dir", str(gw.data_dir))
        assert f"SR {second_uid} -> PACS2@" in sent.stdout and ": sent" in sent.stdout
        received = other.wait_for_files("SR*.dcm", count=1, timeout=30)
        assert str(pydicom.dcmread(received[0]).SOPInstanceUID) == second_uid
    finally:
        other.stop()


@needs_dcmtk
def test_replay_while_gateway_runs(tmp_path: Path, dcmtk_pacs: StoreSCP, tiny_model: Path) -> None:
    """The running gateway may take the replay job itself: the CLI waits on the job row either way."""
    pacs_address = f"PACS@127.0.0.1:{dcmtk_pacs.port}"
    images = [write_dataset(make_dataset(), tmp_path / f"{n}.dcm") for n in range(3)]
    with GatewayProcess(tmp_path / "gw", model=tiny_model, destinations=[pacs_address]) as gw:
        assert storescu(images, "127.0.0.1", gw.port, "OSTEOGATE").returncode == 0
        dcmtk_pacs.wait_for_files("SR*.dcm", count=3, timeout=120)
        wait_until(lambda: [r["delivered"] for r in gw.studies()] == ["1/1"] * 3, 30)
        # --to another PACS: whichever process runs the jobs (often the gateway's own worker),
        # the new SRs go there, not to the gateway's configured destination.
        other = StoreSCP(tmp_path / "pacs2", ae_title="PACS2").start()
        try:
            done = gw.cli("replay", "--status", "done", "--model", str(tiny_model),
                          "--to", f"PACS2@127.0.0.1:{other.port}")
            assert "replayed 3 of 3" in done.stdout and "3 of 3 SR delivery(ies) sent" in done.stdout, done.stdout
            other.wait_for_files("SR*.dcm", count=3, timeout=60)
            wait_until(lambda: [r["delivered"] for r in gw.studies()] == ["1/1"] * 3, 30)
            rows = gw.studies()
        finally:
            other.stop()
        assert len(dcmtk_pacs.files("SR*.dcm")) == 3  # nothing new at the configured PACS
    assert [r["sr_versions"] for r in rows] == [2, 2, 2]
    assert {r["status"] for r in rows} == {"done"}


def test_replay_refuses_unfinished_and_unknown_studies(store: Store, tmp_path: Path) -> None:
    receiving = store.ingest_study(tmp_path / "in")
    result = osteogate("replay", receiving, "--dry-run", *store.cli_args())
    assert "wait until it is finished" in result.stdout
    assert osteogate("replay", receiving, *store.cli_args(), check=False).returncode == 1
    assert osteogate("replay", *store.cli_args(), check=False).returncode == 64  # usage
    # An unknown study is a missing input (66, as README says), dry run or not, and nothing runs.
    for extra in (["--dry-run"], []):
        unknown = osteogate("replay", receiving, "1.2.3.999", *extra, *store.cli_args(), check=False)
        assert unknown.returncode == 66, unknown
        assert "no study '1.2.3.999'" in unknown.stderr and len(unknown.stderr.splitlines()) == 1
    with store.db.session() as session:
        assert session.execute(select(Job).where(Job.reason == "replay")).first() is None


def test_studies_are_named_by_key_everywhere(store: Store, tmp_path: Path) -> None:
    """Logs and `show` print study keys: replay, resend and show take them as well as UIDs."""
    uid = store.ingest_study(tmp_path / "in")
    with store.db.session() as session:
        key = session.execute(select(Study.study_key).where(Study.study_uid == uid)).scalar_one()
    dry = osteogate("replay", key, "--dry-run", *store.cli_args())
    assert uid in dry.stdout and "wait until it is finished" in dry.stdout
    assert osteogate("show", key.upper(), *store.cli_args()).stdout.startswith(f"Study {uid}")
    resend = osteogate("resend", key, *store.cli_args(), check=False)
    assert resend.returncode == 66 and "no SR for study" in resend.stderr  # found; it has no SR yet
    for verb in ("show", "resend", "replay"):
        missing = osteogate(verb, "0123456789abcdef", *store.cli_args(), check=False)
        assert missing.returncode == 66, (verb, missing)


def test_replay_destination_travels_with_the_job(store: Store, tmp_path: Path) -> None:
    """`replay --to` is stored on the job row: a worker configured for another PACS (a running
    gateway's) that takes the job still queues the SR for the replay's destination."""
    from osteogate.gateway.operate.replay import plan_replay, queue_replay

    uid = store.ingest_study(tmp_path / "in")
    store.classify(uid, ["CONFIGURED@127.0.0.1:104"])
    (job_id,) = queue_replay(store.db, plan_replay(store.db, [uid]), None, ["REPLAYTO@127.0.0.1:105"])
    settings = store.settings(["CONFIGURED@127.0.0.1:104"])  # the running gateway's settings
    worker = ClassifierWorker(settings, store.db, store.spool, ReportPublisher(settings, store.reports),
                              ClassifierCache(settings))
    assert worker.run_once(only=[job_id])
    with store.db.session() as session:
        rows = session.execute(select(Delivery.destination).where(Delivery.result.has(job_id=job_id))).scalars().all()
    assert rows == ["REPLAYTO@127.0.0.1:105"]


@needs_dcmtk
def test_resend_to_down_peer_reports_pending(store: Store, tmp_path: Path, dcmtk_pacs: StoreSCP) -> None:
    uid = store.ingest_study(tmp_path / "in")
    store.classify(uid, [f"PACS@127.0.0.1:{dcmtk_pacs.port}"])
    down = f"GONE@127.0.0.1:{free_port()}"
    result = osteogate("resend", uid, "--to", down, "--wait", "1", *store.cli_args(), check=False)
    assert result.returncode == 1 and "pending" in result.stdout
    # The cause is known at once (ECONNREFUSED) and said so; the log is one human warning line per
    # attempt, no JSON and none of pynetdicom's two ERROR lines.
    assert "connection refused by 127.0.0.1" in result.stdout, result.stdout
    assert "TLS handshake failed, or" not in result.stdout
    log_lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert log_lines and all("sr_delivery_retry" in line and "warning" in line for line in log_lines), result.stderr
    assert not any(line.lstrip().startswith("{") for line in log_lines)
    assert "TCP Initialisation Error" not in result.stderr and "unable to connect" not in result.stderr


# -- purge ---------------------------------------------------------------------------------------


@needs_dcmtk
def test_purge_never_touches_undelivered_or_unprocessed(store: Store, tmp_path: Path, dcmtk_pacs: StoreSCP) -> None:
    work = tmp_path / "in"
    delivered = store.ingest_study(work, images=2)
    undelivered = store.ingest_study(work)
    store.classify(delivered, [f"PACS@127.0.0.1:{dcmtk_pacs.port}"])
    store.classify(undelivered, [f"PACS@127.0.0.1:{free_port()}"])  # nobody listens: stays pending
    settings = store.settings([])
    DeliveryManager(settings, store.db, store.reports).run_due()
    unprocessed = store.ingest_study(work)  # still receiving
    store.age(30)
    with store.db.session() as session:
        states = {d.result.study.study_uid: d.status for d in session.execute(select(Delivery)).scalars()}
    assert states == {delivered: DeliveryStatus.SENT, undelivered: DeliveryStatus.PENDING}

    dry = osteogate("purge", "--older-than", "7", "--dry-run", *store.cli_args())
    assert "would remove 2 spooled file(s)" in dry.stdout
    assert len(_spooled(store, delivered)) == 2
    young = osteogate("purge", "--older-than", "60", *store.cli_args())
    assert "removed 0 spooled file(s)" in young.stdout

    done = osteogate("purge", "--older-than", "7", *store.cli_args())
    assert "removed 2 spooled file(s)" in done.stdout and "(SRs and SQL rows kept)" in done.stdout
    assert _spooled(store, delivered) == [] and not (store.spool.root / delivered).exists()
    assert len(_spooled(store, undelivered)) == 1 and len(_spooled(store, unprocessed)) == 1
    assert list(store.reports.root.rglob("*.dcm")), "SRs are kept for resend"
    with store.db.session() as session:
        purged = {i.study.study_uid: i.purged_at is not None for i in session.execute(select(Instance)).scalars()}
    assert purged == {delivered: True, undelivered: False, unprocessed: False}
    assert "PURGED" in osteogate("show", delivered, *store.cli_args()).stdout
    # A purged study cannot be replayed (its images are gone): said, not attempted.
    assert "purged by retention" in osteogate("replay", delivered, "--dry-run", *store.cli_args()).stdout
    assert "removed 0 spooled file(s)" in osteogate("purge", "--older-than", "7", *store.cli_args()).stdout


# -- studies filters --------------------------------------------------------------------------------


def _listing(store: Store, *filters: str) -> set[str]:
    out = osteogate("studies", "--json", *filters, *store.cli_args()).stdout
    return {row["study_uid"] for row in json.loads(out)}


def test_studies_filters(store: Store, tmp_path: Path) -> None:
    work = tmp_path / "in"
    knee = store.ingest_study(work)
    chest = store.ingest_study(work, body_part="CHEST", study_description="XR CHEST", series_description="CHEST PA")
    store.classify(knee, [])
    store.classify(chest, [])
    store.age(10)
    fresh = store.ingest_study(work)
    rows = json.loads(osteogate("studies", "--json", *store.cli_args()).stdout)
    assert {"study_uid", "status", "instances", "delivered"} <= set(rows[0])
    label = next(r["label"] for r in rows if r["study_uid"] == knee)

    assert _listing(store) == {knee, chest, fresh}
    assert _listing(store, "--status", "done") == {knee}
    assert _listing(store, "--status", "skipped") == {chest}
    shown = osteogate("show", chest, *store.cli_args()).stdout
    assert "not screened: no knee or spine image the model reads" in shown and "no decision recorded" not in shown
    assert _listing(store, "--status", "receiving") == {fresh}
    assert _listing(store, "--since", "1d") == {fresh}
    assert _listing(store, "--since", "2000-01-01") == {knee, chest, fresh}
    assert _listing(store, "--region", "knee") == {knee}
    assert _listing(store, "--region", "spine") == set()
    assert _listing(store, "--result", label) == {knee}
    assert _listing(store, "--region", "knee", "--status", "failed") == set()
    table = osteogate("studies", "--status", "done", *store.cli_args()).stdout
    assert "1 studies" in table
    assert osteogate("studies", "--since", "yesterday-ish", *store.cli_args(), check=False).returncode == 64


# -- config check --------------------------------------------------------------------------------


def test_config_check_good_and_bad(tmp_path: Path, tiny_model: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text(f'[dicom]\nae_title = "GW"\nport = 11112\n[delivery]\ndestinations = ["PACS@pacs.local:104"]\n'
                    f'[model]\npath = "{tiny_model}"\n[retention]\nspool_days = 30\n')
    ok = osteogate("config", "check", str(good))
    assert "OK" in ok.stdout and "PACS@pacs.local:104" in ok.stdout and "retention 30 days" in ok.stdout

    bad = tmp_path / "bad.toml"
    bad.write_text('[dicom]\nae_title = "A\\\\B"\nport = 70000\nbogus = 1\n[delivery]\ndestinations = ["nope"]\n'
                   '[retention]\nspool_days = -1\n')
    result = osteogate("config", "check", str(bad), check=False)
    assert result.returncode == 78
    for key in ("dicom.ae_title", "dicom.port", "dicom.bogus", "delivery.destinations", "retention.spool_days"):
        assert key in result.stdout, (key, result.stdout)

    missing_model = tmp_path / "model.toml"
    missing_model.write_text('[model]\npath = "/nonexistent/x.safetensors"\n')
    result = osteogate("config", "check", str(missing_model), check=False)
    assert result.returncode == 78 and "model.path" in result.stdout
    assert osteogate("config", "check", str(tmp_path / "absent.toml"), check=False).returncode == 66  # a missing input, as for serve --config
    # --config FILE as every other command takes it; nothing at all is a usage error.
    assert osteogate("config", "check", "--config", str(good)).stdout == ok.stdout
    nothing = osteogate("config", "check", check=False)
    assert nothing.returncode == 64 and "--config FILE" in nothing.stderr


# -- stale jobs ----------------------------------------------------------------------------------


def test_stale_jobs_requeued_or_failed_when_spent(store: Store, tmp_path: Path) -> None:
    work = tmp_path / "in"
    uids = [store.ingest_study(work) for _ in range(3)]
    StudyTracker(store.db, 0).queue_stable_studies()
    past, future = utcnow() - timedelta(minutes=5), utcnow() + timedelta(minutes=5)
    with store.db.session() as session:
        jobs = {j.study.study_uid: j for j in session.execute(select(Job)).scalars()}
        for uid, attempts, lease in ((uids[0], 1, past), (uids[1], 3, past), (uids[2], 1, future)):
            jobs[uid].status, jobs[uid].attempts, jobs[uid].lease_until = JobStatus.RUNNING, attempts, lease
            jobs[uid].worker = "elsewhere:1"
            jobs[uid].study.status = StudyStatus.PROCESSING
    assert recover_stale_jobs(store.db, max_attempts=3) == {"requeued": 1, "failed": 1}
    with store.db.session() as session:
        state = {j.study.study_uid: (j.status, j.study.status) for j in session.execute(select(Job)).scalars()}
    assert state[uids[0]] == (JobStatus.PENDING, StudyStatus.QUEUED)
    assert state[uids[1]] == (JobStatus.FAILED, StudyStatus.FAILED)
    assert state[uids[2]][0] == JobStatus.RUNNING  # lease still valid: its worker may be alive
    assert recover_stale_jobs(store.db, max_attempts=3) == {"requeued": 0, "failed": 0}


def test_replay_without_destinations_goes_where_earlier_srs_went(
    tmp_path: Path, dcmtk_pacs: StoreSCP, tiny_model: Path
) -> None:
    image = write_dataset(make_dataset(), tmp_path / "knee.dcm")
    study_uid = str(pydicom.dcmread(image).StudyInstanceUID)
    with GatewayProcess(tmp_path / "gw", model=tiny_model, destinations=[f"PACS@127.0.0.1:{dcmtk_pacs.port}"]) as gw:
        assert storescu([image], "127.0.0.1", gw.port, "OSTEOGATE").returncode == 0
        dcmtk_pacs.wait_for_files("SR*.dcm", count=1, timeout=120)
        wait_until(lambda: gw.studies()[0]["delivered"] == "1/1", 30)
    # No --to and no configured destination: an admin's one-off replay still reaches that PACS.
    done = osteogate("replay", study_uid, "--model", str(tiny_model), "--data-dir", str(gw.data_dir))
    assert "replayed 1 of 1" in done.stdout and "earlier SRs went" in done.stdout
    assert len(dcmtk_pacs.wait_for_files("SR*.dcm", count=2, timeout=60)) == 2


# -- show by study key, --json; resend targets on a real store ------------------------------------


@needs_dcmtk
def test_show_by_study_key_and_json(store: Store, tmp_path: Path, dcmtk_pacs: StoreSCP) -> None:
    uid = store.ingest_study(tmp_path / "in", images=2)
    store.classify(uid, [f"PACS@127.0.0.1:{dcmtk_pacs.port}"])
    DeliveryManager(store.settings([]), store.db, store.reports).run_due()
    with store.db.session() as session:
        key = session.execute(select(Study.study_key).where(Study.study_uid == uid)).scalar_one()
    by_key = osteogate("show", key, *store.cli_args()).stdout
    assert by_key == osteogate("show", uid, *store.cli_args()).stdout
    assert f"Study {uid}" in by_key and f"key {key}" in by_key
    record = json.loads(osteogate("show", key, "--json", *store.cli_args()).stdout)
    assert record["study_uid"] == uid and record["study_key"] == key and record["status"] == "done"
    assert len(record["instances"]) == 2 and all(i["sop_instance_uid"] for i in record["instances"])
    (result,) = record["results"]
    assert result["sr_sop_instance_uid"] and result["predecessor_sr_uid"] is None
    assert [d["status"] for d in result["deliveries"]] == ["sent"]
    assert {i["status"] for i in result["images"]} == {"classified"}


@needs_dcmtk
def test_resend_skips_delivered_and_never_doubles_a_pending_delivery(
    store: Store, tmp_path: Path, dcmtk_pacs: StoreSCP
) -> None:
    pacs = f"PACS@127.0.0.1:{dcmtk_pacs.port}"
    down = f"GONE@127.0.0.1:{free_port()}"
    uid = store.ingest_study(tmp_path / "in")
    store.classify(uid, [pacs, down])
    DeliveryManager(store.settings([]), store.db, store.reports).run_due()  # PACS: sent; GONE: pending, retrying

    config = tmp_path / "site.toml"
    config.write_text(f'[storage]\ndata_dir = "{store.data_dir}"\nmin_free_mb = 0\n'
                      f'[delivery]\ndestinations = ["{pacs}", "{down}"]\ntimeout_seconds = 2\n')
    result = osteogate("resend", uid, "--config", str(config), "--timeout", "1", check=False)
    assert result.returncode == 1, result.stdout + result.stderr  # GONE is still down
    assert f"-> {pacs}: already delivered, not sent again" in result.stdout
    assert f"-> {down}: pending" in result.stdout
    with store.db.session() as session:
        rows = [(d.destination, d.status, d.attempts) for d in session.execute(select(Delivery)).scalars()]
    assert sorted(r[0] for r in rows) == sorted([pacs, down]), "no second delivery row for either"
    assert next(r for r in rows if r[0] == down)[2] >= 2, "the pending delivery was retried now"
    assert len(dcmtk_pacs.files("SR*.dcm")) == 1, "the PACS that has the SR does not get it again"

    # Asked for by name: sent again (storescp overwrites the same SOP Instance UID's file).
    again = osteogate("resend", uid, "--to", pacs, "--config", str(config), "--timeout", "20")
    assert f"-> {pacs}: sent" in again.stdout
    with store.db.session() as session:
        to_pacs = session.execute(select(Delivery.status).where(Delivery.destination == pacs)).scalars().all()
    assert to_pacs == [DeliveryStatus.SENT, DeliveryStatus.SENT]
