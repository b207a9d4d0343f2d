"""``osteogate``: the one command admins use.

Gateway commands live here; training commands (train, evaluate, export, dataset) are registered
by training.cli, imported only to build the parser (it imports torch lazily in its handlers).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from osteogate.gateway.config import ConfigError, Destination, Settings, load_settings
from osteogate.gateway.logs import configure_logging


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
    from osteogate.gateway.service import Gateway

    settings = settings_from_args(args)
    configure_logging(settings.logging.format, settings.logging.level)
    Gateway(settings).serve_forever()
    return 0


def cmd_echo(args: argparse.Namespace) -> int:
    from osteogate.gateway.dicomnet import (
        AssociationError,
        association,
        client_ae,
        response_status,
        response_text,
    )
    from pynetdicom.sop_class import Verification

    ae = client_ae(args.calling_aet, 30)
    ae.add_requested_context(Verification)
    try:
        with association(ae, args.peer) as assoc:
            response = assoc.send_c_echo()
    except AssociationError as exc:
        print(f"echo to {args.peer}: {exc.detail}", file=sys.stderr)
        return 2
    code = response_status(response)
    print(f"echo to {args.peer}: status 0x{code:04X}" if code is not None else
          f"echo to {args.peer}: {response_text(response)}")
    return 0 if code == 0 else 1


def _is_dicom_file(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            return handle.read(132)[128:] == b"DICM"
    except OSError:
        return False


def _dicom_files(paths: Sequence[Path]) -> tuple[list[Path], list[Path]]:
    """(DICOM files, named files that are not DICOM). Folders are searched recursively and their
    non-DICOM files (READMEs, scripts) are passed over quietly; a file named outright must be DICOM."""
    files: list[Path] = []
    bad: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(p for p in sorted(path.rglob("*")) if p.is_file() and _is_dicom_file(p))
        elif _is_dicom_file(path):
            files.append(path)
        else:
            bad.append(path)
    return files, bad


def cmd_send(args: argparse.Namespace) -> int:
    import pydicom
    from osteogate.gateway.dicomnet import (
        AssociationError,
        association,
        client_ae,
        response_status,
        response_text,
        status_outcome,
    )
    from pydicom.uid import UID

    files, bad = _dicom_files(args.paths)
    for path in bad:
        print(f"skip {path}: not a DICOM file (no DICM preamble) or unreadable", file=sys.stderr)
    # Headers only: the pixel data is streamed from the file by pynetdicom, never held in memory.
    headers = {}
    for path in files:
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
            headers[path] = (UID(str(header.SOPClassUID)), UID(str(header.file_meta.TransferSyntaxUID)))
        except Exception as exc:  # noqa: BLE001 - one unreadable file must not stop the others
            print(f"skip {path}: unreadable DICOM header ({type(exc).__name__})", file=sys.stderr)
            bad.append(path)
    if not headers:
        print("nothing to send", file=sys.stderr)
        return 1
    ae = client_ae(args.calling_aet, 60)
    # Propose each file's own transfer syntax so compressed images travel untouched.
    contexts = sorted(set(headers.values()))
    if len(contexts) > 128:
        print(f"{len(contexts)} SOP class/transfer syntax pairs: more than one association allows (128); "
              "send in smaller groups", file=sys.stderr)
        return 2
    for sop_class, syntax in contexts:
        ae.add_requested_context(sop_class, syntax)
    failures = 0
    try:
        with association(ae, args.to) as assoc:
            accepted = {(cx.abstract_syntax, cx.transfer_syntax[0]) for cx in assoc.accepted_contexts}
            for done, (path, (sop_class, syntax)) in enumerate(headers.items()):
                if not assoc.is_established:  # the peer aborted: the rest was not sent
                    failures += len(headers) - done
                    print(f"FAIL association ended by {args.to.ae_title}: {len(headers) - done} file(s) not sent")
                    break
                if (sop_class, syntax) not in accepted:
                    failures += 1
                    print(f"FAIL not sent {path}: {args.to.ae_title} does not accept {sop_class.name} "
                          f"in {syntax.name}")
                    continue
                response = assoc.send_c_store(path)
                ok = status_outcome(response_status(response)).ok
                failures += not ok
                print(f"{'ok  ' if ok else 'FAIL'} {response_text(response)} {path}")
    except AssociationError as exc:
        print(f"send to {args.to}: {exc.detail}", file=sys.stderr)
        return 2
    print(f"sent {len(headers) - failures} of {len(headers)} DICOM file(s) to {args.to}")
    return 0 if failures == 0 and not bad else 1


def _when(text: str) -> datetime:
    """``7d`` / ``12h`` (ago), a date ``2026-01-31`` or an ISO time; naive values are UTC."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([dh])", text.strip())
    if match:
        amount = float(match[1])
        return datetime.now(UTC) - (timedelta(days=amount) if match[2] == "d" else timedelta(hours=amount))
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date (2026-01-31), a time, or 7d / 12h") from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _console() -> Any:
    """A terminal gets its own width; piped output gets wide lines, so UIDs are never wrapped."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=250)


def _admin_settings(args: argparse.Namespace) -> Settings:
    """Settings for a one-shot admin command; its logs go to stderr so stdout stays parseable."""
    settings = settings_from_args(args)
    configure_logging(settings.logging.format, "warning" if settings.logging.level == "info" else settings.logging.level)
    return settings


def _open_db(args: argparse.Namespace | Settings) -> Any:
    from osteogate.gateway.db import Database

    settings = args if isinstance(args, Settings) else _admin_settings(args)
    settings.storage.data_dir.mkdir(parents=True, exist_ok=True)  # where the SQLite file goes
    db = Database(settings.storage.resolved_database_url())
    db.migrate()
    return db


def cmd_studies(args: argparse.Namespace) -> int:
    from osteogate.gateway.queries import list_studies
    from rich.table import Table

    rows = list_studies(_open_db(args), limit=args.limit, status=args.status, since=args.since,
                        region=args.region, result=args.result)
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
    _console().print(table)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from osteogate.gateway.queries import describe_study

    settings = settings_from_args(args)
    text = describe_study(_open_db(args), settings, args.study_uid)
    if text is None:
        print(f"no study {args.study_uid}", file=sys.stderr)
        return 1
    print(text)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from osteogate.gateway.service import WorkerService

    settings = settings_from_args(args)
    configure_logging(settings.logging.format, settings.logging.level)
    WorkerService(settings).serve_forever()
    return 0


def _progress() -> Any:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    # On stderr: stdout carries the command's result, and may be piped.
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=Console(stderr=True), transient=False)


def _print_plan(plan: Sequence[Any], title: str) -> None:
    from rich.table import Table

    table = Table(title=title)
    for column in ("study key", "study UID", "status", "action"):
        table.add_column(column)
    for item in plan:
        table.add_row(item.study_key, item.study_uid, item.status,
                      "replay" if item.refusal is None else f"skip: {item.refusal}")
    _console().print(table)


def cmd_replay(args: argparse.Namespace) -> int:
    from osteogate.gateway.admin import plan_replay, queue_replay, wait_for_jobs
    from osteogate.gateway.db import JobStatus

    if not (args.study_uids or args.since or args.status):
        print("osteogate replay: name studies, or select them with --since / --status", file=sys.stderr)
        return 2
    if args.checkpoint and not args.checkpoint.is_file():
        raise FileNotFoundError(f"--model: checkpoint {args.checkpoint} does not exist")
    settings = _admin_settings(args)
    db = _open_db(settings)
    plan = plan_replay(db, args.study_uids, args.since, args.status)
    eligible = [c for c in plan if c.refusal is None]
    model = args.checkpoint or settings.model.path or "the served model"
    destinations = (", ".join(str(d) for d in settings.delivery.destinations)
                    or "where each study's earlier SRs went")
    _print_plan(plan, f"replay: {len(eligible)} of {len(plan)} studies, model {model}, SR to {destinations}")
    if args.dry_run or not eligible:
        print("dry run: nothing changed" if args.dry_run else "nothing to replay")
        return 0 if args.dry_run else 1
    job_ids = queue_replay(db, plan, args.checkpoint)
    worker = _replay_worker(settings, db, args.checkpoint)
    with _progress() as progress:
        task = progress.add_task("classifying", total=len(job_ids))
        states = wait_for_jobs(db, job_ids, lambda: worker.run_once(job_ids), args.timeout,
                               progress=lambda n: progress.advance(task, n))
    done = sum(s == JobStatus.DONE for s in states.values())
    failed = sum(s == JobStatus.FAILED for s in states.values())
    sent = _deliver_now(settings, db)
    print(f"replayed {done} of {len(job_ids)} studies ({failed} failed, "
          f"{len(job_ids) - done - failed} unfinished); {sent} SR delivery(ies) sent now")
    return 0 if done == len(job_ids) else 1


def _replay_worker(settings: Settings, db: Any, checkpoint: Path | None) -> Any:
    from osteogate.gateway.service import ClassifierCache
    from osteogate.gateway.spool import Spool
    from osteogate.gateway.worker import ClassifierWorker

    if checkpoint:
        # The replay checkpoint becomes this process's default too, so no other model is resolved
        # (or, with none configured, created) just to sit unused.
        settings = settings.model_copy(deep=True)
        settings.model.path = str(checkpoint.resolve())
    return ClassifierWorker(settings, db, Spool(settings.storage.spool_dir), Spool(settings.storage.reports_dir),
                            ClassifierCache(settings))


def _deliver_now(settings: Settings, db: Any) -> int:
    from osteogate.gateway.delivery import DeliveryManager
    from osteogate.gateway.spool import Spool

    return DeliveryManager(settings, db, Spool(settings.storage.reports_dir)).run_due()


def cmd_resend(args: argparse.Namespace) -> int:
    import time

    from osteogate.gateway.admin import delivery_states, latest_sr_result, requeue_latest

    settings = _admin_settings(args)
    db = _open_db(settings)
    _, sr_uid = latest_sr_result(db, args.study_uid)
    ids = requeue_latest(db, settings, args.study_uid, args.to or None)
    deadline = time.monotonic() + args.wait
    while True:
        _deliver_now(settings, db)
        states = delivery_states(db, ids)
        # A running gateway may be the one sending it: wait on the rows, not on our own attempt.
        if all(status != "pending" for _, status, _ in states) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    for destination, status, error in states:
        print(f"SR {sr_uid} -> {destination}: {status}" + (f" ({error})" if error else ""))
    return 0 if all(status == "sent" for _, status, _ in states) else 1


def cmd_purge(args: argparse.Namespace) -> int:
    from osteogate.gateway.admin import purge, purgeable_study_ids
    from osteogate.gateway.spool import Spool

    settings = _admin_settings(args)
    db = _open_db(settings)
    total = len(purgeable_study_ids(db, args.older_than))
    with _progress() as progress:
        task = progress.add_task("checking" if args.dry_run else "purging", total=total)
        report = purge(db, Spool(settings.storage.spool_dir), args.older_than, dry_run=args.dry_run,
                       progress=lambda n: progress.advance(task, n))
    verb = "would remove" if args.dry_run else "removed"
    print(f"{verb} {report.files} spooled file(s), {report.bytes / 2**20:.1f} MB, of {len(report.studies)} "
          f"study(ies) finished, delivered and older than {args.older_than:g} days (SRs and SQL rows kept)")
    for key in report.studies:
        print(f"  {key}")
    return 0


def cmd_db(args: argparse.Namespace) -> int:
    from osteogate.gateway.db import Database
    from osteogate.gateway.migrations import current_revision, head_revision

    settings = _admin_settings(args)
    settings.storage.data_dir.mkdir(parents=True, exist_ok=True)
    db = Database(settings.storage.resolved_database_url())
    try:
        if args.db_command == "upgrade":
            before, after = db.migrate()
            print(f"database at {after} (was {before or 'empty or unversioned'})")
            return 0
        with db.engine.connect() as connection:
            current = current_revision(connection)
        head = head_revision()
        print(f"database at {current or 'no revision'}; head is {head}")
        return 0 if current == head else 1
    finally:
        db.dispose()


def cmd_config_check(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args.file)
    except ConfigError as exc:
        print(f"{args.file}: {len(exc.problems)} problem(s):")
        for problem in exc.problems:
            print(f"  - {problem}")
        return 2
    problems = _semantic_problems(settings)
    if problems:
        print(f"{args.file}: {len(problems)} problem(s):")
        for problem in problems:
            print(f"  - {problem}")
        return 2
    url = settings.storage.resolved_database_url()
    destinations = ", ".join(str(d) for d in settings.delivery.destinations) or "none"
    print(f"{args.file}: OK (environment overrides included)\n"
          f"  listener {settings.dicom.ae_title} on {settings.dicom.bind}:{settings.dicom.port}\n"
          f"  destinations {destinations}\n"
          f"  database {url.split(':', 1)[0]}, data_dir {settings.storage.data_dir}\n"
          f"  model {settings.model.path or 'shipped default'} ({settings.model.backend})\n"
          f"  retention {settings.retention.spool_days:g} days (0 = keep forever)")
    return 0


def _semantic_problems(settings: Settings) -> list[str]:
    """What the schema cannot see: files that must exist."""
    problems = []
    if settings.model.path and not Path(settings.model.path).is_file():
        problems.append(f"model.path: checkpoint {settings.model.path} does not exist")
    return problems


def cmd_selfcheck(args: argparse.Namespace) -> int:
    from osteogate.gateway.selfcheck import run_selfcheck

    settings = _admin_settings(args)
    findings = run_selfcheck(settings, _open_db(settings))
    for finding in findings:
        print(f"{'ok  ' if finding.ok else 'FAIL'} {finding.check}: {finding.detail}")
    return 0 if all(f.ok for f in findings) else 1


def cmd_demo(args: argparse.Namespace) -> int:
    from osteogate.gateway.demo import run_demo

    return run_demo(model=args.model, timeout=args.timeout)


# -- parser ------------------------------------------------------------------------------------


_STUDY_STATUSES = ["receiving", "queued", "processing", "done", "skipped", "failed"]


def _add_admin_parsers(sub: Any) -> None:
    worker = sub.add_parser("worker", help="classifier + delivery only, no DICOM listener (scale-out)")
    _add_config(worker)
    worker.add_argument("--model", type=Path, help="checkpoint (.safetensors) to serve")
    worker.add_argument("--backend", choices=["auto", "onnx", "torch"], help="inference backend")
    worker.add_argument("--destination", "--to", type=_destination, action="append", metavar="AET@HOST:PORT")
    worker.set_defaults(func=cmd_worker)

    replay = sub.add_parser("replay", help="classify studies again from the spool and send a new SR version")
    _add_config(replay)
    replay.add_argument("study_uids", nargs="*", metavar="STUDY_UID")
    replay.add_argument("--since", type=_when, help="studies last received at or after this time")
    replay.add_argument("--status", choices=["done", "skipped", "failed"], help="studies with this status")
    replay.add_argument("--model", dest="checkpoint", type=Path, help="another checkpoint for these runs")
    replay.add_argument("--destination", "--to", type=_destination, action="append", metavar="AET@HOST:PORT",
                        help="PACS for the new SRs (default: delivery.destinations)")
    replay.add_argument("--dry-run", action="store_true", help="show what would be replayed, change nothing")
    replay.add_argument("--timeout", type=float, default=3600, help="seconds to wait for the runs")
    replay.set_defaults(func=cmd_replay)

    resend = sub.add_parser("resend", help="send the latest SR of a study again")
    _add_config(resend)
    resend.add_argument("study_uid")
    resend.add_argument("--to", type=_destination, action="append", metavar="AET@HOST:PORT",
                        help="send here instead of delivery.destinations (repeatable)")
    resend.add_argument("--wait", type=float, default=30, help="seconds to wait for the send")
    resend.set_defaults(func=cmd_resend)

    purge = sub.add_parser("purge", help="remove spooled images of finished, delivered, old studies")
    _add_config(purge)
    purge.add_argument("--older-than", type=float, required=True, metavar="DAYS")
    purge.add_argument("--dry-run", action="store_true")
    purge.set_defaults(func=cmd_purge)

    db = sub.add_parser("db", help="database schema (Alembic migrations)")
    db_sub = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    for name, text in (("upgrade", "apply migrations up to head"), ("current", "show the schema revision")):
        action = db_sub.add_parser(name, help=text)
        _add_config(action)
        action.set_defaults(func=cmd_db)

    config = sub.add_parser("config", help="configuration tools")
    config_sub = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    check = config_sub.add_parser("check", help="validate a configuration file; list every problem")
    check.add_argument("file", type=Path)
    check.set_defaults(func=cmd_config_check)

    selfcheck = sub.add_parser("selfcheck", help="disk space, database, C-ECHO of each destination")
    _add_config(selfcheck)
    selfcheck.set_defaults(func=cmd_selfcheck)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="osteogate", description="OsteoGate: DICOM gateway that screens knee and spine radiographs for low bone density.")
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
    studies.add_argument("--status", choices=_STUDY_STATUSES)
    studies.add_argument("--since", type=_when, help="last received at or after: 2026-01-31, ISO time, 7d, 12h")
    studies.add_argument("--region", help="region of the latest result (knee, spine)")
    studies.add_argument("--result", help="label of the latest result (normal, osteopenia, osteoporosis)")
    studies.set_defaults(func=cmd_studies)

    show = sub.add_parser("show", help="everything about one study")
    _add_config(show)
    show.add_argument("study_uid")
    show.set_defaults(func=cmd_show)

    _add_admin_parsers(sub)

    demo = sub.add_parser("demo", help="gateway + local PACS on free ports; send sample_dicom/; print the SR")
    demo.add_argument("--model", type=Path)
    demo.add_argument("--timeout", type=float, default=180)
    demo.set_defaults(func=cmd_demo)

    try:
        from osteogate.training.cli import register
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
