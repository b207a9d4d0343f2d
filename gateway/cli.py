"""``osteogate``: the one command admins use.

Gateway commands live here; training commands (train, evaluate, export, dataset) are registered
by training.cli, imported only to build the parser (it imports torch lazily in its handlers).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gateway.config import ConfigError, Destination, Settings, load_settings
from gateway.logs import configure_logging


def _destination(text: str) -> Destination:
    try:
        return Destination.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", type=Path, help="TOML configuration file (env: OSTEOGATE_CONFIG)")
    parser.add_argument("--data-dir", type=Path, help="spool, reports and SQLite file live here")
    parser.add_argument("--database-url", help="SQLAlchemy URL, e.g. postgresql+psycopg://user@host/db")


def settings_from_args(args: argparse.Namespace) -> Settings:
    overrides: dict[str, dict[str, Any]] = {}

    def put(section: str, key: str, value: Any) -> None:
        if value is not None and value != []:
            overrides.setdefault(section, {})[key] = value

    put("storage", "data_dir", getattr(args, "data_dir", None))
    put("storage", "database_url", getattr(args, "database_url", None))
    put("dicom", "ae_title", getattr(args, "aet", None))
    put("dicom", "port", getattr(args, "port", None))
    put("dicom", "bind", getattr(args, "bind", None))
    put("study", "stable_seconds", getattr(args, "stable_seconds", None))
    put("model", "path", str(args.model) if getattr(args, "model", None) else None)
    put("model", "backend", getattr(args, "backend", None))
    if getattr(args, "destination", None):
        put("delivery", "destinations", [d.model_dump() for d in args.destination])
    return load_settings(getattr(args, "config", None), overrides=overrides)


# -- commands ----------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from gateway.service import Gateway

    settings = settings_from_args(args)
    configure_logging(settings.logging.format, settings.logging.level)
    Gateway(settings).serve_forever()
    return 0


def cmd_echo(args: argparse.Namespace) -> int:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=args.calling_aet)
    ae.add_requested_context(Verification)
    assoc = ae.associate(args.peer.host, args.peer.port, ae_title=args.peer.ae_title)
    if not assoc.is_established:
        print(f"echo to {args.peer}: association failed", file=sys.stderr)
        return 2
    status = assoc.send_c_echo()
    assoc.release()
    code = int(status.Status) if status and "Status" in status else -1
    print(f"echo to {args.peer}: status 0x{code:04X}" if code >= 0 else f"echo to {args.peer}: no response")
    return 0 if code == 0 else 1


def _dicom_files(paths: Sequence[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")))
        else:
            files.append(path)
    return files


def cmd_send(args: argparse.Namespace) -> int:
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pynetdicom import AE

    files = _dicom_files(args.paths)
    datasets = []
    for path in files:
        try:
            datasets.append((path, pydicom.dcmread(path)))
        except (InvalidDicomError, OSError) as exc:
            print(f"skip {path}: not a DICOM file ({exc})", file=sys.stderr)
    ae = AE(ae_title=args.calling_aet)
    # Propose each file's own transfer syntax so compressed images travel untouched.
    contexts = {(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for _, ds in datasets}
    for sop_class, syntax in sorted(contexts):
        ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate(args.to.host, args.to.port, ae_title=args.to.ae_title)
    if not assoc.is_established:
        print(f"send to {args.to}: association failed", file=sys.stderr)
        return 2
    failures = 0
    try:
        for path, ds in datasets:
            status = assoc.send_c_store(ds)
            code = int(status.Status) if status and "Status" in status else -1
            ok = code == 0 or (code & 0xF000) == 0xB000
            failures += not ok
            print(f"{'ok  ' if ok else 'FAIL'} 0x{code & 0xFFFF:04X} {path}")
    finally:
        assoc.release()
    print(f"sent {len(datasets) - failures} of {len(files)} file(s) to {args.to}")
    return 0 if failures == 0 and len(datasets) == len(files) else 1


def _open_db(args: argparse.Namespace) -> Any:
    from gateway.db import Database

    settings = settings_from_args(args)
    db = Database(settings.storage.resolved_database_url())
    db.create_schema()
    return db


def cmd_studies(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from gateway.queries import list_studies

    rows = list_studies(_open_db(args), limit=args.limit)
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    table = Table(title=f"{len(rows)} studies (newest first)")
    for column in ("study key", "study UID", "received", "instances", "status", "result", "delivered"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["study_key"], row["study_uid"], row["last_received_at"].strftime("%Y-%m-%d %H:%M:%S"),
                      str(row["instances"]), row["status"], row["result"] or "-", row["delivered"] or "-")
    Console().print(table)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from gateway.queries import describe_study

    settings = settings_from_args(args)
    text = describe_study(_open_db(args), settings, args.study_uid)
    if text is None:
        print(f"no study {args.study_uid}", file=sys.stderr)
        return 1
    print(text)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from gateway.demo import run_demo

    return run_demo(model=args.model, timeout=args.timeout)


# -- parser ------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="osteogate", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the gateway (DICOM listener, worker, delivery)")
    _add_config(serve)
    serve.add_argument("--aet", help="the gateway's AE title")
    serve.add_argument("--port", type=int, help="DICOM port to listen on")
    serve.add_argument("--bind", help="address to listen on (default 0.0.0.0)")
    serve.add_argument("--destination", "--to", type=_destination, action="append", metavar="AET@HOST:PORT",
                       help="PACS that receives the SRs (repeatable)")
    serve.add_argument("--stable-seconds", type=float, help="quiet time after which a study is complete")
    serve.add_argument("--model", type=Path, help="checkpoint (.safetensors) to serve")
    serve.add_argument("--backend", choices=["auto", "onnx", "torch"], help="inference backend")
    serve.set_defaults(func=cmd_serve)

    echo = sub.add_parser("echo", help="C-ECHO a DICOM peer")
    echo.add_argument("peer", type=_destination, metavar="AET@HOST:PORT")
    echo.add_argument("--calling-aet", default="OSTEOGATE")
    echo.set_defaults(func=cmd_echo)

    send = sub.add_parser("send", help="C-STORE files or folders to a DICOM peer")
    send.add_argument("paths", type=Path, nargs="+")
    send.add_argument("--to", type=_destination, required=True, metavar="AET@HOST:PORT")
    send.add_argument("--calling-aet", default="OSTEOGATE")
    send.set_defaults(func=cmd_send)

    studies = sub.add_parser("studies", help="list studies")
    _add_config(studies)
    studies.add_argument("--limit", type=int, default=50)
    studies.add_argument("--json", action="store_true", help="machine-readable output")
    studies.set_defaults(func=cmd_studies)

    show = sub.add_parser("show", help="everything about one study")
    _add_config(show)
    show.add_argument("study_uid")
    show.set_defaults(func=cmd_show)

    demo = sub.add_parser("demo", help="gateway + local PACS on free ports; send sample_dicom/; print the SR")
    demo.add_argument("--model", type=Path)
    demo.add_argument("--timeout", type=float, default=180)
    demo.set_defaults(func=cmd_demo)

    try:
        from training.cli import register
    except ImportError:  # a serving-only install without the training package
        pass
    else:
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"osteogate: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"osteogate: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
