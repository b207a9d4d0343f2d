"""Method comparison on the SAME grouped folds: texture baseline (c) + saved network CV predictions.

    python -m osteogate.training.compare DATA --out DIR [--predictions NAME=FILE.npz ...]

Runs the LBP/GLCM + logistic-regression baseline through training/crossval.py (same pool, seed and
folds as `osteogate train --folds 5`), loads network out-of-fold predictions written by
`osteogate train --save-predictions`, and writes comparison.json plus one ROC figure.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
from osteogate.training.metrics import bootstrap, pooled_probs
from scipy.special import softmax

HEADLINE = ("accuracy", "precision_macro", "recall_macro", "f1_macro", "auc_low_bmd", "auc_osteoporosis",
            "sens_low_bmd_at_spec_0.80", "sens_low_bmd_at_spec_0.90", "ece")


def texture_cv(data: Path, working_size: int, folds: int, seed: int, cache_dir: Path | None) -> dict[str, np.ndarray]:
    from osteogate.training.crossval import TextureMethod, cross_validate
    from osteogate.training.pool import build_pool
    from osteogate.training.texture import feature_matrix

    pool = build_pool(data, working_size, cache_dir)
    features = feature_matrix(pool.images)
    result = cross_validate(pool, lambda: TextureMethod(features, 0.1, seed), "texture", folds, seed)
    return {"indices": result.indices, "y_true": result.y_true, "logits": result.logits,
            "temperatures": result.temperatures, "folds": result.folds, "seconds": np.array(result.seconds)}


def summarise(name: str, arrays: Any, n_boot: int) -> dict[str, Any]:
    logits, t = np.asarray(arrays["logits"]), np.asarray(arrays["temperatures"])
    if logits.ndim == 2:
        logits = logits[:, None]
    probs = softmax(logits / t[:, None, None], axis=-1).mean(axis=1)  # each fold's own temperature
    y = np.asarray(arrays["y_true"])
    metrics = bootstrap(y, probs, n_boot=n_boot)
    metrics["ece_before_calibration"] = bootstrap(y, pooled_probs(logits), n_boot=n_boot)["ece"]
    return {"method": name, "n_images": len(y), "metrics": metrics, "y": y, "probs": probs,
            "indices": np.asarray(arrays["indices"])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m osteogate.training.compare", description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--predictions", nargs="*", default=[], help="NAME=FILE.npz from --save-predictions")
    parser.add_argument("--working-size", type=int, default=1024)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--cache-dir", type=Path)
    args = parser.parse_args(argv)

    from osteogate.training.reports import plot_roc, write_json

    rows = [summarise("(c) texture LBP+GLCM + logistic regression",
                      texture_cv(args.data, args.working_size, args.folds, args.seed, args.cache_dir), args.bootstrap)]
    for item in args.predictions:
        name, _, path = item.partition("=")
        rows.append(summarise(name, np.load(path), args.bootstrap))
    reference = rows[0]["indices"]
    for row in rows[1:]:
        if not np.array_equal(np.sort(row["indices"]), np.sort(reference)):
            print(f"warning: {row['method']} was evaluated on other images than the texture baseline", file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    plot_roc(args.out / "methods_roc.png", {r["method"][:40]: (r["y"], r["probs"]) for r in rows},
             f"{args.folds}-fold grouped CV, same folds")
    table = [{"method": r["method"], "n_images": r["n_images"], **{k: r["metrics"][k] for k in HEADLINE if k in r["metrics"]},
              "ece_before_calibration": r["metrics"]["ece_before_calibration"]} for r in rows]
    write_json(args.out / "comparison.json", table)
    for r in table:
        figures = ", ".join(f"{k}={r[k]['value']:.3f} [{r[k]['ci_low']:.2f},{r[k]['ci_high']:.2f}]"
                            for k in ("accuracy", "f1_macro", "auc_low_bmd", "auc_osteoporosis") if k in r)
        print(f"{r['method']}: {figures}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
