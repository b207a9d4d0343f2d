"""End to end on loopback: dcmtk storescu (modality) -> osteogate serve -> dcmtk storescp (PACS).

The gateway runs as a real subprocess with a real SQLite file (or PostgreSQL), a real spool and a
real model forward pass (a small untrained checkpoint made once per session).
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation, Verification

from tests.gateway_harness import GatewayProcess
from tests.helpers import (
    StoreSCP,
    dcmtk_available,
    echoscu,
    free_port,
    make_dataset,
    sample_files,
    storescu,
    wait_until,
    write_dataset,
)

pytestmark = pytest.mark.skipif(not dcmtk_available("storescu", "storescp", "dsrdump"), reason="dcmtk missing")

SR_PATTERN = "SR*.dcm"
CARD_PATTERN = "SC*.dcm"  # storescp names files by SOP class: SC = Secondary Capture


def source_studies(files: list[Path]) -> set[str]:
    return {str(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID) for f in files}


def sr_files(pacs: StoreSCP) -> list[Path]:
    return sorted(pacs.dir.glob(SR_PATTERN))


@pytest.fixture
def pacs(dcmtk_pacs: StoreSCP) -> StoreSCP:
    return dcmtk_pacs


def _run_full_path(tmp_path: Path, pacs: StoreSCP, model: Path, database_url: str | None = None) -> None:
    files = sample_files()
    chest = [f for f in files if "chest" in f.name]
    assert chest, "sample_dicom must hold an out-of-scope chest image"
    chest_study = source_studies(chest).pop()
    in_scope = source_studies(files) - {chest_study}
    with GatewayProcess(tmp_path / "gw", model=model, destinations=[f"PACS@127.0.0.1:{pacs.port}"],
                        database_url=database_url) as gateway:
        result = storescu(files, "127.0.0.1", gateway.port, "OSTEOGATE")
        assert result.returncode == 0, result.stdout + result.stderr
        received = pacs.wait_for_files(SR_PATTERN, count=len(in_scope), timeout=120)
        cards = pacs.wait_for_files(CARD_PATTERN, count=len(in_scope), timeout=60)

        def all_finished() -> list[dict]:
            rows = gateway.studies()
            return rows if len(rows) == len(in_scope) + 1 and all(
                r["status"] in ("done", "skipped") for r in rows) else []

        listing = wait_until(all_finished, 60)
        show_chest = gateway.cli("show", chest_study).stdout

    by_study = {str(pydicom.dcmread(p).StudyInstanceUID): p for p in received}
    # Every in-scope study got exactly one SR, in the source study itself.
    assert set(by_study) == in_scope
    statuses = {row["study_uid"]: row["status"] for row in listing}
    assert {statuses[uid] for uid in in_scope} == {"done"}
    # The out-of-scope chest study is recorded as skipped, with its reason, and gets no SR.
    assert statuses[chest_study] == "skipped"
    assert "skipped" in show_chest and "CHEST" in show_chest

    # Each in-scope study also got its result card (Secondary Capture), in the same study.
    assert {str(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID) for p in cards} == in_scope
    for path in [*by_study.values(), *cards]:
        if shutil.which("dciodvfy"):
            check = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=30)
            errors = [line for line in (check.stdout + check.stderr).splitlines() if line.startswith("Error")]
            assert errors == [], errors
    for path in by_study.values():
        dump = subprocess.run(["dsrdump", "+Pl", str(path)], capture_output=True, text=True, timeout=30).stdout
        assert "not a diagnosis" in dump and "not cleared for clinical use" in dump.lower()
        # The test model is untrained: the SR says so, and never gives a label or a probability.
        assert "UNTRAINED" in dump
        assert "Not assessed: " in dump
        assert "Detected" not in dump and "Probability" not in dump


def test_samples_through_gateway_to_storescp_sqlite(tmp_path: Path, pacs: StoreSCP, tiny_model: Path) -> None:
    _run_full_path(tmp_path, pacs, tiny_model)
    assert (tmp_path / "gw" / "osteogate.db").is_file()


@pytest.mark.postgres
def test_samples_through_gateway_postgres(tmp_path: Path, pacs: StoreSCP, tiny_model: Path, postgres_url: str) -> None:
    _run_full_path(tmp_path, pacs, tiny_model, database_url=postgres_url)
    assert not (tmp_path / "gw" / "osteogate.db").exists()


def test_pacs_down_at_first_then_delivered(tmp_path: Path, tiny_model: Path) -> None:
    pacs = StoreSCP(tmp_path / "pacs")  # port chosen, server not started: PACS is down
    files = [f for f in sample_files() if f.name.startswith("knee_dx")]
    with GatewayProcess(tmp_path / "gw", model=tiny_model, destinations=[f"PACS@127.0.0.1:{pacs.port}"]) as gw:
        assert storescu(files, "127.0.0.1", gw.port, "OSTEOGATE").returncode == 0

        def failed_attempt_logged() -> bool:
            return any(e.get("event") == "sr_delivery_retry" for e in gw.events())

        wait_until(failed_attempt_logged, 120)
        assert sr_files(pacs) == []
        pacs.start()  # the PACS comes back: no operator action
        try:
            received = pacs.wait_for_files(SR_PATTERN, count=1, timeout=60)
            assert len(received) == 1
            rows = gw.studies()
            assert rows[0]["delivered"] == "1/1"
        finally:
            pacs.stop()


def test_sigkill_after_ack_before_classification(tmp_path: Path, pacs: StoreSCP, tiny_model: Path) -> None:
    files = [f for f in sample_files() if f.name.startswith("knee_dx")]
    data_dir = tmp_path / "gw"
    first = GatewayProcess(data_dir, model=tiny_model, destinations=[f"PACS@127.0.0.1:{pacs.port}"],
                           stable_seconds=30).start()
    try:
        assert storescu(files, "127.0.0.1", first.port, "OSTEOGATE").returncode == 0
    finally:
        first.kill()  # acknowledged, not yet stable, so not classified
    assert sr_files(pacs) == []
    assert len(list((data_dir / "spool").rglob("*.dcm"))) == len(files)

    with GatewayProcess(data_dir, model=tiny_model, destinations=[f"PACS@127.0.0.1:{pacs.port}"],
                        stable_seconds=1, port=first.port) as second:
        pacs.wait_for_files(SR_PATTERN, count=1, timeout=120)
        time.sleep(3)  # would a duplicate follow?
        assert len(sr_files(pacs)) == 1
        rows = second.studies()
        assert len(rows) == 1 and rows[0]["status"] == "done" and rows[0]["instances"] == len(files)
        show = second.cli("show", rows[0]["study_uid"]).stdout
        assert show.count("delivery to PACS@") == 1


def _send_raw(port: int, path: Path) -> int:
    """C-STORE a file's bytes as they are (pynetdicom sends a path without decoding it)."""
    ae = AE(ae_title="FUZZER")
    ae.add_requested_context(DigitalXRayImageStorageForPresentation)
    assoc = ae.associate("127.0.0.1", port, ae_title="OSTEOGATE")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(path)
    finally:
        assoc.release()
    return int(status.Status)


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI:UserWarning")  # the test writes hostile UIDs
def test_bad_inputs_refused_and_gateway_keeps_serving(tmp_path: Path, pacs: StoreSCP, tiny_model: Path) -> None:
    work = tmp_path / "bad"
    work.mkdir()
    good = write_dataset(make_dataset(), work / "good.dcm")
    raw = good.read_bytes()
    truncated = work / "truncated.dcm"
    truncated.write_bytes(raw[: len(raw) - 3000])
    no_pixels_ds = make_dataset()
    del no_pixels_ds.PixelData
    no_pixels = write_dataset(no_pixels_ds, work / "nopixels.dcm")
    evil_ds = make_dataset()
    evil_ds.SOPInstanceUID = "1.2.3/../../../etc/evil"
    evil_ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    evil = write_dataset(evil_ds, work / "evil.dcm")

    with GatewayProcess(tmp_path / "gw", model=tiny_model, destinations=[f"PACS@127.0.0.1:{pacs.port}"]) as gw:
        statuses = {name: _send_raw(gw.port, path) for name, path in
                    [("truncated", truncated), ("nopixels", no_pixels), ("evil", evil)]}
        assert all(code in (0xA900, 0xC000) for code in statuses.values()), statuses
        # Still serving: echo works and a good image is stored and processed.
        assert echoscu("127.0.0.1", gw.port, "OSTEOGATE").returncode == 0
        assert _send_raw(gw.port, good) == 0x0000
        pacs.wait_for_files(SR_PATTERN, count=1, timeout=120)
        refused = [e for e in gw.events() if e.get("event") == "instance_refused"]
        assert len(refused) == 3
    spooled = list((tmp_path / "gw" / "spool").rglob("*.dcm"))
    assert len(spooled) == 1
    assert not any("evil" in str(p) for p in (tmp_path / "gw").rglob("*"))


def test_same_instance_twice_is_idempotent(tmp_path: Path, pacs: StoreSCP, tiny_model: Path) -> None:
    files = [f for f in sample_files() if f.name.startswith("knee_dx")]
    with GatewayProcess(tmp_path / "gw", model=tiny_model, destinations=[f"PACS@127.0.0.1:{pacs.port}"]) as gw:
        assert storescu(files, "127.0.0.1", gw.port, "OSTEOGATE").returncode == 0
        pacs.wait_for_files(SR_PATTERN, count=1, timeout=120)
        assert storescu(files, "127.0.0.1", gw.port, "OSTEOGATE").returncode == 0
        time.sleep(3)
        rows = gw.studies()
        assert len(rows) == 1 and rows[0]["instances"] == len(files) and rows[0]["status"] == "done"
        assert len(sr_files(pacs)) == 1


def test_new_instance_after_processing_sends_new_sr_version(tmp_path: Path, pacs: StoreSCP, tiny_model: Path) -> None:
    study_uid = generate_uid()
    work = tmp_path / "in"
    work.mkdir()
    first = write_dataset(make_dataset(study_uid=study_uid), work / "a.dcm")
    second = write_dataset(make_dataset(study_uid=study_uid), work / "b.dcm")
    with GatewayProcess(tmp_path / "gw", model=tiny_model, destinations=[f"PACS@127.0.0.1:{pacs.port}"]) as gw:
        assert storescu([first], "127.0.0.1", gw.port, "OSTEOGATE").returncode == 0
        pacs.wait_for_files(SR_PATTERN, count=1, timeout=120)
        assert storescu([second], "127.0.0.1", gw.port, "OSTEOGATE").returncode == 0
        srs = pacs.wait_for_files(SR_PATTERN, count=2, timeout=120)
    datasets = sorted((pydicom.dcmread(p) for p in srs), key=lambda d: int(d.InstanceNumber))
    assert [int(d.InstanceNumber) for d in datasets] == [1, 2]
    assert datasets[0].SeriesInstanceUID == datasets[1].SeriesInstanceUID
    assert datasets[0].SOPInstanceUID != datasets[1].SOPInstanceUID
    predecessor = datasets[1].PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0]
    assert predecessor.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == datasets[0].SOPInstanceUID


def test_echo_cli_and_wrong_called_aet(tmp_path: Path, tiny_model: Path) -> None:
    import sys

    with GatewayProcess(tmp_path / "gw", model=tiny_model) as gw:
        echo = subprocess.run([sys.executable, "-m", "osteogate.gateway.operate.cli", "echo", f"OSTEOGATE@127.0.0.1:{gw.port}"],
                              capture_output=True, text=True, timeout=60)
        assert echo.returncode == 0 and "0x0000" in echo.stdout
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", gw.port, ae_title="WRONGAET")
        assert assoc.is_rejected
        assert echoscu("127.0.0.1", gw.port, "OSTEOGATE").returncode == 0
    down = subprocess.run([sys.executable, "-m", "osteogate.gateway.operate.cli", "echo", f"OSTEOGATE@127.0.0.1:{free_port()}"],
                          capture_output=True, text=True, timeout=60)
    assert down.returncode == 69  # EX_UNAVAILABLE (gateway/core/errors.py)


def test_send_cli_sends_folder_untranscoded(tmp_path: Path, pacs: StoreSCP) -> None:
    import sys

    from tests.helpers import SAMPLE_DIR

    result = subprocess.run([sys.executable, "-m", "osteogate.gateway.operate.cli", "send", str(SAMPLE_DIR), "--to",
                             f"PACS@127.0.0.1:{pacs.port}"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr  # README/scripts in the folder are passed over
    sent = sample_files()
    received = pacs.wait_for_files("*.dcm", count=len(sent), timeout=60)
    by_uid = {str(pydicom.dcmread(p).SOPInstanceUID): p for p in received}
    for path in sent:
        original = pydicom.dcmread(path)
        copy = pydicom.dcmread(by_uid[str(original.SOPInstanceUID)])
        assert copy.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
        assert copy.PixelData == original.PixelData
    bad = subprocess.run([sys.executable, "-m", "osteogate.gateway.operate.cli", "send", str(SAMPLE_DIR / "README.md"), "--to",
                          f"PACS@127.0.0.1:{pacs.port}"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 66 and "not a DICOM file" in bad.stderr  # EX_NOINPUT: nothing to send
    absent = subprocess.run([sys.executable, "-m", "osteogate.gateway.operate.cli", "send", str(tmp_path / "absent.dcm"),
                             "--to", f"PACS@127.0.0.1:{pacs.port}"], capture_output=True, text=True, timeout=60)
    assert absent.returncode == 66 and "absent.dcm: no such file or folder" in absent.stderr


def test_demo_prints_sr_summaries(tiny_model: Path, tmp_path: Path) -> None:
    import sys

    from PIL import Image

    demo = subprocess.run([sys.executable, "-m", "osteogate.gateway.operate.cli", "demo", "--model", str(tiny_model), "--timeout", "120",
                           "--cards", str(tmp_path / "cards")], capture_output=True, text=True, timeout=240)
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    assert "PACS received 4 SR(s) and 4 result card(s) for 4 of 5 studies" in demo.stdout
    cards = sorted((tmp_path / "cards").glob("card-*.png"))
    assert len(cards) == 4 and all(Image.open(p).size == (1600, 1200) for p in cards)
    assert demo.stdout.count("Screening aid, not a diagnosis: it cannot rule out low bone density") == 4
    # The demo's model is untrained: every SR says "not assessed", none claims a finding.
    assert demo.stdout.count("Summary: NOT ASSESSED - ") == 4 and "Detected" not in demo.stdout
    assert "skipped, no SR sent" in demo.stdout and "CHEST" in demo.stdout
