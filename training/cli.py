"""Training subcommands for the `osteogate` CLI: train, evaluate, export, dataset audit.

gateway/operate/cli.py imports this module on every CLI call just to build the parser, so nothing heavy
(torch, numpy, sklearn) is imported at module level: handlers import what they need.
Exit codes are the gateway's (sysexits.h, README "Exit codes"; training never imports the gateway,
so the numbers are repeated here): 0 success, 64 wrong option or configuration value, 65 data that
is not what it should be, 66 a named file that does not exist, 69 pretrained weights unavailable
(no network), 73 an output that cannot be written. Every failure is one line on stderr.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

EXIT_OK, EXIT_USAGE, EXIT_DATAERR, EXIT_NOINPUT, EXIT_UNAVAILABLE, EXIT_CANTCREAT = 0, 64, 65, 66, 69, 73


def _error(message: str) -> None:
    print(f"osteogate: {message}", file=sys.stderr)


def _failed(exc: BaseException, *, writing: Path | None = None) -> int:
    """One line for ``exc``, and its exit code: an input that is missing or unreadable 66, an
    output (``writing``, or a temporary file beside it) that cannot be written 73, anything else
    (bad data, unusable file) 65."""
    if isinstance(exc, OSError) and exc.filename is not None:
        name = Path(str(exc.filename))
        if writing is not None and (name == Path(writing) or name.parent == Path(writing).parent):
            _error(f"cannot write {writing}: {exc.strerror or exc}")
            return EXIT_CANTCREAT
        _error(f"cannot read {name}: {exc.strerror or exc}")
        return EXIT_NOINPUT
    _error(str(exc).strip() or type(exc).__name__)
    return EXIT_NOINPUT if isinstance(exc, FileNotFoundError) else EXIT_DATAERR


def _train_flags(parser: argparse.ArgumentParser) -> None:
    """Flags override the TOML config; default None means "not given" (config or built-in default wins)."""
    add = parser.add_argument
    add("--arch", dest="architecture", help="timm model name or osteogate_smallcnn (default efficientnet_b0)")
    add("--mode", choices=("whole", "patches"), help="whole image at --size, or patches of --patch-size (default)")
    add("--size", type=int, help="whole-image input size")
    add("--patch-size", type=int, dest="patch_size", help="patch side in pixels (default 128)")
    add("--patches", type=int, dest="patches_per_image", help="patches per image at evaluation/serving")
    add("--train-patches", type=int, dest="train_patches", help="random patches per image per training step")
    add("--working-size", type=int, dest="working_size", help="long side patches are cut from")
    add("--epochs", type=int, help="maximum epochs per fit (default 12; early stopping may end sooner)")
    add("--batch-size", type=int, dest="batch_size",
        help="images per step (default 16; x --train-patches network inputs in patches mode)")
    add("--lr", type=float, help="peak learning rate, AdamW with warm-up and cosine decay (default 2e-3)")
    add("--weight-decay", type=float, dest="weight_decay", help="AdamW weight decay (default 1e-4)")
    add("--patience", type=int, help="early stopping: epochs without validation improvement (default 4)")
    add("--folds", type=int, help="k-fold cross-validation before the final fit (0 = skip)")
    add("--seed", type=int, help="seed for splits, sampling and weights (default 0)")
    add("--threads", type=int, help="torch CPU threads (default 2; 1 on a machine shared with other jobs)")
    add("--balance", choices=("loss", "sampler", "none"),
        help="class imbalance: class-weighted loss (default), balanced sampler, or none")
    add("--target-sensitivity", type=float, dest="target_sensitivity", help="low-BMD operating point (default 0.90)")
    add("--osteoporosis-rule", choices=("label_f1", "specificity", "sensitivity"), dest="osteoporosis_rule",
        help="osteoporosis grade threshold: label_f1 (default: best reported-label macro-F1 at specificity >= "
             "--osteoporosis-specificity), specificity (that specificity as target), sensitivity (1.1.0 rule)")
    add("--osteoporosis-specificity", type=float, dest="osteoporosis_specificity",
        help="osteoporosis specificity floor/target (default 0.80)")
    add("--pretrained", action="store_true", default=None, help="timm hub weights (needs network access)")
    add("--init-from", dest="init_from", help="local backbone weights (.safetensors or .pth state dict)")
    add("--bootstrap", type=int, help="bootstrap resamples for CIs (default 1000)")
    add("--no-progress", dest="progress", action="store_false", default=None,
        help="no progress bars (for logs and CI)")


def register(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser("train", help="train (and cross-validate) a model; writes checkpoint + card + report")
    train.add_argument("data", type=Path, help="manifest CSV, folder with manifest.csv, or region/label/* folders")
    train.add_argument("--config", type=Path, help="TOML file ([train] table); flags override it")
    train.add_argument("--out", type=Path, default=Path("model/trained/osteogate.safetensors"),
                       help="checkpoint to write; its card and report go beside it (default %(default)s)")
    train.add_argument("--report-dir", type=Path, help="plots (default: next to --out)")
    train.add_argument("--cache-dir", type=Path, help="decoded-image cache (default /tmp/osteogate-cache)")
    train.add_argument("--save-predictions", type=Path, help="write out-of-fold CV predictions (.npz)")
    train.add_argument("--cv-only", action="store_true", help="cross-validate only (method comparison): no final model")
    _train_flags(train)
    train.set_defaults(func=train_command)

    evaluate = subparsers.add_parser("evaluate", help="metrics with 95%% CIs, plots and JSON for a checkpoint")
    evaluate.add_argument("checkpoint", type=Path, help="a .safetensors checkpoint made by osteogate train")
    evaluate.add_argument("data", type=Path, help="manifest CSV, folder with manifest.csv, or region/label/* folders")
    evaluate.add_argument("--out", type=Path, default=Path("evaluation"), help="output folder")
    evaluate.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for CIs")
    evaluate.add_argument("--gradcam", type=int, default=8, help="Grad-CAM sample images (0 = none)")
    evaluate.add_argument("--cache-dir", type=Path, help="decoded-image cache (default /tmp/osteogate-cache)")
    evaluate.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    evaluate.set_defaults(func=evaluate_command)

    export = subparsers.add_parser("export", help="write the ONNX sibling of a checkpoint and check parity")
    export.add_argument("checkpoint", type=Path, help="a .safetensors checkpoint made by osteogate train")
    export.add_argument("--onnx", type=Path, help="output path (default: <checkpoint stem>.onnx)")
    export.add_argument("--atol", type=float, default=1e-4,
                        help="largest difference in probability allowed between torch and ONNX (default %(default)g)")
    export.set_defaults(func=export_command)

    site = subparsers.add_parser(
        "refit-site", help="refit the fusion heads on this site's DXA-matched studies (site card + report)",
        description="Refit the fusion heads, calibration and referral threshold on the rows `osteogate validate "
                    "--export-rows` wrote, with the shipped model's grouped nested CV (patients as groups); the "
                    "image gets a place only where its added AUC interval excludes zero. Serve the result with "
                    "model.path.")
    site.add_argument("rows", type=Path, metavar="ROWS.npz", help="from osteogate validate --export-rows")
    site.add_argument("--checkpoint", type=Path, required=True, help="the served checkpoint (its weights are kept)")
    site.add_argument("--out", type=Path, required=True, help="site checkpoint to write (SITE_REPORT.md beside it)")
    site.add_argument("--bootstrap", type=int, default=1000, help="patient bootstrap resamples (default %(default)s)")
    site.add_argument("--seed", type=int, default=0, help="fold and bootstrap seed (default %(default)s)")
    site.set_defaults(func=refit_site_command)

    dataset = subparsers.add_parser("dataset", help="dataset tools")
    dataset_sub = dataset.add_subparsers(dest="dataset_command", required=True)
    audit = dataset_sub.add_parser("audit", help="duplicates, label conflicts, class balance, image sizes")
    audit.add_argument("data", type=Path, help="manifest CSV, folder with manifest.csv, or region/label/* folders")
    audit.add_argument("--phash-distance", type=int, default=4,
                       help="perceptual-hash distance at or below which two images are duplicates (default %(default)s)")
    audit.add_argument("--working-size", type=int, default=1024, help="long side images are read at (default %(default)s)")
    audit.add_argument("--cache-dir", type=Path, help="decoded-image cache (default /tmp/osteogate-cache)")
    audit.set_defaults(func=audit_command)


def train_command(args: argparse.Namespace) -> int:
    from osteogate.training.config import TrainConfig, load_config

    flags = {name: getattr(args, name, None) for name in TrainConfig.__dataclass_fields__ if name != "augment"}
    try:
        config = load_config(args.config, flags)
    except (OSError, ValueError) as exc:
        _error(f"configuration: {exc}")
        return EXIT_USAGE
    from osteogate.training.data import DataError
    from osteogate.training.networks import PretrainedUnavailable
    from osteogate.training.pipeline import run_training

    command = "osteogate " + " ".join(shlex.quote(a) for a in getattr(args, "argv", sys.argv[1:]))
    try:
        run_training(args.data, config, args.out, args.report_dir, command, args.cache_dir, args.save_predictions,
                     args.cv_only)
    except PretrainedUnavailable as exc:
        _error(f"--pretrained: {exc}")
        return EXIT_UNAVAILABLE
    except (DataError, OSError, ValueError) as exc:
        return _failed(exc, writing=args.out)
    return EXIT_OK


def refit_site_command(args: argparse.Namespace) -> int:
    from osteogate.training.site_refit import refit_site

    try:
        checkpoint, report = refit_site(args.rows, args.checkpoint, args.out, seed=args.seed, n_boot=args.bootstrap,
                                        log=lambda line: print(line, file=sys.stderr, flush=True))
    except (OSError, ValueError, KeyError) as exc:
        return _failed(exc, writing=args.out)
    print(f"wrote {checkpoint}, its ONNX sibling and {report}")
    return EXIT_OK


def evaluate_command(args: argparse.Namespace) -> int:
    from osteogate.training.data import DataError
    from osteogate.training.evaluate import evaluate_checkpoint, format_metrics

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        report = evaluate_checkpoint(args.checkpoint, args.data, args.out, args.bootstrap, args.gradcam, args.cache_dir)
    except (DataError, OSError, ValueError) as exc:
        return _failed(exc)
    print(f"{report['n_images']} images {report['class_counts']}, temperature {report['temperature']:.3f}")
    print(format_metrics(report["metrics"]))
    print(f"wrote {Path(args.out) / 'evaluation.json'} and {len(report['plots'])} plots")
    return EXIT_OK


def export_command(args: argparse.Namespace) -> int:
    from osteogate.model.export import check_parity, export_onnx

    try:
        onnx_path = export_onnx(args.checkpoint, args.onnx)
        difference = check_parity(args.checkpoint, onnx_path, args.atol)
    except (OSError, ValueError) as exc:
        return _failed(exc, writing=args.onnx)
    print(f"wrote {onnx_path}; parity max |p_torch - p_onnx| = {difference:.2e} (atol {args.atol:g})")
    return EXIT_OK


def audit_command(args: argparse.Namespace) -> int:
    from osteogate.training.audit import audit_table
    from osteogate.training.data import DataError

    try:
        print(audit_table(args.data, args.working_size, args.phash_distance, args.cache_dir))
    except (DataError, OSError) as exc:
        return _failed(exc)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m osteogate.training.cli", description=__doc__.splitlines()[0])
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
