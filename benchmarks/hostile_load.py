"""Hostile load (issue 19 item 12): what a swarm of peers does to `osteogate serve`.

    .venv/bin/python benchmarks/hostile_load.py [--peers 200] [--instances 1000] [--frames 1000] [--requests 1000]

Five phases against one gateway, each measured while a prober sends a C-ECHO every 0.1 s:

* **swarm**: --peers storescu processes at once, one small instance each;
* **study**: one study of --instances small instances over one association;
* **multiframe**: one instance of --frames 64x64 frames;
* **contexts**: one association proposing 128 presentation contexts (the most a request holds);
* **http**: --requests /metrics and /healthz requests from 8 threads.

Per phase: the prober's p99 C-ECHO latency against its idle median (the reference, measured
first in the same run), instances/s or requests/s, and the gateway's peak RSS (VmHWM). The swarm
is also sent to dcmtk `storescp --fork` first, with the same prober, as the machine's reference.
Goals: p99 C-ECHO <= 2 s during every phase (the swarm: or at most 1.5x storescp's p99 under the
same swarm, where the machine cannot give 2 s); peak RSS at most 150 MB above the same gateway's
peak after one ordinary study of 64 images (the memory reference, measured first: model loaded, full
batches run), so memory is bounded by the configuration, not by the load; every instance
acknowledged or refused with a status (never a hang); C-ECHO answered throughout. The study phase
lasts until that study is classified.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from _common import proc_status_kib, resolve_model
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation, Verification

from tests.gateway_harness import GatewayProcess
from tests.helpers import StoreSCP, free_port, make_dataset, storescu, write_dataset

DX = str(DigitalXRayImageStorageForPresentation)


class EchoProber:
    """C-ECHO every `interval` seconds in a thread; latencies (s) and failures per phase."""

    def __init__(self, port: int, interval: float = 0.1) -> None:
        self.port, self.interval = port, interval
        self.latencies: list[float] = []
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        ae = AE(ae_title="PROBER")
        ae.add_requested_context(Verification)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        while not self._stop.is_set():
            started = time.perf_counter()
            assoc = ae.associate("127.0.0.1", self.port, ae_title="OSTEOGATE")
            ok = assoc.is_established and getattr(assoc.send_c_echo(), "Status", None) == 0
            if assoc.is_established:
                assoc.release()
            if ok:
                self.latencies.append(time.perf_counter() - started)
            else:
                self.failures += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> EchoProber:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)

    def p99(self) -> float:
        return float(np.percentile(self.latencies, 99)) if self.latencies else float("nan")


MAX_ASSOCIATIONS = 16  # dicom.max_associations of the gateway under test: the shipped default
# Memory goal: the load may add at most this much to the peak of the same gateway after one
# ordinary study (model loaded, full batches run): memory bounded by the configuration, not the load.
ADDED_MB = 150
WARM_IMAGES = 64


def _peak_mb(gw: GatewayProcess) -> float:
    assert gw.proc is not None
    return (proc_status_kib(gw.proc.pid, "VmHWM") or 0) / 1024


def _report(name: str, prober: EchoProber, reference: float, gw: GatewayProcess, rate: str,
            warm_mb: float, dcmtk_p99: float | None = None) -> bool:
    p99, peak = prober.p99(), _peak_mb(gw)
    # C-ECHO goal: p99 <= 2 s, or (swarm) at most 1.5x what dcmtk storescp --fork gave under the
    # same swarm on this machine, when the machine itself cannot give 2 s.
    echo_ok = p99 <= 2.0 or (dcmtk_p99 is not None and p99 <= 1.5 * dcmtk_p99)
    ok = prober.failures == 0 and echo_ok and peak <= warm_mb + ADDED_MB
    versus = f", {p99 / dcmtk_p99:.2f}x storescp's" if dcmtk_p99 else ""
    print(f"{name:<11} {rate:<28} C-ECHO p99 {p99 * 1000:7.0f} ms ({p99 / reference:5.1f}x idle median{versus}, "
          f"{len(prober.latencies)} echoes, {prober.failures} failed); peak RSS {peak:5.0f} MB "
          f"(+{peak - warm_mb:.0f} MB over warm): {'OK' if ok else 'MISSED'}")
    return ok


def _processed(gw: GatewayProcess, study_uid: str, timeout: float) -> float:
    """Seconds until the gateway has finished the study (done, skipped or failed)."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        rows = [r for r in gw.studies() if r.get("study_uid") == study_uid]
        if rows and rows[0].get("status") in ("done", "skipped", "failed"):
            return time.perf_counter() - started
        time.sleep(1)
    raise TimeoutError(f"study not processed within {timeout:.0f} s")


def warm_up(gw: GatewayProcess, work: Path) -> float:
    """One ordinary study through the whole pipeline; the peak RSS after it is the memory reference.

    It has WARM_IMAGES images, eight model batches (model.batch_size, default 8) and more than the
    prefetch window, so the reference holds the steady working set of inference and decoding.
    """
    uid = generate_uid()
    paths = [write_dataset(make_dataset(study_uid=uid), work / "warm" / f"{i}.dcm") for i in range(WARM_IMAGES)]
    assert storescu(paths, "127.0.0.1", gw.port, "OSTEOGATE").returncode == 0
    _processed(gw, uid, 300)
    return _peak_mb(gw)


def _storescu_swarm(port: int, files: list[Path]) -> tuple[list[int], float]:
    exe = shutil.which("storescu") or "storescu"
    started = time.perf_counter()
    procs = [subprocess.Popen([exe, "-aec", "OSTEOGATE", "-to", "60", "-ta", "60", "127.0.0.1", str(port), str(f)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for f in files]
    codes = [p.wait(300) for p in procs]  # a hang raises TimeoutExpired: the phase fails
    return codes, time.perf_counter() - started


def swarm_reference(work: Path, peers: int) -> float:
    """The same swarm against dcmtk `storescp --fork` (a process per association, no limit), with
    the same prober: its p99 C-ECHO is what this machine gives under that many storescu processes."""
    files = [write_dataset(make_dataset(), work / "swarm-ref" / f"{i}.dcm") for i in range(peers)]
    scp = StoreSCP(work / "ref-pacs", ae_title="OSTEOGATE", options=["--fork"])
    with scp, EchoProber(scp.port) as prober:
        codes, seconds = _storescu_swarm(scp.port, files)
    p99 = prober.p99()
    print(f"swarm reference: storescp --fork {codes.count(0)}/{peers} stored, {codes.count(0) / seconds:5.1f} inst/s, "
          f"C-ECHO p99 {p99 * 1000:.0f} ms ({len(prober.latencies)} echoes, {prober.failures} failed)")
    return p99


def swarm(gw: GatewayProcess, work: Path, peers: int) -> str:
    files = [write_dataset(make_dataset(), work / "swarm" / f"{i}.dcm") for i in range(peers)]
    codes, seconds = _storescu_swarm(gw.port, files)
    # A peer beyond dicom.max_associations is refused transiently (A-ASSOCIATE-RJ 0x02/0x03/0x02,
    # or the connection closed while too many wait): a modality keeps its images and retries.
    # connection_refused lines are rate-limited: each says how many it stands for.
    refused = sum(1 + int(e.get("suppressed", 0)) for e in gw.events()
                  if e.get("event") in ("association_rejected", "connection_refused"))
    return (f"{codes.count(0)}/{peers} stored, {refused} refused transiently (gateway log; "
            f"limit {MAX_ASSOCIATIONS}), "
            f"{len(codes) - codes.count(0)} storescu exits non-zero, {codes.count(0) / seconds:5.1f} inst/s")


def study(gw: GatewayProcess, work: Path, instances: int) -> str:
    uid = generate_uid()
    files = [write_dataset(make_dataset(study_uid=uid, size=(32, 32)), work / "study" / f"{i}.dcm")
             for i in range(instances)]
    started = time.perf_counter()
    result = storescu(files, "127.0.0.1", gw.port, "OSTEOGATE", timeout=900)
    seconds = time.perf_counter() - started
    # The phase lasts until the study is classified, so its peak RSS includes the worker's share.
    processed = _processed(gw, uid, 1800)
    return f"exit {result.returncode}, {instances / seconds:6.1f} inst/s, processed +{processed:.0f} s"


def multiframe(gw: GatewayProcess, work: Path, frames: int) -> str:
    ds = make_dataset(size=(64, 64))
    pixels = np.random.default_rng(1).integers(0, 4095, (frames, 64, 64), dtype=np.uint16)
    ds.NumberOfFrames = frames
    ds.PixelData = pixels.tobytes()
    path = write_dataset(ds, work / "multiframe.dcm")
    ae = AE(ae_title="BENCH")
    ae.add_requested_context(DX, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", gw.port, ae_title="OSTEOGATE")
    started = time.perf_counter()
    status = assoc.send_c_store(path)
    seconds = time.perf_counter() - started
    assoc.release()
    return f"status 0x{int(status.Status):04X} in {seconds:4.1f} s"


def contexts(gw: GatewayProcess) -> str:
    ae = AE(ae_title="BENCH")
    for _ in range(127):
        ae.add_requested_context(DX, ExplicitVRLittleEndian)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", gw.port, ae_title="OSTEOGATE")
    accepted = len(assoc.accepted_contexts) if assoc.is_established else 0
    if assoc.is_established:
        assoc.release()
    return f"128 proposed, {accepted} accepted"


def http(port: int, requests: int) -> str:
    def get(path: str) -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as response:
                response.read()
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)

    started = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(get, ["/metrics", "/healthz"] * (requests // 2)))
    seconds = time.perf_counter() - started
    return f"{sum(c in (200, 503) for c in codes)}/{len(codes)} answered, {len(codes) / seconds:5.0f} req/s"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--peers", type=int, default=200)
    parser.add_argument("--instances", type=int, default=1000)
    parser.add_argument("--frames", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="osteogate-hostile-load-") as tmp:
        work = Path(tmp)
        model = resolve_model(args.model, work)
        http_port = free_port()
        env = {"OSTEOGATE_HTTP_ENABLED": "true", "OSTEOGATE_HTTP_PORT": str(http_port),
               "OSTEOGATE_DICOM_MAX_ASSOCIATIONS": str(MAX_ASSOCIATIONS)}
        dcmtk_p99 = swarm_reference(work, args.peers)
        with GatewayProcess(work / "gw", model=model, env=env, stable_seconds=5) as gw:
            with EchoProber(gw.port) as idle:
                time.sleep(3)
            reference = statistics.median(idle.latencies)
            warm = warm_up(gw, work)
            print(f"reference: idle C-ECHO median {reference * 1000:.0f} ms over {len(idle.latencies)} echoes; "
                  f"peak RSS {warm:.0f} MB after one ordinary study (goal: load adds <= {ADDED_MB} MB)")
            results = []
            for name, run in (("swarm", lambda: swarm(gw, work, args.peers)),
                              ("study", lambda: study(gw, work, args.instances)),
                              ("multiframe", lambda: multiframe(gw, work, args.frames)),
                              ("contexts", lambda: contexts(gw)),
                              ("http", lambda: http(http_port, args.requests))):
                with EchoProber(gw.port) as prober:
                    rate = run()
                results.append(_report(name, prober, reference, gw, rate, warm, dcmtk_p99 if name == "swarm" else None))
            alive = gw.proc is not None and gw.proc.poll() is None
    print(f"gateway alive at the end: {alive}")
    return 0 if all(results) and alive else 1


if __name__ == "__main__":
    sys.exit(main())
