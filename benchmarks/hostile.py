"""Hostile peers: memory under bombs, a TLS echo beside idle sockets, a silent destination.

    .venv/bin/python benchmarks/hostile.py [--bomb-mb 1100] [--big-mb 288] [--echoes 10]

Three measurements, each against a reference taken in the same run:

* **memory**: peak RSS (VmHWM from /proc) of `osteogate serve` (max_instance_mb = 2) after 20
  normal instances (reference), then after three deflate bombs of --bomb-mb inflated each, in one
  study, and one --big-mb instance. Goal: peak < 600 MB, every bomb answered 0xA700.
* **tls**: median TLS C-ECHO time with no other connection (reference), then the time of a TLS
  C-ECHO sent while idle sockets (connected, silent) are open. Goal: delay <= the handshake
  timeout (5 s); the handshake runs off the accept loop, so about 0 s is expected.
* **delivery**: for 4 studies, seconds from each result to its SR at a healthy PACS, with the
  healthy PACS as only destination (reference), then with a silent destination (accepts TCP,
  never answers; delivery timeout 20 s) listed first. Goal: 0 s added.

The load classes (200 concurrent storescu associations, a 1,000-instance study, a 1,000-frame
instance, the maximum number of presentation contexts, 1,000 rapid /metrics and /healthz requests)
have their own script, `benchmarks/hostile_load.py`, with p99 C-ECHO latency, peak RSS and
instances/s per phase; benchmarks/README.md shows both.
"""

from __future__ import annotations

import argparse
import socket
import ssl
import statistics
import subprocess
import tempfile
import time
from datetime import datetime
from pathlib import Path

from _common import ROOT, proc_status_kib, resolve_model  # noqa: F401  (puts the repo on sys.path)
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation, Verification

from tests.gateway_harness import GatewayProcess
from tests.helpers import StoreSCP, make_dataset, storescu, write_dataset
from tests.test_faults import SilentPeer
from tests.test_robustness import big_native_file, deflate_bomb

DX = str(DigitalXRayImageStorageForPresentation)


def memory(work: Path, model: Path, bomb_mb: int, big_mb: int) -> bool:
    study = generate_uid()
    bombs = [deflate_bomb(work / f"bomb{i}.dcm", bomb_mb * 2**20, study_uid=study) for i in range(3)]
    big = big_native_file(work / "big.dcm", big_mb * 2**20)
    normal = [write_dataset(make_dataset(size=(512, 512)), work / "normal" / f"{i}.dcm") for i in range(20)]
    _config.STORE_SEND_CHUNKED_DATASET = True  # stream the files: this process stays small too
    with GatewayProcess(work / "gw-mem", model=model, env={"OSTEOGATE_DICOM_MAX_INSTANCE_MB": "2"}) as gw:
        assert gw.proc is not None
        storescu(normal, "127.0.0.1", gw.port, "OSTEOGATE")
        time.sleep(3)
        reference = (proc_status_kib(gw.proc.pid, "VmHWM") or 0) / 1024
        ae = AE(ae_title="BENCH")
        ae.add_requested_context(DX, [str(DeflatedExplicitVRLittleEndian)])
        ae.add_requested_context(DX, [str(ExplicitVRLittleEndian)])
        assoc = ae.associate("127.0.0.1", gw.port, ae_title="OSTEOGATE")
        t0 = time.perf_counter()
        codes = [int(assoc.send_c_store(path).Status) for path in [*bombs, big]]
        seconds = time.perf_counter() - t0
        assoc.release()
        time.sleep(3)
        peak = (proc_status_kib(gw.proc.pid, "VmHWM") or 0) / 1024
    ok = peak < 600 and codes == [0xA700] * 4
    print(f"memory: serve VmHWM {reference:.0f} MB after 20 normal instances; {peak:.0f} MB after 3 x "
          f"{bomb_mb} MB deflate bombs + a {big_mb} MB instance ({seconds:.1f} s, statuses "
          f"{', '.join(f'0x{c:04X}' for c in codes)}); ratio {peak / reference:.2f}; goal < 600 MB: "
          f"{'OK' if ok else 'MISSED'}")
    return ok


def _pki(work: Path) -> Path:
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=work, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=bench CA")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj",
            "/CN=localhost")
    (work / "server.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out",
            "server.pem", "-days", "2", "-extfile", "server.ext")
    return work


def _tls_echo(port: int, context: ssl.SSLContext) -> float:
    ae = AE(ae_title="BENCH")
    ae.add_requested_context(Verification)
    t0 = time.perf_counter()
    assoc = ae.associate("127.0.0.1", port, ae_title="OSTEOGATE", tls_args=(context, "localhost"))
    assert assoc.is_established and int(assoc.send_c_echo().Status) == 0
    assoc.release()
    return time.perf_counter() - t0


def tls(work: Path, model: Path, echoes: int) -> bool:
    (work / "pki").mkdir()
    pki = _pki(work / "pki")
    config = work / "tls.toml"
    config.write_text(f'[dicom.tls]\nenabled = true\ncert_file = "{pki / "server.pem"}"\n'
                      f'key_file = "{pki / "server.key"}"\n')
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki / "ca.pem"))
    with GatewayProcess(work / "gw-tls", model=model, env={"OSTEOGATE_CONFIG": str(config)}) as gw:
        reference = statistics.median(_tls_echo(gw.port, context) for _ in range(echoes))
        idle = [socket.create_connection(("127.0.0.1", gw.port)) for _ in range(3)]
        try:
            with_idle = statistics.median(_tls_echo(gw.port, context) for _ in range(echoes))
        finally:
            for sock in idle:
                sock.close()
    delay = max(0.0, with_idle - reference)
    ok = delay <= 5
    print(f"tls: C-ECHO median {reference * 1000:.0f} ms alone, {with_idle * 1000:.0f} ms with 3 idle sockets open "
          f"(added {delay:.2f} s); goal <= 5 s (handshake timeout): {'OK' if ok else 'MISSED'}")
    return ok


def _delays(events: list[dict]) -> list[float]:
    def when(e: dict) -> float:
        return datetime.fromisoformat(e["timestamp"]).timestamp()

    done = {e["study_key"]: when(e) for e in events if e.get("event") == "study_classified"}
    sent = {e["study_key"]: when(e) for e in events if e.get("event") == "sr_delivered" and e["destination"] == "PACS"}
    return [sent[k] - done[k] for k in done if k in sent]


def delivery(work: Path, model: Path) -> bool:
    results = {}
    for label, silent in (("reference", None), ("silent", SilentPeer())):
        pacs = StoreSCP(work / f"pacs-{label}").start()
        destinations = ([f"SILENT@127.0.0.1:{silent.port}"] if silent else []) + [f"PACS@127.0.0.1:{pacs.port}"]
        try:
            with GatewayProcess(work / f"gw-{label}", model=model, destinations=destinations,
                                env={"OSTEOGATE_DELIVERY_TIMEOUT_SECONDS": "20"}) as gw:
                for n in range(4):
                    storescu([write_dataset(make_dataset(), work / f"{label}-{n}.dcm")], "127.0.0.1", gw.port,
                             "OSTEOGATE")
                pacs.wait_for_files("SR*.dcm", count=4, timeout=120)
                results[label] = _delays(gw.events())
        finally:
            pacs.stop()
            if silent:
                silent.close()
    added = max(results["silent"]) - max(results["reference"])
    ok = added < 1
    print(f"delivery: SR at the healthy PACS max {max(results['reference']):.2f} s after the result alone, "
          f"{max(results['silent']):.2f} s with a silent destination first (timeout 20 s): added {added:+.2f} s; "
          f"goal 0 s: {'OK' if ok else 'MISSED'}")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--bomb-mb", type=int, default=1100, help="inflated size of each deflate bomb")
    parser.add_argument("--big-mb", type=int, default=288, help="size of the oversized instance")
    parser.add_argument("--echoes", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="osteogate-bench-hostile-") as tmp:
        work = Path(tmp)
        model = resolve_model(args.model, work)
        ok = [memory(work, model, args.bomb_mb, args.big_mb), tls(work, model, args.echoes), delivery(work, model)]
    return 0 if all(ok) else 1


if __name__ == "__main__":
    raise SystemExit(main())
