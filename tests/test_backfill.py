"""Archive backfill against a real PACS: Orthanc holds studies of several dates, modalities and
body parts (and caps its C-FIND answers at 2, as production PACS cap theirs); the gateway runs as
a real process registered as Orthanc's C-MOVE destination; `osteogate backfill` runs as a real
command (so it can be SIGKILLed)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select

from tests.gateway_harness import REPO, GatewayProcess
from tests.helpers import (
    OrthancServer,
    dicomweb_plugin,
    free_port,
    make_dataset,
    orthanc_binary,
    wait_until,
    write_dataset,
)

pytestmark = pytest.mark.orthanc

# (label, modality, body part, study date, patient): which the filters below keep is the point.
STUDIES = [
    ("knee_2024", "DX", "KNEE", "20240115", "P1"),
    ("spine_2024", "CR", "LSPINE", "20240320", "P2"),
    ("chest_2024", "DX", "CHEST", "20240210", "P3"),
    ("ct_2024", "CT", "KNEE", "20240301", "P1"),
    ("knee_2023", "DX", "KNEE", "20230601", "P1"),
    ("knee_2024b", "DX", "KNEE", "20240405", "P4"),
]
MATCHING = {"knee_2024", "spine_2024", "knee_2024b"}  # 2024, CR/DX, knee or spine
FIND_LIMIT = 2


def _rest(orthanc: OrthancServer, method: str, path: str, body: Any = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(orthanc.http_url + path, data=data, method=method)
    with urllib.request.urlopen(request, timeout=60) as response:
        text = response.read()
    return json.loads(text) if text else None


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[OrthancServer, dict[str, str]]]:
    """Orthanc with the studies above; C-FIND answers capped at FIND_LIMIT."""
    if orthanc_binary() is None:
        pytest.skip("Orthanc not installed")
    workdir = tmp_path_factory.mktemp("archive")
    server = OrthancServer(workdir / "orthanc", dicomweb=dicomweb_plugin() is not None)
    base = server.config
    server.config = lambda: {**base(), "LimitFindResults": FIND_LIMIT}  # type: ignore[method-assign]
    server.start()
    uids: dict[str, str] = {}
    try:
        for label, modality, body_part, day, patient in STUDIES:
            uid = uids[label] = generate_uid()
            extra = {"SOPClassUID": "1.2.840.10008.5.1.4.1.1.2"} if modality == "CT" else {}
            ds = make_dataset(study_uid=uid, modality=modality, body_part=body_part, StudyDate=day,
                              SeriesDate=day, PatientID=patient, **extra)
            server.upload(write_dataset(ds, workdir / f"{label}.dcm"))
        yield server, uids
    finally:
        server.stop()


def _register(orthanc: OrthancServer, gw: GatewayProcess) -> None:
    _rest(orthanc, "PUT", "/modalities/osteogate", {"AET": gw.ae_title, "Host": "127.0.0.1", "Port": gw.port})


def _backfill(gw: GatewayProcess, orthanc: OrthancServer, *args: str, model: Path,
              popen: bool = False, source: str | None = None) -> Any:
    """`osteogate backfill` against the gateway's store; its calling AE is the gateway's own (Orthanc
    answers C-FIND only to AE titles it knows)."""
    cmd = [sys.executable, "-m", "osteogate.gateway.operate.cli", "backfill", "--data-dir", str(gw.data_dir),
           "--from", source or f"{orthanc.ae_title}@127.0.0.1:{orthanc.port}", *args]
    env = {k: v for k, v in os.environ.items() if not k.startswith("OSTEOGATE_")}
    env.update({"OSTEOGATE_DICOM_AE_TITLE": gw.ae_title, "OSTEOGATE_DICOM_PORT": str(gw.port),
                "OSTEOGATE_MODEL_PATH": str(model), "OSTEOGATE_BACKFILL_FIND_LIMIT": str(FIND_LIMIT),
                "PYTHONUNBUFFERED": "1"})
    if popen:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _received(gw: GatewayProcess) -> dict[str, Any]:
    """study_uid -> (first received at, instances, version) straight from the gateway's SQL."""
    from osteogate.gateway.store.db import Database, Study

    db = Database(f"sqlite:///{gw.data_dir / 'osteogate.db'}")
    try:
        with db.session() as session:
            return {uid: (first, count, version) for uid, first, count, version in session.execute(
                select(Study.study_uid, Study.first_received_at, Study.instance_count, Study.version))}
    finally:
        db.dispose()


def _attempts(gw: GatewayProcess) -> dict[str, Any]:
    """study_uid -> when its (latest) retrieve started, from the backfill's own rows."""
    from osteogate.gateway.store.backfill import BackfillStudy
    from osteogate.gateway.store.db import Database

    db = Database(f"sqlite:///{gw.data_dir / 'osteogate.db'}")
    try:
        with db.session() as session:
            return dict(session.execute(select(BackfillStudy.study_uid, BackfillStudy.last_attempt_at)
                                        .where(BackfillStudy.last_attempt_at.is_not(None))).all())
    finally:
        db.dispose()


def _screened(gw: GatewayProcess, uids: set[str]) -> list[dict[str, Any]]:
    rows = [r for r in gw.studies() if r["study_uid"] in uids]
    return rows if len(rows) == len(uids) and all(r["status"] in ("done", "skipped") for r in rows) else []


FILTERS = ("--since", "2024-01-01", "--until", "2024-12-31", "--modality", "CR,DX", "--body-part", "KNEE,SPINE")


def test_backfill_retrieves_exactly_the_matching_studies_at_the_rate_and_a_second_run_nothing(
        tmp_path: Path, archive: tuple[OrthancServer, dict[str, str]], tiny_model: Path) -> None:
    orthanc, uids = archive
    wanted = {uids[label] for label in MATCHING}
    http_port = free_port()
    with GatewayProcess(tmp_path / "gw", model=tiny_model,
                        destinations=[f"{orthanc.ae_title}@127.0.0.1:{orthanc.port}"],
                        env={"OSTEOGATE_HTTP_ENABLED": "true", "OSTEOGATE_HTTP_PORT": str(http_port)}) as gw:
        _register(orthanc, gw)
        dry = _backfill(gw, orthanc, *FILTERS, "--dry-run", model=tiny_model)
        assert dry.returncode == 0, dry.stderr
        assert "4 studies match; 3 would be retrieved" in dry.stdout, dry.stdout
        assert _received(gw) == {}  # a dry run fetches nothing

        first = _backfill(gw, orthanc, *FILTERS, "--rate", "30", model=tiny_model)
        assert first.returncode == 0, first.stderr + first.stdout
        assert "4 found, 3 retrieved, 3 screened, 1 skipped, 0 failed" in first.stdout, first.stdout
        # The progress line (stderr; printed, not redrawn, when not on a terminal).
        assert re.search(r"found \d+ · retrieved \d+ · screened \d+ · skipped \d+ · failed 0 · [\d.]+/min · ETA ",
                         first.stderr), first.stderr
        assert "· done" in first.stderr.strip().splitlines()[-1]  # the final figures, always
        assert set(_received(gw)) == wanted  # not the chest, the CT, nor 2023
        starts = sorted(_attempts(gw).values())
        gaps = [(b - a).total_seconds() for a, b in zip(starts, starts[1:], strict=False)]
        assert len(gaps) == 2 and all(gap >= 1.95 for gap in gaps), gaps  # 30 a minute: 2 s apart
        rows = wait_until(lambda: _screened(gw, wanted), 60)
        # backfill.deliver is false by default: the results stay in SQL, nothing goes to the PACS.
        assert all(r["delivered"] in (None, "0/0") for r in rows), rows
        # The gateway's /metrics shows the backfill's figures (read from SQL, whoever runs it).
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10).read().decode()
        assert 'osteogate_backfill_studies{state="screened"} 3.0' in metrics
        assert 'osteogate_backfill_studies{state="skipped"} 1.0' in metrics
        assert "osteogate_backfill_rate_per_minute" in metrics and "osteogate_backfill_eta_seconds 0.0" in metrics
        # The case-finding list: one row a patient of the three screened studies.
        cases = json.loads(gw.cli("cases", "--json").stdout)
        assert sorted(r["patient_id"] for r in cases) == ["P1", "P2", "P4"]

        second = _backfill(gw, orthanc, *FILTERS, model=tiny_model)
        assert second.returncode == 0, second.stderr
        assert "4 found, 0 retrieved, 0 screened, 4 skipped, 0 failed" in second.stdout, second.stdout
        assert {uid: v[1:] for uid, v in _received(gw).items()} == {uid: (1, 1) for uid in wanted}


def test_sigkill_mid_run_resumes_without_duplicates(tmp_path: Path, archive: tuple[OrthancServer, dict[str, str]],
                                                    tiny_model: Path) -> None:
    orthanc, uids = archive
    wanted = {uids[label] for label in MATCHING}
    with GatewayProcess(tmp_path / "gw", model=tiny_model) as gw:
        _register(orthanc, gw)
        proc = _backfill(gw, orthanc, *FILTERS, "--rate", "12", model=tiny_model, popen=True)
        try:
            wait_until(lambda: len(_received(gw)) >= 1, 60)
            # One backfill at a time: a second one while the first runs is refused, changing nothing.
            second = _backfill(gw, orthanc, *FILTERS, model=tiny_model)
            assert second.returncode == 75 and "another backfill is running" in second.stderr, second.stderr
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.communicate(timeout=10)
        assert len(_received(gw)) < 3
        again = _backfill(gw, orthanc, *FILTERS, "--rate", "60", model=tiny_model)
        assert again.returncode == 0, again.stderr + again.stdout
        assert "0 failed" in again.stdout and "screened" in again.stdout, again.stdout
        assert set(_received(gw)) == wanted
        rows = wait_until(lambda: _screened(gw, wanted), 60)
        assert all(r["version"] == 1 and r["sr_versions"] <= 1 for r in rows), rows


def test_patients_file_with_c_get_skips_a_study_already_screened(
        tmp_path: Path, archive: tuple[OrthancServer, dict[str, str]], tiny_model: Path) -> None:
    orthanc, uids = archive
    with GatewayProcess(tmp_path / "gw", model=tiny_model) as gw:
        _register(orthanc, gw)
        # P1's 2024 knee came in live (a modality sent it) and was screened before the backfill.
        live = make_dataset(study_uid=uids["knee_2024"], modality="DX", body_part="KNEE", StudyDate="20240115",
                            PatientID="P1")
        sent = subprocess.run([sys.executable, "-m", "osteogate.gateway.operate.cli", "send",
                               str(write_dataset(live, tmp_path / "live.dcm")), "--to", gw.address],
                              cwd=REPO, capture_output=True, text=True, timeout=60)
        assert sent.returncode == 0, sent.stderr
        wait_until(lambda: _screened(gw, {uids["knee_2024"]}), 60)
        patients = tmp_path / "patients.txt"
        patients.write_text("patient_id\nP1\nP4\n# P2 is not on the list\n")
        result = _backfill(gw, orthanc, "--patients", str(patients), "--body-part", "KNEE", "--retrieve", "get",
                           "--rate", "60", model=tiny_model)
        assert result.returncode == 0, result.stderr + result.stdout
        # P1: 2024 knee (screened: skipped), 2023 knee (fetched), CT (not CR/DX); P4: 2024 knee.
        assert "3 found, 2 retrieved, 2 screened, 1 skipped, 0 failed" in result.stdout, result.stdout
        assert set(_received(gw)) == {uids["knee_2024"], uids["knee_2023"], uids["knee_2024b"]}


def test_pacs_refusing_the_move_destination_is_one_clear_line(
        tmp_path: Path, archive: tuple[OrthancServer, dict[str, str]], tiny_model: Path) -> None:
    orthanc, _ = archive
    gw = GatewayProcess(tmp_path / "gw", model=tiny_model, ae_title="UNKNOWNGW")  # never registered, never started
    subprocess.run([sys.executable, "-m", "osteogate.gateway.operate.cli", "db", "upgrade", "--data-dir",
                    str(gw.data_dir)], cwd=REPO, check=True, capture_output=True)
    # Orthanc knows the backfill as a Q/R client (it may query), not the gateway as a destination.
    _rest(orthanc, "PUT", "/modalities/backfill", {"AET": "BACKFILL", "Host": "127.0.0.1", "Port": 1})
    result = _backfill(gw, orthanc, *FILTERS, "--calling-aet", "BACKFILL", model=tiny_model)
    assert result.returncode == 69, result.stderr + result.stdout
    [line] = result.stderr.strip().splitlines()[-1:]
    assert "refused to send to UNKNOWNGW" in line and "Register OsteoGate in the PACS" in line, result.stderr
    assert "Traceback" not in result.stderr
    # Nothing was given up on: once registered, the same command continues.
    from osteogate.gateway.store.backfill import BackfillStudy
    from osteogate.gateway.store.db import Database

    db = Database(f"sqlite:///{gw.data_dir / 'osteogate.db'}")
    with db.session() as session:
        states = [s.value for s in session.execute(select(BackfillStudy.state)).scalars()]
    db.dispose()
    assert sorted(states) == ["found", "found", "found", "skipped"]  # the chest: no knee or spine series


def test_dicomweb_source_qido_and_wado(tmp_path: Path, archive: tuple[OrthancServer, dict[str, str]],
                                       tiny_model: Path) -> None:
    orthanc, uids = archive
    if not orthanc.dicomweb:
        pytest.skip("the Orthanc DICOMweb plugin (orthanc-dicomweb) is not installed")
    wanted = {uids[label] for label in MATCHING}
    with GatewayProcess(tmp_path / "gw", model=tiny_model) as gw:
        # No C-MOVE registration needed: WADO-RS brings the studies here, the backfill stores them.
        result = _backfill(gw, orthanc, *FILTERS, "--rate", "120", model=tiny_model,
                           source=f"{orthanc.http_url}/dicom-web")
        assert result.returncode == 0, result.stderr + result.stdout
        assert "4 found, 3 retrieved, 3 screened, 1 skipped, 0 failed" in result.stdout, result.stdout
        assert set(_received(gw)) == wanted


def test_scheduled_backfill_inside_serve(tmp_path: Path, archive: tuple[OrthancServer, dict[str, str]],
                                         tiny_model: Path) -> None:
    orthanc, uids = archive
    wanted = {uids[label] for label in MATCHING}
    port = free_port()
    env = {"OSTEOGATE_BACKFILL_ENABLED": "true", "OSTEOGATE_BACKFILL_SOURCE": f"{orthanc.ae_title}@127.0.0.1:{orthanc.port}",
           "OSTEOGATE_BACKFILL_SINCE": "20240101", "OSTEOGATE_BACKFILL_UNTIL": "20241231",
           "OSTEOGATE_BACKFILL_BODY_PARTS": "KNEE,SPINE", "OSTEOGATE_BACKFILL_FIND_LIMIT": str(FIND_LIMIT),
           "OSTEOGATE_BACKFILL_RATE_PER_MINUTE": "120", "OSTEOGATE_BACKFILL_SCREEN_WAIT_SECONDS": "0"}
    # Registered before the gateway starts: its scheduled run begins at start.
    _rest(orthanc, "PUT", "/modalities/osteogate", {"AET": "OSTEOGATE", "Host": "127.0.0.1", "Port": port})
    with GatewayProcess(tmp_path / "gw", model=tiny_model, port=port, env=env) as gw:
        wait_until(lambda: _screened(gw, wanted), 120)
        assert set(_received(gw)) == wanted
        assert gw.stop() == 0  # a clean stop, with the scheduled job in place


def test_dicomweb_source_with_basic_authentication(tmp_path: Path) -> None:
    """An archive behind HTTP basic authentication: the password comes from the environment
    variable named in backfill.source_password_env; a wrong one is a clear line, not a traceback."""
    if orthanc_binary() is None or dicomweb_plugin() is None:
        pytest.skip("Orthanc with its DICOMweb plugin is not installed")
    with OrthancServer(tmp_path / "orthanc", dicomweb=True, users={"osteogate": "s3cret"}) as orthanc:
        orthanc.upload(write_dataset(make_dataset(StudyDate="20240301"), tmp_path / "one.dcm"))
        subprocess.run([sys.executable, "-m", "osteogate.gateway.operate.cli", "db", "upgrade", "--data-dir",
                        str(tmp_path / "gw")], cwd=REPO, check=True, capture_output=True)
        base = [sys.executable, "-m", "osteogate.gateway.operate.cli", "backfill", "--data-dir", str(tmp_path / "gw"),
                "--from", f"{orthanc.http_url}/dicom-web", "--since", "2024-01-01", "--until", "2024-12-31", "--dry-run"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("OSTEOGATE_")}
        env.update({"OSTEOGATE_BACKFILL_SOURCE_USERNAME": "osteogate",
                    "OSTEOGATE_BACKFILL_SOURCE_PASSWORD_ENV": "ARCHIVE_PASSWORD"})
        good = subprocess.run(base, cwd=REPO, env={**env, "ARCHIVE_PASSWORD": "s3cret"}, capture_output=True,
                              text=True, timeout=120)
        assert good.returncode == 0 and "1 studies match; 1 would be retrieved" in good.stdout, good.stderr
        bad = subprocess.run(base, cwd=REPO, env={**env, "ARCHIVE_PASSWORD": "wrong"}, capture_output=True,
                             text=True, timeout=120)
        assert bad.returncode == 69 and "401" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
        unset = subprocess.run(base, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert unset.returncode == 78 and "ARCHIVE_PASSWORD" in unset.stderr, unset.stderr
