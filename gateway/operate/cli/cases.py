"""``osteogate cases``: the case-finding list a fracture-liaison nurse works through (one row a
patient, lowest estimated T-score first). The rows come from gateway/operate/case_list.py."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

from osteogate.gateway.core.backfill_config import check_date
from osteogate.gateway.core.errors import CannotCreate, UsageError
from osteogate.gateway.operate.cli.common import add_config, admin_settings, admin_store, examples

COLUMNS = ("patient_id", "issuer_of_patient_id", "study_date", "accession_number", "region", "t_score",
           "t_score_low", "t_score_high", "decision", "dxa_on_record", "last_dxa_date", "study_key")


def _date(value: str) -> str:
    try:
        return check_date(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_parsers(cmds: Any) -> None:
    """Register ``cases`` on the ``osteogate`` parser."""
    parser = cmds.add_parser("cases", help="case-finding list: one row a patient, lowest estimated T-score first",
                             epilog=examples("osteogate cases --decision referral --without-dxa-since 2023-01-01",
                                             "osteogate cases --since 2024-01-01 --csv /secure/share/cases.csv"))
    add_config(parser)
    parser.add_argument("--since", type=_date, metavar="DATE", help="studies dated on or after DATE (2024-01-01)")
    parser.add_argument("--decision", choices=["referral"], help="only patients whose latest result suggests DXA referral")
    parser.add_argument("--without-dxa-since", type=_date, metavar="DATE",
                        help="only patients with no DXA on record on or after DATE (needs the ground-truth DXA table)")
    out = parser.add_mutually_exclusive_group()
    out.add_argument("--csv", type=Path, metavar="FILE", help="write the rows as CSV to FILE")
    out.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.set_defaults(func=cmd_cases)


def cmd_cases(args: argparse.Namespace) -> int:
    from osteogate.gateway.operate.case_list import case_rows, dxa_table_exists

    settings = admin_settings(args)
    store = admin_store(settings, migrate=False)
    try:
        has_dxa = dxa_table_exists(store.db)
        if args.without_dxa_since and not has_dxa:
            raise UsageError("--without-dxa-since needs DXA results on record",
                             "this store has no dxa_exams table yet",
                             "Import DXA results first (osteogate dxa import), or leave the option out")
        rows, unidentified = case_rows(store.db, settings.storage.reports_dir, settings.storage.spool_dir,
                                       since=args.since, decision=args.decision,
                                       without_dxa_since=args.without_dxa_since)
    finally:
        store.dispose()
    records = [r.as_dict() for r in rows]
    if args.csv:
        try:
            with args.csv.open("w", newline="", encoding="utf-8") as handle:
                writer = csv.DictWriter(handle, fieldnames=COLUMNS)
                writer.writeheader()
                writer.writerows(records)
        except OSError as exc:
            raise CannotCreate(f"cannot write {args.csv}", exc.strerror or str(exc)) from None
        where = f"to {args.csv}"
    elif args.json:
        print(json.dumps(records, indent=2))
        where = "as JSON"
    else:
        _table(records)
        where = "above"
    notes = []
    if not has_dxa:
        notes.append("no DXA table in this store yet: dxa_on_record is 'unknown'")
    if unidentified:
        notes.append(f"{unidentified} screened study(ies) left out: their SR and images are gone, so no patient")
    # On stderr: stdout may be the JSON being piped.
    print(f"wrote {len(records)} row(s) {where}" + "".join(f"; {n}" for n in notes), file=sys.stderr)
    return 0


def _table(records: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="case-finding list (lowest estimated T-score first)")
    for column in ("patient", "study date", "accession", "region", "T-score [80 % interval]", "decision", "DXA"):
        table.add_column(column)
    for r in records:
        patient = r["patient_id"] + (f" ({r['issuer_of_patient_id']})" if r["issuer_of_patient_id"] else "")
        estimate = "-" if r["t_score"] is None else (
            f"{r['t_score']:.1f} [{r['t_score_low']:.1f}, {r['t_score_high']:.1f}]"
            if r["t_score_low"] is not None and r["t_score_high"] is not None else f"{r['t_score']:.1f}")
        dxa = {"yes": f"yes, {r['last_dxa_date']}", "no": "none", "unknown": "unknown"}[r["dxa_on_record"]]
        table.add_row(patient, r["study_date"], r["accession_number"], r["region"], estimate, r["decision"], dxa)
    Console(width=250 if not sys.stdout.isatty() else None).print(table)
