"""Sustained load: mixed studies at a steady rate for N minutes; queue depth, failures and memory.

    .venv/bin/python benchmarks/sustained.py [--minutes 30] [--rate 20] [--size 1024] [--model FILE]
    .venv/bin/python benchmarks/sustained.py --minutes 2          # quick run

`osteogate serve` (a subprocess, real SQLite, spool, CPU ONNX path) receives a rotating mix of
studies from dcmtk storescu: knee DX with 2 views, spine CR, knee DX as JPEG 2000, and a chest DX
(out of scope: skipped, no SR). SRs go to dcmtk storescp. Every --sample seconds the queue depth
(studies not yet finished, pending jobs, pending deliveries) and the serve process's memory
(/proc/PID/status VmRSS, peak VmHWM) are sampled. After the sending stops the queue must drain.

Reported: the queue depth over time and whether it stayed bounded, failed studies (goal 0),
RSS at start/end and peak (goal < 1 GB on the CPU path), and whether libtorch is mapped into the
process (the ONNX path must not import torch). Exit status 1 if a study failed, an SR is missing
or a study got more than one SR (each study is sent once).
"""

from __future__ import annotations

import argparse
import itertools
import sqlite3
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pydicom
from _common import maps_libraries, proc_status_kib, resolve_model
from pydicom.dataset import Dataset
from pydicom.uid import JPEG2000Lossless, generate_uid

from tests.gateway_harness import GatewayProcess
from tests.helpers import StoreSCP, make_dataset, storescu, write_dataset

UNFINISHED = ("receiving", "queued", "processing")


@dataclass
class Sample:
    t: float
    unfinished: int
    jobs_pending: int
    deliveries_pending: int
    rss_mib: float
    hwm_mib: float


def templates(size: int) -> list[tuple[str, list[Dataset]]]:
    """One template study per kind; copies get fresh UIDs (encoding J2K once keeps the sender fast)."""
    knee = [make_dataset(size=(size, size), seed=i, ViewPosition=v) for i, v in enumerate(("AP", "LL"))]
    spine = [make_dataset(modality="CR", body_part="LSPINE", study_description="XR LUMBAR SPINE",
                          series_description="LSPINE LAT", size=(size, size), seed=5)]
    knee_j2k = make_dataset(size=(size, size), seed=7)
    knee_j2k.compress(JPEG2000Lossless)
    chest = [make_dataset(body_part="CHEST", study_description="XR CHEST", series_description="CHEST PA",
                          size=(size, size), seed=9)]
    return [("knee DX x2", knee), ("spine CR", spine), ("knee J2K", [knee_j2k]), ("chest (skipped)", chest)]


def write_study(kind: list[Dataset], directory: Path) -> list[Path]:
    study, series = generate_uid(), generate_uid()
    paths = []
    for i, template in enumerate(kind):
        ds = template.copy()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        paths.append(write_dataset(ds, directory / f"{study}_{i}.dcm"))
    return paths


def sample(db: Path, pid: int, t0: float) -> Sample:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as conn:
        placeholders = ",".join("?" * len(UNFINISHED))
        unfinished = conn.execute(f"SELECT count(*) FROM studies WHERE status IN ({placeholders})",
                                  UNFINISHED).fetchone()[0]
        jobs = conn.execute("SELECT count(*) FROM jobs WHERE status IN ('pending', 'running')").fetchone()[0]
        deliveries = conn.execute("SELECT count(*) FROM deliveries WHERE status = 'pending'").fetchone()[0]
    return Sample(time.monotonic() - t0, unfinished, jobs, deliveries,
                  (proc_status_kib(pid, "VmRSS") or 0) / 1024, (proc_status_kib(pid, "VmHWM") or 0) / 1024)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--rate", type=float, default=20, help="studies per minute")
    parser.add_argument("--size", type=int, default=1024, help="image rows and columns (16-bit)")
    parser.add_argument("--stable-seconds", type=float, default=2)
    parser.add_argument("--sample", type=float, default=5, help="seconds between samples")
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the work directory for inspection")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="osteogate-bench-sustained-") as tmp:
        work = Path(tempfile.mkdtemp(prefix="osteogate-bench-sustained-")) if args.keep else Path(tmp)
        if args.keep:
            print(f"keeping the gateway data, logs and PACS files in {work}")
        model = resolve_model(args.model, work)
        kinds = templates(args.size)
        pacs = StoreSCP(work / "pacs").start()
        gw = GatewayProcess(work / "gw", model=model, destinations=[f"PACS@127.0.0.1:{pacs.port}"],
                            stable_seconds=args.stable_seconds).start(timeout=300)
        assert gw.proc is not None
        pid, db = gw.proc.pid, work / "gw" / "osteogate.db"
        samples: list[Sample] = []
        sent: dict[str, int] = {name: 0 for name, _ in kinds}
        send_errors: list[str] = []
        stop = threading.Event()
        t0 = time.monotonic()
        try:
            rss_start = (proc_status_kib(pid, "VmRSS") or 0) / 1024
            duration = args.minutes * 60
            interval = 60 / args.rate

            def sender() -> None:
                for n, (name, kind) in zip(itertools.count(), itertools.cycle(kinds)):
                    due = t0 + n * interval
                    if due - t0 >= duration or stop.is_set():
                        return
                    time.sleep(max(0.0, due - time.monotonic()))
                    paths = write_study(kind, work / "out")
                    result = storescu(paths, "127.0.0.1", gw.port, "OSTEOGATE", timeout=120)
                    if result.returncode != 0:
                        send_errors.append(f"{name}: storescu rc {result.returncode}")
                    sent[name] += 1
                    for path in paths:
                        path.unlink()

            thread = threading.Thread(target=sender, daemon=True)
            thread.start()
            next_print = 0.0
            while thread.is_alive():
                samples.append(sample(db, pid, t0))
                if samples[-1].t >= next_print:
                    s = samples[-1]
                    print(f"t={s.t:6.0f}s unfinished studies {s.unfinished:3d}  pending jobs {s.jobs_pending:3d}  "
                          f"pending deliveries {s.deliveries_pending:3d}  RSS {s.rss_mib:6.0f} MiB", flush=True)
                    next_print += max(args.sample, duration / 20)
                time.sleep(args.sample)
            sending_s = time.monotonic() - t0
            # Drain: everything received must finish and be delivered.
            drain_deadline = time.monotonic() + 300
            while True:
                samples.append(sample(db, pid, t0))
                s = samples[-1]
                if s.unfinished == 0 and s.jobs_pending == 0 and s.deliveries_pending == 0:
                    break
                if time.monotonic() > drain_deadline:
                    print("queue did not drain within 300 s after sending stopped")
                    break
                time.sleep(1)
            drain_s = time.monotonic() - t0 - sending_s
            rss_end = (proc_status_kib(pid, "VmRSS") or 0) / 1024
            hwm = (proc_status_kib(pid, "VmHWM") or 0) / 1024
            torch_libs = maps_libraries(pid, "libtorch")
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
                statuses = dict(conn.execute("SELECT status, count(*) FROM studies GROUP BY status").fetchall())
                undelivered = conn.execute("SELECT count(*) FROM deliveries WHERE status != 'sent'").fetchone()[0]
                failed_jobs = conn.execute("SELECT count(*) FROM jobs WHERE status = 'failed'").fetchone()[0]
            sr_headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in pacs.files("SR*.dcm")]
            srs = len(sr_headers)
            sr_uids = {str(d.SOPInstanceUID) for d in sr_headers}
            per_study = Counter(str(d.StudyInstanceUID) for d in sr_headers)
            versions = Counter((str(d.StudyInstanceUID), int(d.InstanceNumber)) for d in sr_headers)
            errors = [e for e in gw.events() if e.get("level") == "error"]
        finally:
            stop.set()
            gw.stop()
            pacs.stop()

    total_sent = sum(sent.values())
    during = [s for s in samples if s.t <= sending_s]
    third = max(1, len(during) // 3)
    first_max = max((s.unfinished for s in during[:third]), default=0)
    last_max = max((s.unfinished for s in during[-third:]), default=0)
    bounded = last_max <= max(2 * first_max, first_max + 3) and samples[-1].unfinished == 0
    failed = statuses.get("failed", 0)
    print(f"\n{args.minutes:g} min at {args.rate:g} studies/min ({args.size}x{args.size} 16-bit), model {model.name}")
    print(f"sent {total_sent} studies ({total_sent / (sending_s / 60):.1f}/min achieved): "
          + ", ".join(f"{k} {v}" for k, v in sent.items()) + (f"; send errors {len(send_errors)}" if send_errors else ""))
    print(f"study statuses: {statuses}; SRs at PACS {srs}; failed jobs {failed_jobs}; undelivered SRs {undelivered}; "
          f"error log lines {len(errors)}")
    print(f"SRs at PACS: {srs} files, {len(sr_uids)} distinct SOP instances, {len(per_study)} studies, "
          f"{sum(n > 1 for n in per_study.values())} studies with more than one SR, "
          f"{sum(n > 1 for n in versions.values())} duplicated (study, version) pairs")
    print(f"queue depth (unfinished studies) while sending: max {max((s.unfinished for s in during), default=0)}, "
          f"max in first third {first_max}, in last third {last_max}; drained {drain_s:.0f} s after sending stopped "
          f"-> {'bounded' if bounded else 'NOT BOUNDED'}")
    # Each study is sent once, in one go: a second SR for a study means it was processed twice.
    extra_srs = sum(n - 1 for n in per_study.values())
    ok = failed == 0 and not send_errors and undelivered == 0 and extra_srs == 0
    print(f"failed studies: {failed}, extra SRs: {extra_srs} (goal 0 and 0) -> {'OK' if ok else 'FAIL'}")
    print(f"serve RSS: start {rss_start:.0f} MiB, end {rss_end:.0f} MiB, peak (VmHWM) {hwm:.0f} MiB "
          f"(goal < 1024) -> {'OK' if hwm < 1024 else 'ABOVE GOAL'}")
    print(f"libtorch mapped in serve process: {'YES ' + ', '.join(torch_libs) if torch_libs else 'no'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
