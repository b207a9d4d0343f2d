"""``osteogate demo``: a gateway and a local PACS on free ports, the samples sent, the SRs printed
(and, with ``--cards DIR``, the result cards saved as PNG pictures)."""

from __future__ import annotations

import socket
import tempfile
import threading
import time
from importlib.resources import files
from pathlib import Path

import pydicom
from osteogate.gateway.core.config import Destination, load_settings
from osteogate.gateway.core.logs import configure_logging
from osteogate.gateway.operate.queries import describe_study, list_studies
from osteogate.gateway.operate.service import Gateway
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    SecondaryCaptureImageStorage,
    Verification,
)

SAMPLES = Path(str(files("osteogate.sample_dicom")))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class DemoPACS:
    """A minimal PACS: accepts SRs and result cards (Secondary Capture) by C-STORE, keeps them in memory."""

    def __init__(self, port: int, ae_title: str = "DEMOPACS") -> None:
        self.received: list[Dataset] = []
        self._lock = threading.Lock()
        ae = AE(ae_title=ae_title)
        for sop_class in (Comprehensive3DSRStorage, ComprehensiveSRStorage, SecondaryCaptureImageStorage,
                          Verification):
            ae.add_supported_context(sop_class)
        self._server = ae.start_server(("127.0.0.1", port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, self._on_store)])

    def _on_store(self, event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        with self._lock:
            self.received.append(ds)
        return 0x0000

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def stop(self) -> None:
        self._server.shutdown()


def run_demo(model: Path | None = None, timeout: float = 180, cards: Path | None = None) -> int:
    from osteogate.gateway.report.sr import sr_summary

    configure_logging("console", "warning")
    samples = sorted(SAMPLES.glob("*.dcm"))
    if not samples:
        print(f"no sample files in {SAMPLES}")
        return 1
    with tempfile.TemporaryDirectory(prefix="osteogate-demo-") as data_dir:
        pacs = DemoPACS(free_port())
        pacs_port = pacs.port
        settings = load_settings(environ={}, overrides={
            "storage": {"data_dir": data_dir, "min_free_mb": 0},
            "dicom": {"ae_title": "OSTEOGATE", "port": 0, "bind": "127.0.0.1"},
            "study": {"stable_seconds": 1, "check_interval_seconds": 0.5},
            "delivery": {"destinations": [Destination(ae_title="DEMOPACS", host="127.0.0.1", port=pacs_port)],
                         "check_interval_seconds": 1},
            "model": {"path": str(model) if model else ""},
        })
        gateway = Gateway(settings)
        print(f"local PACS DEMOPACS on 127.0.0.1:{pacs_port}; starting the gateway and loading the model…")
        gateway.start()
        try:
            print(f"sending {len(samples)} sample file(s) to OSTEOGATE@127.0.0.1:{gateway.port}")
            studies = {str(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID) for p in samples}
            _send(samples, gateway.port)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and not _all_settled(gateway, len(studies)):
                time.sleep(0.2)
            rows = list_studies(gateway.store.db)
            expected_srs = sum(row["status"] == "done" for row in rows)
            srs = [d for d in pacs.received if str(d.get("Modality", "")) == "SR"]
            result_cards = [d for d in pacs.received if str(d.get("Modality", "")) != "SR"]
            got = {str(d.StudyInstanceUID) for d in srs}
            print(f"\nPACS received {len(srs)} SR(s) and {len(result_cards)} result card(s) for {len(got)} of "
                  f"{len(studies)} studies\n")
            for ds in srs:
                print(sr_summary(ds))
                print("-" * 78)
            if cards is not None and result_cards:
                _save_cards(result_cards, cards)
            for row in rows:
                if row["status"] != "done":
                    details = describe_study(gateway.store.db, settings, row["study_uid"]) or ""
                    reasons = [line.strip() for line in details.splitlines() if line.strip().startswith("image ")]
                    print(f"study {row['study_key']}: {row['status']}, no SR sent; " + "; ".join(reasons))
            return 0 if len(rows) == len(studies) and len(got) == expected_srs else 1
        finally:
            gateway.stop()
            pacs.stop()


def _save_cards(datasets: list[Dataset], folder: Path) -> None:
    """The result cards as PNG pictures, one per study (named by the hashed study key, no UIDs)."""
    from osteogate.gateway.core.logs import study_key
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for ds in datasets:
        path = folder / f"card-{study_key(str(ds.StudyInstanceUID))}-v{ds.get('InstanceNumber', 1)}.png"
        Image.fromarray(ds.pixel_array).save(path)
        print(f"result card saved: {path}")


def _all_settled(gateway: Gateway, count: int) -> bool:
    """Every study processed, and every SR made has been delivered (or given up on)."""
    rows = list_studies(gateway.store.db)
    finished = [r for r in rows if r["status"] in ("done", "skipped", "failed")]
    delivered = all(r["delivered"] is None or r["delivered"].split("/")[0] == r["delivered"].split("/")[1]
                    for r in finished)
    return len(finished) == count and delivered


def _send(files: list[Path], port: int) -> None:
    datasets = [pydicom.dcmread(p) for p in files]
    ae = AE(ae_title="DEMOMODALITY")
    for sop_class, syntax in {(str(d.SOPClassUID), str(d.file_meta.TransferSyntaxUID)) for d in datasets}:
        ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title="OSTEOGATE")
    if not assoc.is_established:
        raise RuntimeError("could not associate with the gateway")
    try:
        for path, ds in zip(files, datasets, strict=True):
            status = assoc.send_c_store(ds)
            print(f"  {path.name}: status 0x{int(status.Status):04X}" if status else f"  {path.name}: no response")
    finally:
        assoc.release()
