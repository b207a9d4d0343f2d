"""Ingest throughput: dcmtk storescu -> `osteogate serve` versus -> dcmtk storescp, same files.

    .venv/bin/python benchmarks/ingest.py [--n 50] [--size 2048] [--j2k] [--repeat 3] [--busy-core]

N DX instances (2048x2048 16-bit by default, ~8 MB each; --j2k: the same pixels as JPEG 2000
lossless) go over one association to each receiver in turn; runs alternate gateway/reference so
background load hits both alike, and the median of --repeat runs is reported.

The gateway runs with its worker disabled (OSTEOGATE_WORKER_ENABLED=false), so only the receive
path is measured: parse + validate, durable spool write (fsync file and directory) and the SQL row
(SQLite WAL, synchronous=FULL). The reference, dcmtk storescp, writes the files without fsync:
the ratio is the price of the gateway's durability plus its Python overhead. Goal: >= 0.9x.

CPU per byte: the process CPU time (utime + stime from /proc/PID/stat) that each receiver spent
during the send, divided by the bytes sent, as CPU seconds per GB. Unlike MB/s this hardly
depends on what else runs on a shared machine, so it is the figure to compare between runs.
Goal: the gateway at most 3x storescp's CPU per byte (fsync kept).

``--busy-core``: a second process keeps one core busy for the whole run (a spinning Python loop),
as an ordinary background load would; both receivers run beside it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, mb  # noqa: F401  (puts the repo on sys.path)
from pydicom.uid import JPEG2000Lossless, generate_uid

from tests.gateway_harness import GatewayProcess
from tests.helpers import StoreSCP, make_dataset, storescu, write_dataset


def make_files(work: Path, n: int, size: int, j2k: bool) -> list[Path]:
    study, series = generate_uid(), generate_uid()
    template = make_dataset(study_uid=study, series_uid=series, size=(size, size), seed=1)
    if j2k:
        template.compress(JPEG2000Lossless)  # encode once; instances differ only in their UIDs
    files = []
    for i in range(n):
        ds = template.copy()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = i + 1
        files.append(write_dataset(ds, work / "in" / f"{i:04d}.dcm"))
    return files


def cpu_seconds(pid: int) -> float:
    """utime + stime of process ``pid`` (all its threads), from /proc/PID/stat, in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state is field 3
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed_send(files: list[Path], port: int, called_aet: str, pid: int) -> tuple[float, float]:
    """(wall seconds, receiver CPU seconds) for sending ``files`` over one association."""
    cpu0 = cpu_seconds(pid)
    t0 = time.perf_counter()
    result = storescu(files, "127.0.0.1", port, called_aet, timeout=600)
    elapsed = time.perf_counter() - t0
    if result.returncode != 0:
        raise SystemExit(f"storescu to {called_aet} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    # The C-STORE answer for the last instance leaves after its fsync and SQL commit: the CPU
    # for every byte is spent by the time storescu exits.
    return elapsed, cpu_seconds(pid) - cpu0


def busy_core() -> subprocess.Popen[bytes]:
    """A process that keeps one core busy until it is killed."""
    return subprocess.Popen([sys.executable, "-c", "while True:\n    pass"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50, help="instances per run")
    parser.add_argument("--size", type=int, default=2048, help="rows and columns (16-bit)")
    parser.add_argument("--j2k", action="store_true", help="send JPEG 2000 lossless instead of native")
    parser.add_argument("--repeat", type=int, default=3, help="runs per receiver (median reported)")
    parser.add_argument("--busy-core", action="store_true", help="keep one core busy with a second process")
    args = parser.parse_args()
    spinner = busy_core() if args.busy_core else None
    try:
        return run(args)
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()


def run(args: argparse.Namespace) -> int:

    with tempfile.TemporaryDirectory(prefix="osteogate-bench-ingest-") as tmp:
        work = Path(tmp)
        files = make_files(work, args.n, args.size, args.j2k)
        total = sum(f.stat().st_size for f in files)
        gb = total / 1e9
        kind = "JPEG 2000 lossless" if args.j2k else "explicit VR LE"
        print(f"{args.n} x {args.size}x{args.size} 16-bit DX ({kind}), {mb(total):.1f} MB per run"
              + (", one core kept busy by a second process" if args.busy_core else ""))
        gateway_s, reference_s, gateway_cpu, reference_cpu = [], [], [], []
        for run in range(args.repeat):
            # A fresh receiver and an empty directory per run: both write new files every time.
            pacs = StoreSCP(work / f"ref{run}").start()
            try:
                assert pacs._proc is not None
                wall, cpu = timed_send(files, pacs.port, pacs.ae_title, pacs._proc.pid)
                reference_s.append(wall)
                reference_cpu.append(cpu)
            finally:
                pacs.stop()
                shutil.rmtree(work / f"ref{run}", ignore_errors=True)
            gateway = GatewayProcess(work / f"gw{run}", model=work / "unused.safetensors",
                                     env={"OSTEOGATE_WORKER_ENABLED": "false"}).start(timeout=120)
            try:
                assert gateway.proc is not None
                wall, cpu = timed_send(files, gateway.port, "OSTEOGATE", gateway.proc.pid)
                gateway_s.append(wall)
                gateway_cpu.append(cpu)
                stored = len(list((work / f"gw{run}" / "spool").rglob("*.dcm")))
            finally:
                gateway.stop()
            if stored != args.n:
                raise SystemExit(f"gateway stored {stored} of {args.n} instances")
            shutil.rmtree(work / f"gw{run}", ignore_errors=True)
            print(f"run {run + 1}: storescp {mb(total) / reference_s[-1]:7.1f} MB/s "
                  f"{reference_cpu[-1] / gb:6.2f} CPU s/GB   osteogate {mb(total) / gateway_s[-1]:7.1f} MB/s "
                  f"{gateway_cpu[-1] / gb:6.2f} CPU s/GB")
        ref, gw = statistics.median(reference_s), statistics.median(gateway_s)
        print(f"\nmedian storescp (reference): {mb(total) / ref:.1f} MB/s, {args.n / ref:.1f} instances/s")
        print(f"median osteogate serve:      {mb(total) / gw:.1f} MB/s, {args.n / gw:.1f} instances/s")
        ratio = ref / gw
        print(f"ratio osteogate/storescp: {ratio:.2f}x (goal >= 0.9x) -> {'OK' if ratio >= 0.9 else 'BELOW GOAL'}")
        ref_cpu, gw_cpu = statistics.median(reference_cpu) / gb, statistics.median(gateway_cpu) / gb
        cpu_ratio = gw_cpu / ref_cpu if ref_cpu else float("inf")
        print(f"CPU per GB received (process utime+stime): storescp {ref_cpu:.2f} s/GB, osteogate {gw_cpu:.2f} s/GB")
        print(f"CPU ratio osteogate/storescp: {cpu_ratio:.2f}x (goal <= 3x) -> "
              f"{'OK' if cpu_ratio <= 3 else 'ABOVE GOAL'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
