"""Backfill decision logic without a PACS: the window (fake clock), the rate limiter (fake clock),
date chunks, how retrieve statuses are judged, the --patients file, the [backfill] section, the
case-finding list over a real SQLite store, and the withheld delivery of backfilled results."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import date, datetime, time
from pathlib import Path

import pytest
from osteogate.gateway.backfill.query import Chunk, Filters, plan_chunks
from osteogate.gateway.backfill.retrieve import MoveDestinationUnknown, judge
from osteogate.gateway.backfill.setup import read_patients
from osteogate.gateway.backfill.window import RateLimiter, Window
from osteogate.gateway.core.config import ConfigError, load_settings
from osteogate.gateway.core.dicomnet import Outcome
from osteogate.gateway.core.errors import UsageError
from osteogate.gateway.store.backfill import BackfillState, BackfillStudy, is_backfilled
from osteogate.gateway.store.db import Database, Job, JobStatus, Study, StudyResult, StudyStatus
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import text

from tests.gateway_harness import REPO
from tests.helpers import free_port, make_dataset, write_dataset

# -- window ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("window", "now", "inside"), [
    ("19:00-07:00", time(19, 0), True),
    ("19:00-07:00", time(23, 59), True),
    ("19:00-07:00", time(0, 0), True),
    ("19:00-07:00", time(6, 59), True),
    ("19:00-07:00", time(7, 0), False),  # the end is exclusive
    ("19:00-07:00", time(12, 0), False),
    ("08:00-17:30", time(8, 0), True),
    ("08:00-17:30", time(17, 30), False),
    ("08:00-17:30", time(3, 0), False),
    ("00:00-00:00", time(13, 0), True),  # start == end: the whole day
])
def test_window_contains(window: str, now: time, inside: bool) -> None:
    parsed = Window.parse(window)
    assert parsed is not None and parsed.contains(now) is inside


def test_window_seconds_until_open_crosses_midnight() -> None:
    window = Window.parse("19:00-07:00")
    assert window is not None
    assert window.seconds_until_open(datetime(2026, 1, 5, 18, 30)) == 1800
    assert window.seconds_until_open(datetime(2026, 1, 5, 23, 0)) == 0
    assert window.seconds_until_open(datetime(2026, 1, 5, 7, 0)) == 12 * 3600
    early = Window.parse("02:00-04:00")
    assert early is not None and early.seconds_until_open(datetime(2026, 1, 5, 5, 0)) == 21 * 3600  # tomorrow


@pytest.mark.parametrize("bad", ["7-19", "19:00", "25:00-07:00", "19:00-07:60", "19:00 - 07:00"])
def test_window_rejects_malformed(bad: str) -> None:
    with pytest.raises(ValueError, match="HH:MM-HH:MM"):
        Window.parse(bad)
    assert Window.parse("") is None


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_rate_limiter_spaces_starts_evenly() -> None:
    clock = FakeClock()
    limiter = RateLimiter(6, clock, clock.sleep)  # 6 a minute: 10 s apart
    starts = []
    for _ in range(4):
        assert limiter.acquire()
        starts.append(clock.now)
        clock.now += 1.5  # the retrieve itself takes time: it counts towards the spacing
    assert [b - a for a, b in zip(starts, starts[1:], strict=False)] == [10.0, 10.0, 10.0]
    assert max(clock.slept) <= 0.5  # short steps, so a stop is honoured quickly


def test_rate_limiter_stops_when_asked() -> None:
    clock = FakeClock()
    limiter = RateLimiter(1, clock, clock.sleep)
    assert limiter.acquire()
    assert limiter.acquire(stop=lambda: True) is False
    with pytest.raises(ValueError):
        RateLimiter(0)


# -- chunks and statuses ----------------------------------------------------------------------------


def test_chunks_cover_the_range_without_gaps_and_halve() -> None:
    chunks = plan_chunks(Filters(since="20240101", until="20240315"), chunk_days=30)
    assert [c.key for c in chunks] == ["20240101-20240130", "20240131-20240229", "20240301-20240315"]
    halves = chunks[0].halves()
    assert halves is not None and [h.key for h in halves] == ["20240101-20240115", "20240116-20240130"]
    assert Chunk(date(2024, 1, 1), date(2024, 1, 1)).halves() is None  # one day cannot be split
    assert Chunk(date(2024, 1, 1), date(2024, 1, 1)).date_range() == "20240101"


def test_patient_chunks_are_one_query_each() -> None:
    filters = Filters(since="20200101", until="20241231", patients=(("P1", ""), ("P2", "HOSP")))
    keys = [c.key for c in plan_chunks(filters, chunk_days=30)]
    assert [k.split("|")[0] for k in keys] == ["20200101-20241231", "20200101-20241231"]
    assert len(set(keys)) == 2 and not any("P1" in k or "HOSP" in k for k in keys)  # patients hashed
    open_range = plan_chunks(Filters(patients=(("P1", ""),)), 30, today=date(2026, 1, 1))
    assert [c.date_range() for c in open_range] == [""]  # no date restriction at all


def _status(code: int, completed: int = 0, failed: int = 0) -> Dataset:
    ds = Dataset()
    ds.Status = code
    ds.NumberOfCompletedSuboperations = completed
    ds.NumberOfFailedSuboperations = failed
    return ds


@pytest.mark.parametrize(("code", "outcome"), [
    (0x0000, Outcome.SUCCESS),
    (0xB000, Outcome.TRANSIENT),  # some sub-operations failed: fetch again later
    (0xA701, Outcome.TRANSIENT),  # out of resources
    (0xA702, Outcome.TRANSIENT),
    (0xC000, Outcome.TRANSIENT),  # unable to process: often a PACS fetching from its long-term archive
    (0xA900, Outcome.PERMANENT),  # identifier does not match SOP class
    (0x0122, Outcome.PERMANENT),
])
def test_retrieve_statuses(code: int, outcome: Outcome) -> None:
    assert judge(_status(code), 0, 0).outcome is outcome
    assert judge(None, 0, 0).outcome is Outcome.TRANSIENT  # no answer: timeout or abort


def test_unknown_move_destination_stops_the_run() -> None:
    with pytest.raises(MoveDestinationUnknown):
        judge(_status(0xA801), 0, 0)


def test_filters_match_body_parts_as_sites_write_them() -> None:
    filters = Filters(body_parts=("KNEE", "SPINE"), modalities=("CR", "DX"))
    assert filters.body_part_fits("LSPINE") and filters.body_part_fits("L-SPINE") and filters.body_part_fits("knee")
    assert not filters.body_part_fits("CHEST") and not filters.body_part_fits("")
    assert filters.modality_fits("dx") and not filters.modality_fits("CT")


# -- patients file and config ------------------------------------------------------------------------


def test_patients_file(tmp_path: Path) -> None:
    path = tmp_path / "p.txt"
    path.write_text("patient_id,issuer\nP1\nP2, HOSP\n\n# comment\nP1\n", encoding="utf-8")
    assert read_patients(path) == (("P1", ""), ("P2", "HOSP"))
    path.write_text("P*\n")
    with pytest.raises(UsageError, match="not a PatientID"):
        read_patients(path)
    path.write_text("# nobody\n")
    with pytest.raises(UsageError, match="lists no PatientID"):
        read_patients(path)


def test_backfill_section_and_environment(tmp_path: Path) -> None:
    config = tmp_path / "osteogate.toml"
    config.write_text('[backfill]\nsource = "PACS@pacs:104"\nwindow = "19:00-07:00"\nsince = "2024-01-01"\n'
                      'body_parts = ["knee", "spine"]\n')
    settings = load_settings(config, environ={"OSTEOGATE_BACKFILL_RATE_PER_MINUTE": "3",
                                              "OSTEOGATE_BACKFILL_DELIVER": "true"})
    cfg = settings.backfill
    assert (cfg.source, cfg.window, cfg.since, cfg.body_parts) == ("PACS@pacs:104", "19:00-07:00", "20240101",
                                                                   ["KNEE", "SPINE"])
    assert cfg.rate_per_minute == 3 and cfg.deliver is True
    config.write_text('[backfill]\nwindow = "7pm-7am"\nrate_per_minute = 0\n')
    with pytest.raises(ConfigError) as caught:
        load_settings(config, environ={})
    assert any("backfill.window" in p for p in caught.value.problems)
    assert any("backfill.rate_per_minute" in p for p in caught.value.problems)


def test_backfill_command_line_errors_are_one_line(tmp_path: Path) -> None:
    for args, words in ((["--window", "7pm"], "HH:MM-HH:MM"), (["--rate", "fast"], "is not a rate"),
                        (["--since", "last year"], "YYYYMMDD")):
        result = subprocess.run([sys.executable, "-m", "osteogate.gateway.operate.cli", "backfill", *args],
                                cwd=REPO, capture_output=True, text=True, timeout=60)
        assert result.returncode == 64 and words in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("source", ["PACS@127.0.0.1:{port}", "http://127.0.0.1:{port}/dicom-web"], ids=["dimse", "dicomweb"])
def test_a_pacs_that_is_not_there_is_one_line_and_exit_69(tmp_path: Path, source: str) -> None:
    _db(tmp_path).dispose()  # a gateway's store
    port = free_port()  # nothing listens: connection refused at once
    result = subprocess.run([sys.executable, "-m", "osteogate.gateway.operate.cli", "backfill", "--from",
                             source.format(port=port), "--dry-run", "--data-dir", str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 69, result.stderr
    last = result.stderr.strip().splitlines()[-1]  # after the progress line
    assert last.startswith("osteogate: backfill query to") and "Traceback" not in result.stderr, result.stderr
    assert "bug" not in last and "connection refused" in last and "nothing listens there" in last, last


# -- the store --------------------------------------------------------------------------------------


def _db(tmp_path: Path) -> Database:
    db = Database(f"sqlite:///{tmp_path / 'osteogate.db'}")
    db.migrate()
    return db


def test_withheld_delivery_marker(tmp_path: Path) -> None:
    db = _db(tmp_path)
    with db.session() as session:
        session.add(BackfillStudy(study_uid="1.2.3", study_key="k", source="PACS@h:1", state=BackfillState.RECEIVED))
        session.add(BackfillStudy(study_uid="1.2.4", study_key="k2", source="PACS@h:1", state=BackfillState.FOUND))
    with db.session() as session:
        # Only a study the backfill fetched: one merely found may still arrive live, and is delivered.
        assert is_backfilled(session, "1.2.3") and not is_backfilled(session, "1.2.4")
        assert not is_backfilled(session, "9.9")
    db.dispose()


# -- the case-finding list ---------------------------------------------------------------------------


def _screened(db: Database, reports: Path, patient: str, day: str, label: str | None, t_score: float | None,
              accession: str, issuer: str = "") -> str:
    """A screened study as the worker leaves it: rows in SQL and its SR header under reports/."""
    study_uid = generate_uid()
    header = make_dataset(study_uid=study_uid, PatientID=patient, StudyDate=day, AccessionNumber=accession,
                          IssuerOfPatientID=issuer or None)
    sr_path = f"{study_uid}/sr.dcm"
    write_dataset(header, reports / sr_path)
    with db.session() as session:
        study = Study(study_uid=study_uid, study_key=study_uid[-16:], status=StudyStatus.DONE, study_date=day)
        session.add(study)
        session.flush()
        job = Job(study_id=study.id, study_version=1, status=JobStatus.DONE)
        session.add(job)
        session.flush()
        session.add(StudyResult(study_id=study.id, job_id=job.id, version=1, status=StudyStatus.DONE, region="knee",
                                assessed=label is not None, label=label, t_score=t_score,
                                t_score_low=None if t_score is None else t_score - 0.8,
                                t_score_high=None if t_score is None else t_score + 0.8,
                                reason=None if label else "outside the validated population",
                                model_name="m", model_version="1", model_sha256="0" * 64, backend="onnx", timings={},
                                sr_path=sr_path))
    return study_uid


def _cases(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "osteogate.gateway.operate.cli", "cases", "--data-dir", str(data_dir),
                           *args], cwd=REPO, capture_output=True, text=True, timeout=60)


def test_cases_one_row_a_patient_lowest_t_score_first(tmp_path: Path) -> None:
    db = _db(tmp_path)
    reports = tmp_path / "reports"
    _screened(db, reports, "P1", "20230105", "osteopenia", -1.4, "ACC1")  # older study of P1: replaced
    _screened(db, reports, "P1", "20240105", "osteoporosis", -2.9, "ACC2")
    _screened(db, reports, "P2", "20240210", "normal", 0.3, "ACC3", issuer="HOSP")
    _screened(db, reports, "P3", "20240301", None, None, "ACC4")  # not assessed: last
    _screened(db, reports, "P4", "20220301", "osteopenia", -1.8, "ACC5")
    db.dispose()

    listed = _cases(tmp_path, "--json")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [(r["patient_id"], r["accession_number"], r["decision"]) for r in rows] == [
        ("P1", "ACC2", "DXA referral suggested"), ("P4", "ACC5", "DXA referral suggested"),
        ("P2", "ACC3", "below the referral threshold"), ("P3", "ACC4", "not assessed")]
    assert rows[0]["t_score"] == -2.9 and rows[0]["t_score_low"] == pytest.approx(-3.7)
    assert rows[2]["issuer_of_patient_id"] == "HOSP"
    assert all(r["dxa_on_record"] == "no" for r in rows)  # the DXA table is there, empty
    assert "wrote 4 row(s) as JSON" in listed.stderr
    # Minimal PHI: no name, no birth date.
    assert "Patient^" not in listed.stdout and "PatientName" not in listed.stdout

    referral_csv = tmp_path / "out" / "cases.csv"
    referral_csv.parent.mkdir()
    only = _cases(tmp_path, "--decision", "referral", "--since", "2023-01-01", "--csv", str(referral_csv))
    assert only.returncode == 0 and f"wrote 1 row(s) to {referral_csv}" in only.stderr, only.stderr
    lines = referral_csv.read_text().splitlines()
    assert lines[0].startswith("patient_id,issuer_of_patient_id,study_date") and lines[1].startswith("P1,,20240105")

    # A store without the ground-truth table (made before it existed): DXA unknown, and the filter
    # that needs it refused in one line.
    db = Database(f"sqlite:///{tmp_path / 'osteogate.db'}")
    with db.engine.begin() as connection:
        connection.execute(text("DROP TABLE dxa_sites"))
        connection.execute(text("DROP TABLE dxa_exams"))
    db.dispose()
    unknown = _cases(tmp_path, "--json")
    assert {r["dxa_on_record"] for r in json.loads(unknown.stdout)} == {"unknown"}
    assert "no DXA table" in unknown.stderr
    refused = _cases(tmp_path, "--without-dxa-since", "2023-01-01")
    assert refused.returncode == 64 and "no dxa_exams table" in refused.stderr, refused.stderr

    table = _cases(tmp_path)
    assert table.returncode == 0 and "DXA referral suggested" in table.stdout and "wrote 4 row(s)" in table.stderr


def test_cases_with_dxa_on_record(tmp_path: Path) -> None:
    db = _db(tmp_path)
    reports = tmp_path / "reports"
    _screened(db, reports, "P1", "20240105", "osteoporosis", -2.9, "ACC1")
    _screened(db, reports, "P2", "20240210", "osteopenia", -1.6, "ACC2", issuer="HOSP")
    _screened(db, reports, "P3", "20240301", "osteopenia", -1.2, "ACC3", issuer="HOSP")
    from osteogate.gateway.store.dxa import DxaExam

    with db.session() as session:
        for n, (patient, issuer, day, t_score) in enumerate([("P1", None, date(2022, 1, 10), -2.6),
                                                             ("P2", "HOSP", date(2024, 3, 1), -1.7),
                                                             ("P3", "OTHER", date(2024, 1, 1), -1.0)]):
            session.add(DxaExam(exam_key=f"k{n}", patient_id=patient, issuer_of_patient_id=issuer, dxa_date=day,
                                source="csv", source_ref=f"test.csv:{n}", lowest_t_score=t_score,
                                who_category="osteopenia"))
    db.dispose()
    rows = json.loads(_cases(tmp_path, "--json").stdout)
    assert [(r["patient_id"], r["dxa_on_record"], r["last_dxa_date"]) for r in rows] == [
        ("P1", "yes", "20220110"), ("P2", "yes", "20240301"), ("P3", "no", "")]  # P3's DXA: another issuer
    due = json.loads(_cases(tmp_path, "--json", "--without-dxa-since", "2023-01-01").stdout)
    assert [r["patient_id"] for r in due] == ["P1", "P3"]


# -- the engine on a fake clock ------------------------------------------------------------------------


class _Archive:
    """A Source with two studies whose retrieves always succeed; records when each was fetched."""

    name = "FAKE@127.0.0.1:1"

    def __init__(self, clock: _WallClock) -> None:
        self.clock = clock
        self.fetched: list[tuple[str, datetime]] = []

    def studies(self, chunk: object, on_capped: object) -> list[object]:
        from osteogate.gateway.backfill.query import FoundStudy

        return [FoundStudy("1.2.840.99.1", "20240101", ("DX",)), FoundStudy("1.2.840.99.2", "20240102", ("CR",))]

    def retrieve(self, study_uid: str, series_uids: object) -> object:
        from osteogate.gateway.backfill.retrieve import Retrieved

        self.fetched.append((study_uid, self.clock.wall()))
        return Retrieved(Outcome.SUCCESS, "0x0000 (Success)", 1, 0)


class _WallClock:
    def __init__(self, start: datetime) -> None:
        self.start = start
        self.elapsed = 0.0
        self.on_sleep: list[object] = []

    def wall(self) -> datetime:
        from datetime import timedelta

        return self.start + timedelta(seconds=self.elapsed)

    def monotonic(self) -> float:
        return self.elapsed

    def sleep(self, seconds: float) -> None:
        self.elapsed += seconds
        for hook in self.on_sleep:
            hook()  # type: ignore[operator]


def _engine(tmp_path: Path, clock: _WallClock, **options: object) -> tuple[object, _Archive, Database]:
    from osteogate.gateway.backfill.engine import Backfill, Options
    from osteogate.gateway.backfill.ledger import Ledger

    db = _db(tmp_path)
    archive = _Archive(clock)
    engine = Backfill(Ledger(db, None), archive, {"since": "20240101"}, [Chunk(date(2024, 1, 1), date(2024, 1, 31))],
                      Options(screen_wait_seconds=0, **options), now=clock.wall, monotonic=clock.monotonic,  # type: ignore[arg-type]
                      sleep=clock.sleep)
    return engine, archive, db


def test_engine_waits_for_the_window_that_crosses_midnight(tmp_path: Path) -> None:
    clock = _WallClock(datetime(2026, 1, 5, 17, 0))  # 17:00: two hours before the window opens
    engine, archive, db = _engine(tmp_path, clock, window=Window.parse("19:00-07:00"), rate_per_minute=60)
    progress = engine.run()  # type: ignore[attr-defined]
    assert [uid for uid, _ in archive.fetched] == ["1.2.840.99.1", "1.2.840.99.2"]
    first, second = (when for _, when in archive.fetched)
    assert first.time() >= time(19, 0) and (first - datetime(2026, 1, 5, 19, 0)).total_seconds() < 61
    assert (second - first).total_seconds() >= 1.0  # 60 a minute
    assert progress.counts.retrieved == 2
    db.dispose()


def test_engine_stops_retrieving_at_the_window_end_and_pauses_for_the_queue(tmp_path: Path) -> None:
    clock = _WallClock(datetime(2026, 1, 5, 6, 59, 30))  # 30 s before the window closes
    engine, archive, db = _engine(tmp_path, clock, window=Window.parse("19:00-07:00"), rate_per_minute=1, max_queue=1)
    # The gateway is busy: two jobs pending, more than max_queue; they finish after 5 minutes.
    with db.session() as session:
        study = Study(study_uid="9.9", study_key="k", status=StudyStatus.QUEUED)
        session.add(study)
        session.flush()
        session.add_all([Job(study_id=study.id, study_version=1, status=JobStatus.PENDING) for _ in range(2)])

    def drain() -> None:
        if clock.elapsed >= 300:
            with db.session() as session:
                for job in session.query(Job).filter(Job.status == JobStatus.PENDING):
                    job.status = JobStatus.DONE
    clock.on_sleep.append(drain)
    engine.run()  # type: ignore[attr-defined]
    whens = [when for _, when in archive.fetched]
    # Nothing while the queue was long (06:59:30 + 5 min is past 07:00: the window had closed),
    # then nothing until it opened again at 19:00.
    assert len(whens) == 2 and all(w.time() >= time(19, 0) for w in whens), whens
    assert (whens[1] - whens[0]).total_seconds() >= 60  # 1 a minute
    db.dispose()


def test_a_study_screened_by_another_model_is_replayed_not_fetched(tmp_path: Path) -> None:
    from osteogate.gateway.backfill.ledger import Ledger
    from osteogate.gateway.backfill.query import FoundStudy

    db = _db(tmp_path)
    uid = _screened(db, tmp_path / "reports", "P1", "20240105", "osteopenia", -1.4, "ACC1")  # model "000..."
    current = Ledger(db, "1" * 64)
    run_id, resumed = current.start_run("PACS@h:1", {})
    assert not resumed
    assert current.record_found(run_id, "PACS@h:1", FoundStudy(uid, "20240105", ("DX",))) == "replay"
    with db.session() as session:
        jobs = session.query(Job).filter(Job.reason == "replay", Job.status == JobStatus.PENDING).count()
        row = session.query(BackfillStudy).filter(BackfillStudy.study_uid == uid).one()
        assert jobs == 1 and row.state == BackfillState.RECEIVED and row.retrieved_at is None
    # The same model: already screened, nothing written.
    same = Ledger(db, "0" * 64)
    assert same.judge_found(uid) == "screened"
    assert current.start_run("PACS@h:1", {}) == (run_id, True)  # unfinished: resumed
    db.dispose()


def test_a_hold_is_alive_while_its_process_is() -> None:
    import os
    import socket

    from osteogate.gateway.backfill.ledger import holder_alive

    here = socket.gethostname()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    assert holder_alive(f"{os.getppid()}@{here}")  # a live process on this host
    assert not holder_alive(f"{int(dead.stdout)}@{here}")  # exited: taken over at once
    assert holder_alive(f"{int(dead.stdout)}@another-host")  # elsewhere: until the hold expires
