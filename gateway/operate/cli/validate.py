"""``osteogate validate``: the site's own validation of the gateway against its DXA results.

The figures are ``gateway.groundtruth.validation``'s; this module reads the pairs, shows progress
on stderr while bootstrapping, and prints text, JSON, or writes report.html + report.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import date, datetime
from pathlib import Path

from osteogate.gateway.core.errors import OsteoGateError, UsageError
from osteogate.gateway.groundtruth.matching import load_pairs
from osteogate.gateway.groundtruth.validation import FIGURES, validate
from osteogate.gateway.operate.cli.common import Commands, add_config, admin_settings, admin_store, examples
from sqlalchemy.exc import OperationalError


def _day(text: str) -> date:
    for fmt in ("%Y-%m-%d", "%Y%m%d"):
        try:
            return datetime.strptime(text.strip(), fmt).date()
        except ValueError:
            continue
    raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {text!r}")


def _card(settings: object) -> object | None:
    from osteogate.gateway.operate.preflight import resolve_model_path
    from osteogate.model.checkpoint import read_card

    try:
        path = resolve_model_path(settings, create_untrained=False)  # type: ignore[arg-type]
        return read_card(path) if path else None
    except (OsteoGateError, ValueError, OSError):
        return None  # the report then says the card claims nothing; validation itself needs no model


def _progress(done: int, total: int) -> None:
    print(f"bootstrap over patients: {done}/{total} resamples", file=sys.stderr, flush=True)


def _export_rows(args: argparse.Namespace, settings: object, pairs: list) -> int:
    from osteogate.gateway.operate.site_rows import collect_site_rows, write_site_rows

    store = admin_store(settings, migrate=False)  # type: ignore[arg-type]
    try:
        rows = collect_site_rows(settings, store, pairs,  # type: ignore[arg-type]
                                 progress=None if args.quiet else lambda d, n: print(
                                     f"reading paired studies: {d}/{n}", file=sys.stderr, flush=True))
    finally:
        store.dispose()
    from osteogate.gateway.operate.preflight import SHIPPED_MODEL

    write_site_rows(args.export_rows, rows)
    served = settings.model.path or SHIPPED_MODEL  # type: ignore[attr-defined]
    print(f"wrote {args.export_rows}: {len(rows['t'])} DXA-matched studies ({int(rows['skipped'])} no longer in "
          f"the spool or out of scope); refit with `osteogate refit-site {args.export_rows} --checkpoint {served} "
          f"--out site/osteogate-site.safetensors`", file=sys.stderr)
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    settings = admin_settings(args)
    if args.region and args.region not in ("knee", "spine"):
        raise UsageError(f"unknown region {args.region!r}", None, "Use --region knee or --region spine")
    store = admin_store(settings, migrate=False)
    try:
        pairs = load_pairs(store.db, match_days=settings.groundtruth.match_days, since=args.since, region=args.region)
    except OperationalError as exc:
        raise OsteoGateError("the database has no DXA tables", str(exc.orig).splitlines()[0] if exc.orig else None,
                             "Run `osteogate db upgrade` (or start `osteogate serve` once)") from None
    finally:
        store.dispose()
    filters = {k: str(v) for k, v in (("since", args.since), ("region", args.region)) if v}
    if args.export_rows:
        return _export_rows(args, settings, pairs)
    result = validate(pairs, card=_card(settings), n_boot=args.bootstrap, seed=args.seed,
                      progress=None if args.quiet else _progress, filters=filters)
    if args.out:
        from osteogate.gateway.groundtruth.validation_report import write_report

        html_path, json_path = write_report(result, args.out)
        print(f"wrote {html_path} and {json_path}", file=sys.stderr)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    print(f"{result.pairs} DXA-matched studies with a result, {result.patients} patients"
          f" ({result.pairs_without_figures} more not assessed)")
    for key in FIGURES:
        print(f"  {result.verdicts[key]}")
    if result.bland_altman:
        ba = result.bland_altman
        print(f"  Bland-Altman: bias {ba['bias']:+.2f}, limits of agreement {ba['loa_low']:+.2f} to {ba['loa_high']:+.2f}")
    print("intervals: 95 % bootstrap over patients; subgroups (sex, age band, region, manufacturer) in --json / --out")
    return 0


def add_parsers(cmds: Commands) -> None:
    """Register ``osteogate validate``."""
    text = "the site's own validation against its DXA results (AUCs, referral, calibration, T-score)"
    parser = cmds.add_parser("validate", help=text, description=text + ", beside the model card's claims.",
                             epilog=examples("osteogate validate --config /etc/osteogate/osteogate.toml",
                                             "osteogate validate --since 2026-01-01 --region knee --out ./validation",
                                             "osteogate validate --json"))
    add_config(parser)
    parser.add_argument("--since", type=_day, metavar="DATE", help="only studies on or after DATE (YYYY-MM-DD)")
    parser.add_argument("--region", metavar="R", help="only results of region R (knee, spine)")
    parser.add_argument("--out", type=Path, metavar="DIR", help="write report.html (self-contained) and report.json")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--bootstrap", type=int, default=1000, metavar="N", help="patient resamples (default 1000)")
    parser.add_argument("--seed", type=int, default=20261203, help="bootstrap seed (fixed: same pairs, same report)")
    parser.add_argument("--export-rows", type=Path, metavar="FILE.npz",
                        help="instead: write the site's refit data (covariates, image scores, DXA T-scores; "
                             "patients hashed) for `osteogate refit-site`")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    parser.set_defaults(func=cmd_validate)
