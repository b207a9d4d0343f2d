"""Seconds from the last C-STORE of a 2-image study to the SR arriving at the PACS.

    .venv/bin/python benchmarks/e2e_latency.py [--runs 5] [--warmup 1] [--stable-seconds 1] [--model FILE] [--size 2048]
                                               [--syntax "JPEG 2000 lossless"]

dcmtk storescu plays the modality and dcmtk storescp the PACS; `osteogate serve` runs as a
subprocess with a real SQLite file and spool. Prints each run and the median, with and without
the configured stable_seconds (the quiet time the gateway waits on purpose). --syntax sends the
images in another transfer syntax (names as in tests/helpers/codecs.py; default explicit VR LE).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import resolve_model  # puts the repo root on sys.path
from pydicom.uid import generate_uid

from tests.gateway_harness import GatewayProcess
from tests.helpers import StoreSCP, make_dataset, storescu
from tests.helpers.codecs import SYNTAXES, encode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1,
                        help="runs first, not counted (first inference, first association, page cache)")
    parser.add_argument("--stable-seconds", type=float, default=1.0)
    parser.add_argument("--size", type=int, default=2048, help="image rows and columns (16-bit)")
    parser.add_argument("--syntax", default="explicit LE", choices=list(SYNTAXES), help="transfer syntax sent")
    parser.add_argument("--model", type=Path, default=None,
                        help="default: the shipped checkpoint, else an untrained efficientnet_b0")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="osteogate-bench-") as tmp:
        work = Path(tmp)
        model = resolve_model(args.model, work)
        pacs = StoreSCP(work / "pacs").start()
        gateway = GatewayProcess(work / "gw", model=model, destinations=[f"PACS@127.0.0.1:{pacs.port}"],
                                 stable_seconds=args.stable_seconds,
                                 env={"OSTEOGATE_STUDY_CHECK_INTERVAL_SECONDS": "0.1",
                                      "OSTEOGATE_WORKER_POLL_INTERVAL_SECONDS": "0.1",
                                      "OSTEOGATE_DELIVERY_CHECK_INTERVAL_SECONDS": "0.2"})
        gateway.start(timeout=300)
        latencies = []
        try:
            for run in range(args.warmup + args.runs):
                study_uid = generate_uid()
                files = [encode(make_dataset(study_uid=study_uid, size=(args.size, args.size)), args.syntax,
                                work / f"run{run}_{i}") for i in range(2)]
                before = set(pacs.files("SR*.dcm"))
                sent = storescu(files, "127.0.0.1", gateway.port, "OSTEOGATE")
                t_last_store = time.monotonic()  # storescu returns after the last C-STORE response
                if sent.returncode != 0:
                    raise SystemExit(f"storescu failed: {sent.stdout}{sent.stderr}")
                while not (set(pacs.files("SR*.dcm")) - before):
                    if time.monotonic() - t_last_store > 120:
                        raise SystemExit("no SR within 120 s:\n" + gateway.log()[-3000:])
                    time.sleep(0.01)
                latency = time.monotonic() - t_last_store
                if run < args.warmup:
                    print(f"warm-up: {latency:.2f} s total (not counted)")
                    continue
                latencies.append(latency)
                print(f"run {run + 1 - args.warmup}: {latency:.2f} s total, {latency - args.stable_seconds:.2f} s beyond "
                      f"stable_seconds={args.stable_seconds:g}")
        finally:
            gateway.stop()
            pacs.stop()
        median = statistics.median(latencies)
        print(f"\n2-image study of {args.size}x{args.size} DX ({args.syntax}), model {model.name}:")
        print(f"median last C-STORE -> SR at PACS: {median:.2f} s "
              f"({median - args.stable_seconds:.2f} s excluding stable_seconds={args.stable_seconds:g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
