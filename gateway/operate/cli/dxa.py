"""``osteogate dxa``: DXA results in from a CSV export, and what the store holds (hashed ids only).

The ground-truth stage (gateway/groundtruth) does the work; this module is its command line.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from osteogate.gateway.core.config import Settings
from osteogate.gateway.core.errors import OsteoGateError
from osteogate.gateway.core.logs import hashed
from osteogate.gateway.groundtruth.csvimport import COLUMNS, DxaImportError, import_csv
from osteogate.gateway.groundtruth.matching import load_pairs, patient_hash
from osteogate.gateway.operate.cli.common import Commands, add_config, admin_settings, admin_store, examples
from osteogate.gateway.store.dxa import DxaExam
from osteogate.gateway.store.wiring import Store
from sqlalchemy import select
from sqlalchemy.exc import OperationalError


def _open(args: argparse.Namespace, *, migrate: bool) -> tuple[Settings, Store]:
    settings = admin_settings(args)
    return settings, admin_store(settings, migrate=migrate)


def _old_schema(exc: OperationalError) -> OsteoGateError:
    return OsteoGateError("the database has no DXA tables", str(exc.orig).splitlines()[0] if exc.orig else None,
                          "Run `osteogate db upgrade` (or start `osteogate serve` once) to bring it up to date")


def cmd_dxa_import(args: argparse.Namespace) -> int:
    _, store = _open(args, migrate=True)  # it writes: the schema must be at head
    try:
        summary = import_csv(store.db, args.file)
    except DxaImportError as exc:
        for problem in exc.problems:
            print(f"{args.file.name}: {problem}", file=sys.stderr)
        raise
    finally:
        store.dispose()
    print(f"imported {args.file.name}: {summary.rows} row(s), {summary.exams} exam(s): {summary.new} new, "
          f"{summary.unchanged} already present, {summary.updated} updated")
    return 0


def _exams(store: Store, limit: int | None = None) -> list[DxaExam]:
    query = select(DxaExam).order_by(DxaExam.dxa_date.desc(), DxaExam.id.desc())
    if limit:
        query = query.limit(limit)
    try:
        with store.db.session() as session:
            exams = list(session.execute(query).scalars())
            for exam in exams:
                _ = exam.sites  # loaded while the session is open
            return exams
    except OperationalError as exc:
        raise _old_schema(exc) from None


def cmd_dxa_list(args: argparse.Namespace) -> int:
    _, store = _open(args, migrate=False)
    try:
        exams = _exams(store, args.limit)
    finally:
        store.dispose()
    rows = [{"exam": hashed(e.exam_key), "patient": patient_hash(e.patient_id, e.issuer_of_patient_id),
             "dxa_date": e.dxa_date.isoformat(), "source": e.source, "lowest_t_score": e.lowest_t_score,
             "who_category": e.who_category, "sites": {s.site: s.t_score for s in e.sites}} for e in exams]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{len(rows)} DXA exam(s), newest first (patients as salted hashes)")
    for row in rows:
        sites = ", ".join(f"{name} {value:+.1f}" for name, value in row["sites"].items())
        print(f"  {row['dxa_date']}  patient {row['patient']}  {row['source']:<4} lowest {row['lowest_t_score']:+.1f} "
              f"{row['who_category']:<12} {sites}")
    return 0


def cmd_dxa_stats(args: argparse.Namespace) -> int:
    settings, store = _open(args, migrate=False)
    try:
        exams = _exams(store)
        match_days = settings.groundtruth.match_days if args.match_days is None else args.match_days
        pairs = load_pairs(store.db, match_days=match_days)
    finally:
        store.dispose()
    stats = {
        "exams": len(exams),
        "patients": len({(e.patient_id, e.issuer_of_patient_id) for e in exams}),
        "sites": sum(len(e.sites) for e in exams),
        "by_category": dict(Counter(e.who_category for e in exams)),
        "by_source": dict(Counter(e.source for e in exams)),
        "first_dxa_date": min((e.dxa_date for e in exams), default=None),
        "last_dxa_date": max((e.dxa_date for e in exams), default=None),
        "match_days": match_days,
        "pairs": len(pairs),
        "assessed_pairs": sum(1 for p in pairs if p.assessed),
        "paired_patients": len({p.patient_hash for p in pairs}),
    }
    if args.json:
        print(json.dumps(stats, indent=2, default=str))
        return 0
    print(f"DXA exams: {stats['exams']} of {stats['patients']} patient(s), {stats['sites']} site(s), "
          f"{stats['first_dxa_date'] or '-'} .. {stats['last_dxa_date'] or '-'}")
    print("  by WHO category: " + (", ".join(f"{k} {v}" for k, v in sorted(stats["by_category"].items())) or "-"))
    print("  by source: " + (", ".join(f"{k} {v}" for k, v in sorted(stats["by_source"].items())) or "-"))
    print(f"screened studies paired within {match_days} days: {stats['pairs']} "
          f"({stats['assessed_pairs']} assessed) of {stats['paired_patients']} patient(s)")
    return 0


def _add_options(parser: argparse.ArgumentParser, *, json_output: bool = True) -> None:
    add_config(parser)
    if json_output:
        parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def add_parsers(cmds: Commands) -> None:
    """Register ``osteogate dxa import|list|stats``."""
    dxa = cmds.add_parser("dxa", help="DXA results (ground truth): import a CSV export, list, counts",
                          epilog=examples("osteogate dxa import dxa-2025.csv --config /etc/osteogate/osteogate.toml",
                                          "osteogate dxa stats --data-dir ./var"))
    actions = dxa.add_subparsers(dest="dxa_command", required=True, metavar="ACTION")
    text = f"import DXA results from a CSV file (columns {','.join(COLUMNS)}; dates YYYYMMDD)"
    imp = actions.add_parser("import", help=text, description=text + ". Every row is checked first: any bad row "
                             "(named with its line number) and nothing is imported; importing again adds nothing.")
    imp.add_argument("file", type=Path, metavar="FILE.csv", help="the CSV export (UTF-8, header row first)")
    _add_options(imp, json_output=False)
    imp.set_defaults(func=cmd_dxa_import)
    text = "list DXA exams, newest first (patients as salted hashes, never identifiers)"
    listing = actions.add_parser("list", help=text, description=text)
    _add_options(listing)
    listing.add_argument("--limit", type=int, default=50, metavar="N", help="at most N exams (default 50; 0: all)")
    listing.set_defaults(func=cmd_dxa_list)
    text = "counts: exams, patients, WHO categories, sources, and screened studies paired with a DXA exam"
    stats = actions.add_parser("stats", help=text, description=text)
    _add_options(stats)
    stats.add_argument("--match-days", type=int, metavar="DAYS",
                       help="pairing window either side (default groundtruth.match_days, 365)")
    stats.set_defaults(func=cmd_dxa_stats)
