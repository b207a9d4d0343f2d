"""Compressed-dimension bombs (issue #9) over a real association, and in the worker.

A 64x64 DICOM header over a codestream whose own header claims 30000x30000 (JPEG SOF, JPEG-LS
SOF55, JPEG 2000 SIZ) or a colour segment table (RLE): `osteogate serve` refuses each at C-STORE time
with a permanent failure status and the reason in its log, in well under 2 s, without its memory
moving; a bomb already in the spool (received by an older version) is failed by the worker before
any decoding, with the reason, also in under 2 s.
"""

from __future__ import annotations

import time
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from osteogate.gateway.core.config import Settings
from osteogate.gateway.receive.ingest import Ingestor
from osteogate.gateway.report.publisher import ReportPublisher
from osteogate.gateway.store.db import Database, Instance
from osteogate.gateway.store.spool import Spool
from osteogate.gateway.work.worker import ClassifierWorker
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation, Verification

from tests.gateway_harness import GatewayProcess
from tests.helpers import dcmtk_available, make_dataset, write_dataset
from tests.helpers.bombs import BOMBS

pytestmark = pytest.mark.skipif(not dcmtk_available("storescu", "storescp", "echoscu", "dcmcjpeg"),
                                reason="dcmtk missing")

PERMANENT_FAILURES = {0xA900, 0xC000}  # "data set does not match SOP class", "cannot understand"
DX = str(DigitalXRayImageStorageForPresentation)
RSS_GOAL_MIB = 600  # issue #9: peak RSS of `osteogate serve` under the bomb tests


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/{pid}/status")


def _send(port: int, path: Path) -> tuple[int, float]:
    """C-STORE of the file's bytes as they are (no re-encoding): (status, seconds for the C-STORE)."""
    syntax = str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
    ae = AE(ae_title="BOMBER")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    ae.add_requested_context(DX, [syntax])
    ae.add_requested_context(Verification)
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    assoc = ae.associate("127.0.0.1", port, ae_title="OSTEOGATE")
    try:
        assert assoc.is_established
        t0 = time.perf_counter()
        status = assoc.send_c_store(path)
        elapsed = time.perf_counter() - t0
        assert status and "Status" in status, "no C-STORE response"
        return int(status.Status), elapsed
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
        if assoc.is_established:
            assoc.release()


def test_bombs_refused_at_c_store_with_bounded_memory(tmp_path: Path, tiny_model: Path) -> None:
    files = {name: write_dataset(make(), tmp_path / f"{name.replace(' ', '_')}.dcm") for name, make in BOMBS.items()}
    good = write_dataset(make_dataset(), tmp_path / "good.dcm")
    with GatewayProcess(tmp_path / "gw", model=tiny_model) as gw:
        assert gw.proc is not None
        pid = gw.proc.pid
        assert _send(gw.port, good)[0] == 0x0000  # warm: association handling, ingest, SQL
        rss_before = _status_kib(pid, "VmRSS")
        results = {name: _send(gw.port, path) for name, path in files.items()}
        peak, rss_after = _status_kib(pid, "VmHWM"), _status_kib(pid, "VmRSS")
        refusals = [e for e in gw.events() if e.get("event") == "instance_refused"]
        crashes = [e for e in gw.events() if e.get("event") == "instance_store_failed"]
        assert gw.proc.poll() is None, "gateway died"
    for name, (status, seconds) in results.items():
        assert status in PERMANENT_FAILURES, f"{name}: status 0x{status:04X}"
        assert seconds < 2, f"{name}: {seconds:.2f} s"
    reasons = [e.get("reason", "") for e in refusals]
    for header in ("JPEG SOF says 30000x30000", "JPEG-LS SOF55 says 30000x30000", "JPEG 2000 SIZ says 30000x30000",
                   "RLE header has 3 components"):
        assert any(header in reason for reason in reasons), (header, reasons)
    assert crashes == []
    print(f"serve RSS {rss_before / 1024:.0f} MiB before the bombs, {rss_after / 1024:.0f} MiB after, "
          f"peak {peak / 1024:.0f} MiB")
    assert peak / 1024 < RSS_GOAL_MIB
    assert (rss_after - rss_before) / 1024 < 50
    assert len(list((tmp_path / "gw" / "spool").rglob("*.dcm"))) == 1, "a bomb was spooled"


@pytest.mark.parametrize("name", list(BOMBS))
def test_spooled_bomb_failed_by_worker_before_decoding(tmp_path: Path, tiny_model: Path, name: str) -> None:
    """An instance accepted before the C-STORE check existed: the worker refuses to decode it."""
    from osteogate.model.inference import Classifier

    db = Database(f"sqlite:///{tmp_path / 'gw.db'}")
    db.create_schema()
    spool = Spool(tmp_path / "spool")
    good = make_dataset()
    buffer = BytesIO()
    good.save_as(buffer, enforce_file_format=True)
    Ingestor(db, spool).store(buffer.getvalue())
    with db.session() as session:
        instance = session.query(Instance).one()
    bomb = BOMBS[name]()
    # Same UIDs as the stored instance, so the spooled file is simply replaced by the bomb.
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        setattr(bomb, keyword, good.get(keyword))
    bomb.file_meta.MediaStorageSOPInstanceUID = good.SOPInstanceUID
    bomb.save_as(spool.absolute(instance.path), enforce_file_format=True)
    classifier = Classifier.load(tiny_model, backend="onnx")
    worker = ClassifierWorker(Settings(), db, spool, ReportPublisher(Settings(), Spool(tmp_path / "reports")), lambda _: classifier)
    t0 = time.perf_counter()
    outcome = worker.classify([instance], classifier)
    assert time.perf_counter() - t0 < 2
    (item,) = outcome.images
    assert item.score is None
    assert item.skip_reason and item.skip_reason.startswith("pixel data could not be decoded: ")
    assert name.split()[0] in item.skip_reason, item.skip_reason
    assert bomb.file_meta.TransferSyntaxUID != ExplicitVRLittleEndian
