"""Read-only study commands: studies, show."""

from __future__ import annotations

import argparse
import json

from osteogate.gateway.core.errors import (
    NotFoundError,
)
from osteogate.gateway.operate.cli.common import (
    STUDY_STATUSES,
    Commands,
    add_config,
    admin_settings,
    admin_store,
    console,
    examples,
    study_ident,
    when,
)


def cmd_studies(args: argparse.Namespace) -> int:
    from osteogate.gateway.operate.queries import list_studies
    from rich.table import Table

    store = admin_store(args, migrate=False)
    try:
        rows = list_studies(store.db, limit=args.limit, status=args.status, since=args.since,
                            region=args.region, result=args.result)
    finally:
        store.dispose()
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    table = Table(title=f"{len(rows)} studies (newest first)")
    for column in ("study key", "study UID", "received", "instances", "status", "result", "SRs", "delivered"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["study_key"], row["study_uid"], row["last_received_at"].strftime("%Y-%m-%d %H:%M:%S"),
                      str(row["instances"]), row["status"], row["result"] or "-", str(row["sr_versions"]),
                      row["delivered"] or "-")
    console().print(table)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from osteogate.gateway.operate.queries import describe_study, study_record

    settings = admin_settings(args)
    store = admin_store(settings, migrate=False)
    try:
        if args.json:
            record = study_record(store.db, settings, args.study)
            text = None if record is None else json.dumps(record, indent=2, default=str)
        else:
            text = describe_study(store.db, settings, args.study)
    finally:
        store.dispose()
    if text is None:
        raise NotFoundError(f"no study {args.study}", "neither a Study Instance UID nor a study key in this store",
                            "`osteogate studies` lists keys and UIDs")
    print(text)
    return 0


def add_parsers(cmds: Commands) -> None:
    """studies, show."""
    studies = cmds.add_parser("studies", help="list studies", epilog=examples(
        "osteogate studies --data-dir /var/lib/osteogate", "osteogate studies --status failed --since 7d --json"))
    add_config(studies)
    studies.add_argument("--limit", type=int, default=50, help="at most this many, newest first (default 50)")
    studies.add_argument("--json", action="store_true", help="machine-readable output")
    studies.add_argument("--status", choices=STUDY_STATUSES, help="studies with this status")
    studies.add_argument("--since", type=when, help="last received at or after: 2026-01-31, ISO time, 7d, 12h")
    studies.add_argument("--region", help="region of the latest result (knee, spine)")
    studies.add_argument("--result", help="latest result: normal, osteopenia, osteoporosis or \"not assessed\"")
    studies.set_defaults(func=cmd_studies)

    show = cmds.add_parser("show", help="everything about one study", epilog=examples(
        "osteogate show 1.2.826.0.1.3680043.8.498.1234", "osteogate show 3f2a9c0d11e4b7a6 --json   # study_key from the logs"))
    add_config(show)
    show.add_argument("study", type=study_ident, metavar="STUDY", help="Study Instance UID, or the study_key the logs print")
    show.add_argument("--json", action="store_true", help="machine-readable output (every stored field)")
    show.set_defaults(func=cmd_show)
