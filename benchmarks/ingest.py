"""Ingest throughput: dcmtk storescu -> `osteogate serve` versus -> dcmtk storescp, same files.

    .venv/bin/python benchmarks/ingest.py [--n 50] [--size 2048] [--j2k] [--repeat 3]

N DX instances (2048x2048 16-bit by default, ~8 MB each; --j2k: the same pixels as JPEG 2000
lossless) go over one association to each receiver in turn; runs alternate gateway/reference so
background load hits both alike, and the median of --repeat runs is reported.

The gateway runs with its worker disabled (OSTEOGATE_WORKER_ENABLED=false), so only the receive
path is measured: parse + validate, durable spool write (fsync file and directory) and the SQL row
(SQLite WAL, synchronous=FULL). The reference, dcmtk storescp, writes the files without fsync:
the ratio is the price of the gateway's durability plus its Python overhead. Goal: >= 0.9x.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
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


def timed_send(files: list[Path], port: int, called_aet: str) -> float:
    t0 = time.perf_counter()
    result = storescu(files, "127.0.0.1", port, called_aet, timeout=600)
    elapsed = time.perf_counter() - t0
    if result.returncode != 0:
        raise SystemExit(f"storescu to {called_aet} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50, help="instances per run")
    parser.add_argument("--size", type=int, default=2048, help="rows and columns (16-bit)")
    parser.add_argument("--j2k", action="store_true", help="send JPEG 2000 lossless instead of native")
    parser.add_argument("--repeat", type=int, default=3, help="runs per receiver (median reported)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="osteogate-bench-ingest-") as tmp:
        work = Path(tmp)
        files = make_files(work, args.n, args.size, args.j2k)
        total = sum(f.stat().st_size for f in files)
        kind = "JPEG 2000 lossless" if args.j2k else "explicit VR LE"
        print(f"{args.n} x {args.size}x{args.size} 16-bit DX ({kind}), {mb(total):.1f} MB per run")
        gateway_s, reference_s = [], []
        for run in range(args.repeat):
            # A fresh receiver and an empty directory per run: both write new files every time.
            pacs = StoreSCP(work / f"ref{run}").start()
            try:
                reference_s.append(timed_send(files, pacs.port, pacs.ae_title))
            finally:
                pacs.stop()
                shutil.rmtree(work / f"ref{run}", ignore_errors=True)
            gateway = GatewayProcess(work / f"gw{run}", model=work / "unused.safetensors",
                                     env={"OSTEOGATE_WORKER_ENABLED": "false"}).start(timeout=120)
            try:
                gateway_s.append(timed_send(files, gateway.port, "OSTEOGATE"))
                stored = len(list((work / f"gw{run}" / "spool").rglob("*.dcm")))
            finally:
                gateway.stop()
            if stored != args.n:
                raise SystemExit(f"gateway stored {stored} of {args.n} instances")
            shutil.rmtree(work / f"gw{run}", ignore_errors=True)
            print(f"run {run + 1}: storescp {mb(total) / reference_s[-1]:7.1f} MB/s   "
                  f"osteogate {mb(total) / gateway_s[-1]:7.1f} MB/s")
        ref, gw = statistics.median(reference_s), statistics.median(gateway_s)
        print(f"\nmedian storescp (reference): {mb(total) / ref:.1f} MB/s, {args.n / ref:.1f} instances/s")
        print(f"median osteogate serve:      {mb(total) / gw:.1f} MB/s, {args.n / gw:.1f} instances/s")
        ratio = ref / gw
        print(f"ratio osteogate/storescp: {ratio:.2f}x (goal >= 0.9x) -> {'OK' if ratio >= 0.9 else 'BELOW GOAL'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
