"""Maintenance commands: db, config check, selfcheck."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from osteogate.gateway.core.config import ConfigError, load_settings
from osteogate.gateway.core.errors import (
    ExitCode,
    UsageError,
)
from osteogate.gateway.operate.cli.common import Commands, add_config, admin_settings, admin_store, examples


def cmd_db(args: argparse.Namespace) -> int:
    from osteogate.gateway.store.migrations import current_revision, head_revision
    from osteogate.gateway.store.wiring import open_store

    settings = admin_settings(args)
    if args.db_command == "upgrade":
        store = open_store(settings, create=True, migrate=False)
        try:
            before, after = store.db.migrate()
        finally:
            store.dispose()
        print(f"database at {after} (was {before or 'empty or unversioned'})")
        return 0
    store = open_store(settings, create=False, migrate=False)
    try:
        with store.db.engine.connect() as connection:
            current = current_revision(connection)
    finally:
        store.dispose()
    head = head_revision()
    print(f"database at {current or 'no revision'}; head is {head}"
          + ("" if current == head else " (`osteogate db upgrade` brings it there)"))
    return ExitCode.OK if current == head else ExitCode.PARTIAL


def cmd_config_check(args: argparse.Namespace) -> int:
    from osteogate.gateway.operate.preflight import preflight_problems

    # FILE, or --config FILE as every other command takes it, or OSTEOGATE_CONFIG.
    args.file = args.file or args.config_file or (Path(os.environ["OSTEOGATE_CONFIG"])
                                                  if os.environ.get("OSTEOGATE_CONFIG") else None)
    if args.file is None:
        raise UsageError("config check needs a configuration file", None,
                         "Give it as FILE or --config FILE (or set OSTEOGATE_CONFIG)")
    exit_code = ExitCode.CONFIG
    try:
        settings = load_settings(args.file)
    except ConfigError as exc:
        problems = exc.problems
        exit_code = exc.exit_code  # a file that is not there: 66, as `serve --config` says
    else:
        problems = preflight_problems(settings, thorough=True)
    if problems:
        print(f"{args.file}: {len(problems)} problem(s):")
        for problem in problems:
            print(f"  - {problem}")
        return exit_code
    url = settings.storage.resolved_database_url()
    destinations = ", ".join(str(d) for d in settings.delivery.destinations) or "none"
    dicom = settings.dicom
    print(f"{args.file}: OK (environment overrides included)\n"
          f"  listener {dicom.ae_title} on {dicom.bind}:{dicom.port}"
          f"{' with TLS' if dicom.tls.enabled else ''}\n"
          f"  destinations {destinations}\n"
          f"  database {url.split(':', 1)[0]}, data_dir {settings.storage.data_dir}\n"
          f"  model {settings.model.path or 'shipped default'} ({settings.model.backend})\n"
          f"  retention {settings.retention.spool_days:g} days (0 = keep forever)")
    if not settings.delivery.destinations:
        print("  warning: no delivery.destinations: SRs are made but sent nowhere")
    if not dicom.allowed_calling_aets and not dicom.allowed_hosts:
        print("  warning: dicom.allowed_calling_aets and dicom.allowed_hosts are empty: any caller is accepted")
    hl7 = settings.groundtruth
    if hl7.mllp_enabled:
        print(f"  HL7 DXA results (MLLP) on {hl7.bind}:{hl7.mllp_port}{' with TLS' if hl7.tls_cert else ''}")
        if not hl7.allowed_hosts:
            print("  warning: groundtruth.allowed_hosts is empty: any host may send DXA results")
    return 0


def cmd_selfcheck(args: argparse.Namespace) -> int:
    from osteogate.gateway.operate.selfcheck import run_selfcheck

    settings = admin_settings(args)
    store = admin_store(settings, migrate=False)
    try:
        findings = run_selfcheck(settings, store.db)
    finally:
        store.dispose()
    for finding in findings:
        print(f"{'ok  ' if finding.ok else 'FAIL'} {finding.check}: {finding.detail}")
    return ExitCode.OK if all(f.ok for f in findings) else ExitCode.PARTIAL


def add_parsers(cmds: Commands) -> None:
    """db, config, selfcheck."""
    db = cmds.add_parser("db", help="database schema (Alembic migrations)",
                         epilog=examples("osteogate db current --config /etc/osteogate/osteogate.toml",
                                          "osteogate db upgrade --config /etc/osteogate/osteogate.toml"))
    db_sub = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    for name, text in (("upgrade", "apply migrations up to head (creates the database if needed)"),
                       ("current", "show the schema revision (never creates anything)")):
        action = db_sub.add_parser(name, help=text, description=text)
        add_config(action)
        action.set_defaults(func=cmd_db)

    config = cmds.add_parser("config", help="configuration tools",
                             epilog=examples("osteogate config check /etc/osteogate/osteogate.toml"))
    config_sub = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    text = "validate a configuration file (and what serve needs: model, certificates); list every problem"
    check = config_sub.add_parser("check", help=text, description=text)
    check.add_argument("file", type=Path, nargs="?", metavar="FILE",
                       help="the TOML file (environment overrides apply; default: OSTEOGATE_CONFIG)")
    check.add_argument("--config", dest="config_file", type=Path, metavar="FILE", help="the same, as other commands take it")
    check.set_defaults(func=cmd_config_check)

    selfcheck = cmds.add_parser("selfcheck", help="disk space, database, C-ECHO of each destination",
                                epilog=examples("osteogate selfcheck --config /etc/osteogate/osteogate.toml"))
    add_config(selfcheck)
    selfcheck.set_defaults(func=cmd_selfcheck)
