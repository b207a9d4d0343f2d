"""Decode per transfer syntax: the model-size decode against today's full decode and dcmtk, same run.

    .venv/bin/python benchmarks/decode.py [--size 2048] [--long-side 1024] [--repeats 7]

One radiograph (the knee sample enlarged to --size with seeded noise, tests/helpers/codecs.py) is
encoded in each transfer syntax; then, per syntax, interleaved and repeated:

* new:   pydicom.dcmread + model.pixels.dataset_to_image(ds, long_side): JPEG 2000 at a reduced
         resolution level, 8-bit JPEG with DCT scaling, the rest at full size; LUTs; resize.
* today: pydicom.dcmread + dataset_to_image(ds) (full decode, pydicom's default plugins, LUTs at
         full size) + resize_long_side to long_side: the worker's path before this change.
* dcmtk: dcmdjpeg (JPEG), dcmdjpls (JPEG-LS), dcmdrle (RLE) decompressing the file to a file
         (process start and file write included, so it favours us slightly; no J2K codec in dcmtk).

Printed: median ms of each, speed-up today/new and dcmtk/new, and the parity of the model image
(mean and max |new - today| in [0, 1]). Medians; the machine may be shared, so run it under nice
and compare ratios, never absolute times across runs.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
from _common import todays_decoders  # also puts the repo root on sys.path

from tests.helpers.codecs import SYNTAXES, encode, encoder_available, enlarged_sample

DCMTK = {"JPEG": "dcmdjpeg", "JPEG-LS": "dcmdjpls", "RLE": "dcmdrle"}


def dcmtk_tool(name: str) -> str | None:
    family = "JPEG-LS" if name.startswith("JPEG-LS") else name.split()[0]
    tool = DCMTK.get(family) if "2000" not in name else None
    return tool if tool and shutil.which(tool) else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048, help="rows and columns of the test image")
    parser.add_argument("--long-side", type=int, default=1024, help="model size (card working_size / size)")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    from osteogate.model.pixels import dataset_to_image
    from osteogate.model.preprocess import resize_long_side

    with tempfile.TemporaryDirectory(prefix="osteogate-bench-decode-") as tmp:
        work = Path(tmp)
        source = enlarged_sample("knee_dx", (args.size, args.size), seed=1)
        print(f"{args.size}x{args.size} knee radiograph (12-bit, VOI window), model long side {args.long_side}, "
              f"median of {args.repeats}\n")
        print(f"{'transfer syntax':<22}{'MB':>6}{'new ms':>9}{'today ms':>10}{'dcmtk ms':>10}"
              f"{'today/new':>11}{'dcmtk/new':>11}{'mean diff':>11}{'max diff':>10}")
        for name in SYNTAXES:
            if not encoder_available(name):
                print(f"{name:<22}(encoder missing: skipped)")
                continue
            path = encode(source, name, work)
            raw = path.read_bytes()
            tool = dcmtk_tool(name)

            def new(raw: bytes = raw) -> np.ndarray:
                return dataset_to_image(pydicom.dcmread(BytesIO(raw)), args.long_side)

            def today(raw: bytes = raw) -> np.ndarray:
                with todays_decoders():
                    return resize_long_side(dataset_to_image(pydicom.dcmread(BytesIO(raw))), args.long_side)

            def dcmtk(path: Path = path, tool: str | None = tool) -> None:
                subprocess.run([tool, str(path), str(work / "out.dcm")], check=True, capture_output=True)  # type: ignore[list-item]

            runs: dict[str, list[float]] = {"new": [], "today": [], "dcmtk": []}
            new(), today()  # warm-up (imports, plugin discovery, page cache)
            for _ in range(args.repeats):
                for label, func in (("new", new), ("today", today), ("dcmtk", dcmtk if tool else None)):
                    if func is None:
                        continue
                    t0 = time.perf_counter()
                    func()
                    runs[label].append(time.perf_counter() - t0)
            med = {k: statistics.median(v) * 1000 for k, v in runs.items() if v}
            difference = np.abs(new() - today())
            dcmtk_ms = f"{med['dcmtk']:>10.1f}" if "dcmtk" in med else f"{'n/a':>10}"
            dcmtk_ratio = f"{med['dcmtk'] / med['new']:>10.2f}x" if "dcmtk" in med else f"{'n/a':>11}"
            print(f"{name:<22}{len(raw) / 1e6:>6.2f}{med['new']:>9.1f}{med['today']:>10.1f}{dcmtk_ms}"
                  f"{med['today'] / med['new']:>10.2f}x{dcmtk_ratio}{difference.mean():>11.5f}{difference.max():>10.4f}")
            path.unlink()
    print("\ntoday/new > 1: the model-size decode is faster than today's path; dcmtk/new > 1: faster than dcmtk.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
