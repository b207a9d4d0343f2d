"""`osteogate dataset audit DATA`: duplicates, label conflicts, class balance and image sizes as a table."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
from osteogate.model.taxonomy import CLASSES
from osteogate.training.pool import build_pool


def _table(headers: list[str], rows: list[list[object]]) -> str:
    widths = [max(len(str(x)) for x in column) for column in zip(headers, *rows, strict=True)]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([line.format(*headers), line.format(*("-" * w for w in widths)), *(line.format(*map(str, r)) for r in rows)])


def audit_table(data: Path, working_size: int = 1024, phash_distance: int = 4, cache_dir: Path | None = None) -> str:
    from PIL import Image

    pool = build_pool(Path(data), working_size, cache_dir, phash_distance, "resolve")
    samples, dedup = pool.all_samples, pool.dedup
    out = [f"dataset {data}: {len(samples)} images, {len(np.unique(dedup.groups))} independent groups "
           f"({len(np.unique(pool.groups))} after the conflict rule)"]
    rows = []
    for source in sorted({s.source for s in samples}):
        members = [s for s in samples if s.source == source]
        counts = Counter(s.label for s in members)
        kept = sum(1 for s in pool.samples if s.source == source)
        kind = "binary" if source in pool.binary else "3-class"
        rows.append([source, kind, *(counts.get(c, 0) for c in CLASSES), len(members), kept,
                     ",".join(sorted({s.region for s in members}))])
    out += ["", _table(["source", "labels", *CLASSES, "images", "kept", "regions"], rows)]
    sizes = []
    for sample in samples:
        try:
            with Image.open(sample.path) as image:
                sizes.append(image.size)
        except OSError:  # DICOM: Pillow cannot open it; the header has the size
            import pydicom

            header = pydicom.dcmread(sample.path, stop_before_pixels=True)
            sizes.append((int(header.Columns), int(header.Rows)))
    widths = np.array([w for w, _ in sizes])
    heights = np.array([h for _, h in sizes])
    out += ["", _table(["image size", "min", "median", "max"], [
        ["width", widths.min(), int(np.median(widths)), widths.max()],
        ["height", heights.min(), int(np.median(heights)), heights.max()],
    ])]
    _, group_sizes = np.unique(dedup.groups, return_counts=True)
    out += ["", _table(["duplicates", "count"], [
        ["groups with >1 image", int((group_sizes > 1).sum())],
        ["images in such groups", int(group_sizes[group_sizes > 1].sum())],
        # Each evidence type counts only the merges it added on top of the ones before it.
        ["merges by manifest group ids", dedup.manifest_links],
        ["+ merges by identical bytes/pixels", dedup.exact_pairs],
        [f"+ merges by perceptual hash <= {phash_distance} bits", dedup.near_pairs],
        ["label conflicts (groups)", len(dedup.conflicts)],
        ["  resolved to 3-class label", sum(c.action.startswith("resolved") for c in dedup.conflicts)],
        ["  dropped", sum(c.action == "dropped" for c in dedup.conflicts)],
        ["images kept for training", len(pool.samples)],
    ])]
    if dedup.conflicts:
        rows = []
        for conflict in dedup.conflicts[:15]:
            labels = "; ".join(f"{src}: {'/'.join(sorted(lbl))}" for src, lbl in conflict.labels.items())
            rows.append([conflict.group, len(conflict.members), labels, conflict.action])
        out += ["", _table(["group", "images", "labels by source", "action"], rows)]
        if len(dedup.conflicts) > 15:
            out.append(f"... {len(dedup.conflicts) - 15} more conflicts")
    return "\n".join(out)
