"""Faults around the gateway: a PACS that refuses us, a PACS that is down, a killed worker, a locked
database and a full disk. Real processes and real DICOM on 127.0.0.1 throughout.

The invariant checked everywhere: an instance the gateway acknowledged (status 0x0000) is in the
spool and in SQL, and every study version produces at most one SR at the PACS.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation, Verification
from pynetdicom.transport import ThreadedAssociationServer

from tests.gateway_harness import GatewayProcess
from tests.helpers import (
    StoreSCP,
    dcmtk_available,
    echoscu,
    free_port,
    make_dataset,
    storescu,
    wait_until,
    write_dataset,
)

pytestmark = pytest.mark.skipif(not dcmtk_available("storescu", "storescp", "echoscu"), reason="dcmtk missing")

SR_PATTERN = "SR*.dcm"


def make_study(directory: Path, count: int, size: int = 64, study_uid: str | None = None) -> list[Path]:
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    return [write_dataset(make_dataset(study_uid=study_uid, series_uid=series_uid, size=(size, size),
                                       InstanceNumber=i + 1), directory / f"{study_uid}_{i}.dcm")
            for i in range(count)]


def send_each(port: int, paths: list[Path], statuses: dict[str, int], *, stop: threading.Event | None = None,
              on_sent: object = None) -> None:
    """C-STORE files one by one on one association, recording each SOP Instance UID's status.

    A missing entry means no response came (association aborted): the modality still owns it.
    """
    ae = AE(ae_title="MODALITY")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(DigitalXRayImageStorageForPresentation)
    assoc = ae.associate("127.0.0.1", port, ae_title="OSTEOGATE")
    if not assoc.is_established:
        return
    try:
        for path in paths:
            if stop is not None and stop.is_set() or not assoc.is_established:
                break
            ds = pydicom.dcmread(path)
            try:
                status = assoc.send_c_store(ds)
            except RuntimeError:  # the gateway died between the check above and this request
                if assoc.is_established:
                    raise
                break
            if status and "Status" in status:
                statuses[str(ds.SOPInstanceUID)] = int(status.Status)
                if callable(on_sent):
                    on_sent(str(ds.SOPInstanceUID), int(status.Status))
    finally:
        if assoc.is_established:
            assoc.release()


def stored_instances(data_dir: Path, db_path: Path | None = None) -> tuple[set[str], set[str]]:
    """(SOP Instance UIDs with an SQL row, SOP Instance UIDs with a spool file)."""
    db_path = db_path or data_dir / "osteogate.db"
    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=30) as conn:
        rows = {r[0] for r in conn.execute("SELECT sop_instance_uid FROM instances")}
    files = {p.stem for p in (data_dir / "spool").rglob("*.dcm")}
    return rows, files


def srs_per_version(pacs: StoreSCP) -> Counter[tuple[str, int]]:
    srs = [pydicom.dcmread(p) for p in pacs.files(SR_PATTERN)]
    return Counter((str(d.StudyInstanceUID), int(d.InstanceNumber)) for d in srs)


class RejectingPACS:
    """A real Storage SCP (pynetdicom) that only answers to the AE title "REALPACS": the gateway's
    association to "PACS" is refused with rejected-permanent / called AE title not recognised."""

    def __init__(self) -> None:
        self.port = free_port()
        self.ae = AE(ae_title="REALPACS")
        self.ae.require_called_aet = True
        self.ae.add_supported_context("1.2.840.10008.5.1.4.1.1.88.34")  # Comprehensive 3D SR
        self.ae.add_supported_context(Verification)
        self._server: ThreadedAssociationServer | None = None

    def __enter__(self) -> RejectingPACS:
        self._server = self.ae.start_server(("127.0.0.1", self.port), block=False)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.shutdown()


def test_pacs_rejecting_association_is_marked_rejected_not_retried(tmp_path: Path, tiny_model: Path) -> None:
    files = make_study(tmp_path / "in", 2)
    with RejectingPACS() as pacs, GatewayProcess(tmp_path / "gw", model=tiny_model,
                                                 destinations=[f"PACS@127.0.0.1:{pacs.port}"]) as gw:
        assert storescu(files, "127.0.0.1", gw.port, "OSTEOGATE").returncode == 0

        def rejected() -> list[dict]:
            return [e for e in gw.events() if e.get("event") == "sr_delivery_rejected"]

        events = wait_until(rejected, 45, interval=0.3)
        # The harness retries transient failures every <= 2 s: give it time to (wrongly) retry.
        time.sleep(4)
        assert len(rejected()) == 1, rejected()
        assert not [e for e in gw.events() if e.get("event") == "sr_delivery_retry"]
        words = "association rejected permanently by the called AE: called AE title not recognised"
        assert events[0]["detail"] == words, events[0]
        rows = gw.studies()
        assert len(rows) == 1 and rows[0]["status"] == "done" and rows[0]["delivered"] == "0/1"
        show = gw.cli("show", rows[0]["study_uid"]).stdout
        assert "rejected attempts 1" in show and words in show, show


@pytest.mark.slow
def test_pacs_down_for_a_while_then_up_delivers_each_sr_once(tmp_path: Path, tiny_model: Path) -> None:
    """Slow variant of test_gateway_e2e's PACS-down test: several studies, PACS down for ~40 s
    (many retries at the capped backoff), then up: every SR arrives exactly once."""
    pacs = StoreSCP(tmp_path / "pacs")  # port reserved, not started: the PACS is down
    studies = [make_study(tmp_path / "in", 2) for _ in range(3)]
    with GatewayProcess(tmp_path / "gw", model=tiny_model, destinations=[f"PACS@127.0.0.1:{pacs.port}"]) as gw:
        for files in studies:
            assert storescu(files, "127.0.0.1", gw.port, "OSTEOGATE").returncode == 0
        wait_until(lambda: len([e for e in gw.events() if e.get("event") == "sr_delivery_retry"]) >= 3, 60)
        time.sleep(40)
        assert pacs.files() == []
        pacs.start()
        try:
            pacs.wait_for_files(SR_PATTERN, count=len(studies), timeout=60)
            time.sleep(5)  # would a duplicate follow?
            counts = srs_per_version(pacs)
            assert len(counts) == len(studies) and set(counts.values()) == {1}, counts
            assert {r["delivered"] for r in gw.studies()} == {"1/1"}
        finally:
            pacs.stop()


def test_sigkill_mid_batch_loses_no_acknowledged_instance(tmp_path: Path, dcmtk_pacs: StoreSCP,
                                                          tiny_model: Path) -> None:
    """SIGKILL while study A is being classified and study B is arriving; restart; the modality
    resends what was not acknowledged. Nothing acknowledged is lost; one SR per study version."""
    # Many 1024x1024 images: decoding and preprocessing them keeps the job running for seconds.
    study_a = make_study(tmp_path / "a", 40, size=1024)
    study_b = make_study(tmp_path / "b", 40, size=256)
    data_dir = tmp_path / "gw"
    destination = f"PACS@127.0.0.1:{dcmtk_pacs.port}"
    acked: dict[str, int] = {}
    first = GatewayProcess(data_dir, model=tiny_model, destinations=[destination], stable_seconds=1).start()
    sender: threading.Thread | None = None
    try:
        assert storescu(study_a, "127.0.0.1", first.port, "OSTEOGATE").returncode == 0
        acked.update({str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): 0 for p in study_a})
        wait_until(lambda: any(e.get("event") == "job_started" for e in first.events()), 30, interval=0.05)
        sender = threading.Thread(target=send_each, args=(first.port, study_b, acked), daemon=True)
        sender.start()
        wait_until(lambda: len(acked) >= len(study_a) + 5, 30, interval=0.02)  # B half-way in
    finally:
        first.kill()
    assert not any(e.get("event") == "study_classified" for e in first.events()), \
        "study A finished before the kill: make the batch bigger"
    assert sender is not None
    sender.join(40)
    assert not sender.is_alive()
    assert dcmtk_pacs.files(SR_PATTERN) == []

    ok = {uid for uid, code in acked.items() if code == 0}
    rows, files = stored_instances(data_dir)
    assert ok <= rows and ok <= files, f"acknowledged but lost: {sorted(ok - (rows & files))[:5]}"

    with GatewayProcess(data_dir, model=tiny_model, destinations=[destination], stable_seconds=1,
                        port=first.port) as second:
        # The modality resends everything it has no success for.
        missing = [p for p in study_b if str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) not in ok]
        if missing:
            assert storescu(missing, "127.0.0.1", second.port, "OSTEOGATE").returncode == 0

        def both_done() -> list[dict]:
            listing = second.studies()
            return listing if len(listing) == 2 and all(
                r["status"] == "done" and r["delivered"] == "1/1" for r in listing) else []

        listing = wait_until(both_done, 50, interval=0.5)
        time.sleep(2)  # would a duplicate SR follow?
        counts = srs_per_version(dcmtk_pacs)
    assert sorted(r["instances"] for r in listing) == [40, 40]
    assert set(counts.values()) == {1}, counts
    assert {study for study, _ in counts} == {row["study_uid"] for row in listing}


def test_db_locked_briefly_no_ack_without_storage(tmp_path: Path, tiny_model: Path) -> None:
    files = make_study(tmp_path / "in", 12)
    data_dir = tmp_path / "gw"
    with GatewayProcess(data_dir, model=tiny_model, stable_seconds=30) as gw:
        assert storescu(files[:1], "127.0.0.1", gw.port, "OSTEOGATE").returncode == 0  # schema + WAL exist
        statuses: dict[str, int] = {}
        acked_at: dict[str, float] = {}
        lock = sqlite3.connect(data_dir / "osteogate.db", timeout=30, isolation_level=None)
        try:
            lock.execute("BEGIN EXCLUSIVE")  # no other connection can write until we commit
            sender = threading.Thread(
                target=send_each, args=(gw.port, files[1:], statuses),
                kwargs={"on_sent": lambda uid, code: acked_at.setdefault(uid, time.monotonic())}, daemon=True)
            sender.start()
            time.sleep(4)
            released = time.monotonic()
            acked_while_locked = [uid for uid, code in statuses.items() if code == 0]
            lock.execute("COMMIT")
        finally:
            lock.close()
        sender.join(60)
        assert not sender.is_alive(), "C-STORE hung after the lock was released"
        # An acknowledgement while SQL could not be written would be an ack without storage.
        assert acked_while_locked == []
        assert all(acked_at[uid] >= released for uid, code in statuses.items() if code == 0)
        assert set(statuses.values()) <= {0x0000, 0xA700}, statuses
        rows, spooled = stored_instances(data_dir)
        ok = {uid for uid, code in statuses.items() if code == 0}
        assert ok <= rows and ok <= spooled
        assert len(statuses) == len(files) - 1
        assert echoscu("127.0.0.1", gw.port, "OSTEOGATE").returncode == 0


def test_min_free_space_refuses_with_out_of_resources(tmp_path: Path, tiny_model: Path) -> None:
    files = make_study(tmp_path / "in", 3)
    data_dir = tmp_path / "gw"
    huge = str(10**9)  # 1 PB "minimum free": no disk has that
    with GatewayProcess(data_dir, model=tiny_model, env={"OSTEOGATE_STORAGE_MIN_FREE_MB": huge}) as gw:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(DigitalXRayImageStorageForPresentation)
        assoc = ae.associate("127.0.0.1", gw.port, ae_title="OSTEOGATE")
        if assoc.is_established:
            # Space ran out after the association opened: each store is refused, retry later.
            try:
                codes = [int(assoc.send_c_store(pydicom.dcmread(p)).Status) for p in files]
            finally:
                assoc.release()
            assert codes == [0xA700] * len(files)
        else:
            # Refused up front: rejected-transient (PS3.8 7.1.1.8 result 2) tells the modality to
            # retry later; rejected-permanent would make it give up on the images.
            assert assoc.is_rejected and int(assoc.acceptor.primitive.result) == 0x02
        # By design (gateway/receive/scp.py handle_requested) even C-ECHO is refused while the disk is
        # short, so monitoring sees the problem; the process itself must stay up.
        assert gw.proc is not None and gw.proc.poll() is None
        assert gw.studies() == []
    assert not list((data_dir / "spool").rglob("*.dcm"))
    # Space is back: the modality's retry is accepted and nothing was lost in between.
    with GatewayProcess(data_dir, model=tiny_model, stable_seconds=30) as gw:
        assert storescu(files, "127.0.0.1", gw.port, "OSTEOGATE").returncode == 0
        assert gw.studies()[0]["instances"] == len(files)


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 20 MB tmpfs: a disk that really fills up (needs root / CAP_SYS_ADMIN; skipped otherwise)."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mount)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount tmpfs here: {result.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_real_full_disk_refuses_without_losing_acknowledged(tmp_path: Path, tiny_model: Path,
                                                            small_tmpfs: Path) -> None:
    # 2048x2048 16-bit = 8 MB each: the third or fourth no longer fits in 20 MB.
    files = make_study(tmp_path / "in", 5, size=2048)
    data_dir = small_tmpfs / "gw"
    # SQL lives on the normal disk, so this checks the spool's own handling of ENOSPC.
    db_url = f"sqlite:///{tmp_path / 'osteogate.db'}"
    statuses: dict[str, int] = {}
    with GatewayProcess(data_dir, model=tiny_model, stable_seconds=30, database_url=db_url) as gw:
        send_each(gw.port, files, statuses)
        assert echoscu("127.0.0.1", gw.port, "OSTEOGATE").returncode == 0
        assert gw.proc is not None and gw.proc.poll() is None
    codes = list(statuses.values())
    assert len(codes) == len(files), statuses
    assert 0x0000 in codes and 0xA700 in codes, statuses  # some fitted, the rest were refused
    assert set(codes) <= {0x0000, 0xA700}
    rows, spooled = stored_instances(data_dir, tmp_path / "osteogate.db")
    ok = {uid for uid, code in statuses.items() if code == 0}
    assert rows == ok and spooled == ok
    assert not list(data_dir.rglob(".incoming-*")), "a failed write left its temporary file"


# -- a job that kills its worker -------------------------------------------------------------------------


def _count(gw: GatewayProcess, event: str) -> int:
    return sum(e.get("event") == event for e in gw.events())


def _poison_cycle(tmp_path: Path, tiny_model: Path, max_attempts: int) -> None:
    """Kill the gateway while it processes the same study, max_attempts times; the next start
    fails the job ("worker died N times") instead of running it again, and keeps serving."""
    study = make_study(tmp_path / "in", 40, size=1024)  # seconds of decoding: time to kill mid-job
    data_dir = tmp_path / "gw"
    port = free_port()
    env = {"OSTEOGATE_WORKER_MAX_ATTEMPTS": str(max_attempts)}

    def life() -> GatewayProcess:
        return GatewayProcess(data_dir, model=tiny_model, stable_seconds=1, port=port, env=env).start()

    gw = life()
    try:
        assert storescu(study, "127.0.0.1", gw.port, "OSTEOGATE").returncode == 0
        for death in range(1, max_attempts + 1):
            wait_until(lambda n=death, g=gw: _count(g, "job_started") >= n, 60, interval=0.05)
            gw.kill()  # as the OOM killer would, mid-job
            assert _count(gw, "study_classified") == 0, "the job finished before the kill: make it bigger"
            gw = life()
        rows = wait_until(lambda: [r for r in gw.studies() if r["status"] == "failed"], 30)
        # Not started again: the count of job starts stays at the number of deaths.
        time.sleep(2)
        assert _count(gw, "job_started") == max_attempts
        show = gw.cli("show", rows[0]["study_uid"]).stdout
        assert f"worker died {max_attempts} times" in show, show
        assert any(e.get("event") == "job_failed_for_good" for e in gw.events())
        # The listener serves, and the next study is classified as usual.
        assert echoscu("127.0.0.1", gw.port, "OSTEOGATE").returncode == 0
        fresh = make_study(tmp_path / "fresh", 1)
        assert storescu(fresh, "127.0.0.1", gw.port, "OSTEOGATE").returncode == 0
        wait_until(lambda: any(r["status"] == "done" for r in gw.studies()), 60)
    finally:
        gw.stop()


def test_job_that_kills_its_worker_fails_after_max_attempts(tmp_path: Path, tiny_model: Path) -> None:
    _poison_cycle(tmp_path, tiny_model, max_attempts=2)


@pytest.mark.slow
def test_job_that_kills_its_worker_default_attempts(tmp_path: Path, tiny_model: Path) -> None:
    """The issue's case: max_attempts 3 (the default); it used to reach attempts 5 of 3 after 4 kills."""
    _poison_cycle(tmp_path, tiny_model, max_attempts=3)


# -- one silent destination --------------------------------------------------------------------------------


class SilentPeer:
    """Accepts TCP connections and never says a word: a PACS hung until every timeout expires."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.connections: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.connections.append(conn)

    def close(self) -> None:
        self.server.close()
        for conn in self.connections:
            conn.close()


def _when(event: dict) -> float:
    return datetime.fromisoformat(event["timestamp"]).timestamp()


def test_silent_destination_never_delays_another(tmp_path: Path, dcmtk_pacs: StoreSCP, tiny_model: Path) -> None:
    silent = SilentPeer()
    studies = [make_study(tmp_path / "in", 1) for _ in range(4)]
    env = {"OSTEOGATE_DELIVERY_TIMEOUT_SECONDS": "8"}
    destinations = [f"SILENT@127.0.0.1:{silent.port}", f"PACS@127.0.0.1:{dcmtk_pacs.port}"]
    try:
        with GatewayProcess(tmp_path / "gw", model=tiny_model, destinations=destinations, env=env) as gw:
            for files in studies:
                assert storescu(files, "127.0.0.1", gw.port, "OSTEOGATE").returncode == 0
            dcmtk_pacs.wait_for_files(SR_PATTERN, count=len(studies), timeout=60)
            # The SR lands first and the result card after it on the same association; the
            # delivery is logged once both are stored.
            events = wait_until(lambda: (lambda ev: ev if sum(e.get("event") == "sr_delivered" and
                                                                e["destination"] == "PACS" for e in ev) >= len(studies)
                                         else None)(gw.events()), 30)
            assert not any(e.get("event") == "sr_delivered" and e["destination"] == "SILENT" for e in events)
    finally:
        silent.close()
    classified = {e["study_key"]: _when(e) for e in events if e.get("event") == "study_classified"}
    delivered = {e["study_key"]: _when(e) for e in events
                 if e.get("event") == "sr_delivered" and e["destination"] == "PACS"}
    delays = [delivered[key] - classified[key] for key in classified]
    print(f"healthy PACS got each SR {max(delays):.2f} s (max) after its result; the silent peer's "
          "timeout is 8 s")
    # Serial delivery made each of these wait 8 s (the timeout) per silent attempt before it.
    assert len(delays) == len(studies) and max(delays) < 5, delays


# -- temporary files of a dead process ----------------------------------------------------------------------


def test_orphaned_temporary_files_are_removed_at_start(tmp_path: Path, tiny_model: Path) -> None:
    from tests.test_robustness import big_native_file

    big = big_native_file(tmp_path / "big.dcm", 300 * 2**20)
    data_dir = tmp_path / "gw"
    first = GatewayProcess(data_dir, model=tiny_model).start()
    incoming = data_dir / "spool" / ".incoming"
    statuses: dict[str, int] = {}
    sender = threading.Thread(target=send_each, args=(first.port, [big], statuses), daemon=True)
    try:
        from pynetdicom import _config

        _config.STORE_SEND_CHUNKED_DATASET = True  # stream the file: the test process stays small
        sender.start()
        wait_until(lambda: [p for p in incoming.rglob("rx-*.tmp") if p.stat().st_size > 2**20], 60, interval=0.05)
    finally:
        first.kill()  # mid-write
    left = [p for p in incoming.rglob("rx-*.tmp")]
    assert left and statuses == {}
    # A temporary file an older release left beside the spooled files, long ago; and a fresh one
    # (it could belong to a live process): only the old one may go.
    series = data_dir / "spool" / "1.2.3" / "4.5.6"
    series.mkdir(parents=True)
    (series / ".incoming-old.tmp").write_bytes(b"x")
    os.utime(series / ".incoming-old.tmp", (time.time() - 7200, time.time() - 7200))
    (series / ".incoming-new.tmp").write_bytes(b"x")
    with GatewayProcess(data_dir, model=tiny_model) as second:
        assert not [p for p in left if p.exists()]
        wait_until(lambda: not (series / ".incoming-old.tmp").exists(), 10)
        assert (series / ".incoming-new.tmp").exists()
        events = [e for e in second.events() if e.get("event") == "orphans_removed"]
    assert events and events[0]["count"] >= 1
