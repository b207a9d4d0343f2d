"""``osteogate``: the one command admins use.

Commands come in three groups (``osteogate --help``): serving (serve, worker, echo, send, demo),
operations (studies, show, replay, resend, purge, db, config, selfcheck) and model (train,
evaluate, export, dataset; registered by training.cli, which imports torch only in its handlers).

Every failure ends here as one line on stderr and a sysexits-style exit code (gateway/core/errors.py;
the table is in ``osteogate --help`` and README). ``OSTEOGATE_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import warnings
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from osteogate.gateway.core.config import ConfigError, Destination, Settings, load_settings
from osteogate.gateway.core.errors import (
    EXIT_CODE_MEANINGS,
    ExitCode,
    NotFoundError,
    PeerUnavailable,
    UsageError,
    translate,
)
from osteogate.gateway.core.logs import configure_logging
from osteogate.gateway.groundtruth.cli import add_parser as add_dxa_parser

# The three groups of `osteogate --help`; a command registered elsewhere lands in the group named
# for its registrar.
COMMAND_GROUPS: dict[str, tuple[str, ...]] = {
    "serving": ("serve", "worker", "echo", "send", "demo"),
    "operations": ("studies", "show", "replay", "resend", "purge", "db", "config", "selfcheck", "dxa"),
    "model": ("train", "evaluate", "export", "dataset"),
}


class _Parser(argparse.ArgumentParser):
    """argparse with the sysexits usage code (64) instead of 2, which also meant config errors."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(ExitCode.USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _destination(text: str) -> Destination:
    try:
        return Destination.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _dimse_destination(text: str) -> Destination:
    """AET@HOST:PORT only: for commands that speak DIMSE (echo, send)."""
    destination = _destination(text)
    if destination.kind != "dimse":
        raise argparse.ArgumentTypeError(f"{text!r}: this command needs AET@HOST:PORT (a DICOM peer), not a URL")
    return destination


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", type=Path, metavar="FILE",
                        help="TOML configuration file (env: OSTEOGATE_CONFIG)")
    parser.add_argument("--data-dir", type=Path, metavar="DIR",
                        help="storage.data_dir: spool, reports and the SQLite file live here (default ./var)")
    parser.add_argument("--database-url", metavar="URL",
                        help="storage.database_url, e.g. postgresql+psycopg://user@host/db (default: SQLite in DIR)")


def _add_to(parser: argparse.ArgumentParser, text: str, *, required: bool = False) -> None:
    """``--to AET@HOST:PORT`` (repeatable); ``--destination`` is its old name, hidden, kept for one release."""
    parser.add_argument("--to", type=_destination, action="append", metavar="AET@HOST:PORT|URL", required=required,
                        help=text)
    parser.add_argument("--destination", dest="to", type=_destination, action="append", help=argparse.SUPPRESS)


def _add_timeout(parser: argparse.ArgumentParser, default: float, text: str) -> None:
    """``--timeout SECONDS``; ``--wait`` is its old name (resend), hidden, kept for one release."""
    parser.add_argument("--timeout", type=float, default=default, metavar="SECONDS", help=f"{text} (default {default:g})")
    parser.add_argument("--wait", dest="timeout", type=float, help=argparse.SUPPRESS)


def settings_from_args(args: argparse.Namespace) -> Settings:
    overrides: dict[str, dict[str, Any]] = {}
    flags: dict[str, str] = {}

    def put(section: str, key: str, value: Any, flag: str) -> None:
        if value is not None and value != []:
            overrides.setdefault(section, {})[key] = value
            flags[f"{section}.{key}"] = flag

    put("storage", "data_dir", getattr(args, "data_dir", None), "--data-dir")
    put("storage", "database_url", getattr(args, "database_url", None), "--database-url")
    put("dicom", "ae_title", getattr(args, "aet", None), "--aet")
    put("dicom", "port", getattr(args, "port", None), "--port")
    put("dicom", "bind", getattr(args, "bind", None), "--bind")
    put("study", "stable_seconds", getattr(args, "stable_seconds", None), "--stable-seconds")
    put("model", "path", str(args.model) if getattr(args, "model", None) else None, "--model")
    put("model", "backend", getattr(args, "backend", None), "--backend")
    if getattr(args, "to", None) and getattr(args, "to_is_destinations", False):
        put("delivery", "destinations", [d.model_dump() for d in args.to], "--to")
    settings = load_settings(getattr(args, "config", None), overrides=overrides)
    for key, flag in flags.items():  # messages say "--data-dir", not just "the command line"
        settings._sources[key] = f"the command line ({flag})"
    return settings


def _admin_settings(args: argparse.Namespace) -> Settings:
    """Settings for a one-shot admin command; its logs go to stderr so stdout stays parseable."""
    settings = settings_from_args(args)
    configure_logging(settings.logging.format, "warning" if settings.logging.level == "info" else settings.logging.level)
    return settings


def _store(args: argparse.Namespace | Settings, *, migrate: bool) -> Any:
    """The existing store (never created here: only serve, worker and `db upgrade` create one)."""
    from osteogate.gateway.store.wiring import open_store

    settings = args if isinstance(args, Settings) else _admin_settings(args)
    return open_store(settings, create=False, migrate=migrate)


# -- serving -----------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from osteogate.gateway.operate.service import Gateway

    settings = settings_from_args(args)
    configure_logging(settings.logging.format, settings.logging.level)
    Gateway(settings).serve_forever()
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from osteogate.gateway.operate.service import WorkerService

    settings = settings_from_args(args)
    configure_logging(settings.logging.format, settings.logging.level)
    WorkerService(settings).serve_forever()
    return 0


def cmd_echo(args: argparse.Namespace) -> int:
    from osteogate.gateway.core.dicomnet import (
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
        raise PeerUnavailable(f"echo to {args.peer}: {exc.detail}") from None
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
    from osteogate.gateway.core.dicomnet import (
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
            with warnings.catch_warnings():  # pydicom's warnings quote file contents: the skip line says enough
                warnings.simplefilter("ignore")
                header = pydicom.dcmread(path, stop_before_pixels=True)
            headers[path] = (UID(str(header.SOPClassUID)), UID(str(header.file_meta.TransferSyntaxUID)))
        except Exception as exc:  # noqa: BLE001 - one unreadable file must not stop the others
            print(f"skip {path}: unreadable DICOM header ({type(exc).__name__})", file=sys.stderr)
            bad.append(path)
    if not headers:
        print("nothing to send", file=sys.stderr)
        return ExitCode.NOINPUT
    ae = client_ae(args.calling_aet, 60)
    # Propose each file's own transfer syntax so compressed images travel untouched.
    contexts = sorted(set(headers.values()))
    if len(contexts) > 128:
        print(f"{len(contexts)} SOP class/transfer syntax pairs: more than one association allows (128); "
              "send in smaller groups", file=sys.stderr)
        return ExitCode.USAGE
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
        raise PeerUnavailable(f"send to {args.to}: {exc.detail}") from None
    print(f"sent {len(headers) - failures} of {len(headers)} DICOM file(s) to {args.to}")
    return ExitCode.OK if failures == 0 and not bad else ExitCode.PARTIAL


def cmd_demo(args: argparse.Namespace) -> int:
    from osteogate.gateway.operate.demo import run_demo

    return run_demo(model=args.model, timeout=args.timeout, cards=args.cards)


# -- operations --------------------------------------------------------------------------------


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


def cmd_studies(args: argparse.Namespace) -> int:
    from osteogate.gateway.operate.queries import list_studies
    from rich.table import Table

    store = _store(args, migrate=False)
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
    _console().print(table)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from osteogate.gateway.operate.queries import describe_study, study_record

    settings = _admin_settings(args)
    store = _store(settings, migrate=False)
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
    from osteogate.gateway.operate.admin import plan_replay, queue_replay, wait_for_jobs
    from osteogate.gateway.store.db import JobStatus

    if not (args.study_uids or args.since or args.status):
        raise UsageError("osteogate replay: name studies, or select them with --since / --status")
    if args.checkpoint and not args.checkpoint.is_file():
        raise NotFoundError(f"--model: checkpoint {args.checkpoint} does not exist")
    settings = _admin_settings(args)
    store = _store(settings, migrate=True)
    db = store.db
    plan = plan_replay(db, args.study_uids, args.since, args.status)
    eligible = [c for c in plan if c.refusal is None]
    model = args.checkpoint or settings.model.path or "the served model"
    destinations = (", ".join(str(d) for d in settings.delivery.destinations)
                    or "where each study's earlier SRs went")
    _print_plan(plan, f"replay: {len(eligible)} of {len(plan)} studies, model {model}, SR to {destinations}")
    if args.dry_run or not eligible:
        print("dry run: nothing changed" if args.dry_run else "nothing to replay")
        return ExitCode.OK if args.dry_run else ExitCode.PARTIAL
    job_ids = queue_replay(db, plan, args.checkpoint)
    worker = _replay_worker(settings, store, args.checkpoint)
    with _progress() as progress:
        task = progress.add_task("classifying", total=len(job_ids))
        states = wait_for_jobs(db, job_ids, lambda: worker.run_once(job_ids), args.timeout,
                               progress=lambda n: progress.advance(task, n))
    done = sum(s == JobStatus.DONE for s in states.values())
    failed = sum(s == JobStatus.FAILED for s in states.values())
    sent = _deliver_now(settings, store)
    print(f"replayed {done} of {len(job_ids)} studies ({failed} failed, "
          f"{len(job_ids) - done - failed} unfinished); {sent} SR delivery(ies) sent now")
    return ExitCode.OK if done == len(job_ids) else ExitCode.PARTIAL


def _replay_worker(settings: Settings, store: Any, checkpoint: Path | None) -> Any:
    from osteogate.gateway.operate.service import ClassifierCache
    from osteogate.gateway.work.worker import ClassifierWorker

    if checkpoint:
        # The replay checkpoint becomes this process's default too, so no other model is resolved
        # (or, with none configured, created) just to sit unused.
        settings = settings.model_copy(deep=True)
        settings.model.path = str(checkpoint.resolve())
    return ClassifierWorker(settings, store.db, store.spool, store.reports, ClassifierCache(settings))


def _deliver_now(settings: Settings, store: Any) -> int:
    from osteogate.gateway.deliver.delivery import DeliveryManager

    return DeliveryManager(settings, store.db, store.reports).run_due()


def cmd_resend(args: argparse.Namespace) -> int:
    import time

    from osteogate.gateway.operate.admin import delivery_states, resend_latest

    settings = _admin_settings(args)
    store = _store(settings, migrate=True)
    sr_uid, plan = resend_latest(store.db, settings, args.study, args.to or None)
    for target in plan:
        if target.action == "skip":
            print(f"SR {sr_uid} -> {target.destination}: already delivered, not sent again "
                  f"(--to {target.destination} sends it anyway)")
    ids = [t.delivery_id for t in plan if t.delivery_id is not None]
    states: list[tuple[str, str, str | None]] = []
    deadline = time.monotonic() + args.timeout
    while ids:
        _deliver_now(settings, store)
        states = delivery_states(store.db, ids)
        # A running gateway may be the one sending it: wait on the rows, not on our own attempt.
        if all(status != "pending" for _, status, _ in states) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    store.dispose()
    for destination, status, error in states:
        print(f"SR {sr_uid} -> {destination}: {status}" + (f" ({error})" if error else ""))
    return ExitCode.OK if all(status == "sent" for _, status, _ in states) else ExitCode.PARTIAL


def cmd_purge(args: argparse.Namespace) -> int:
    from osteogate.gateway.operate.admin import purge, purgeable_study_ids

    store = _store(args, migrate=True)
    total = len(purgeable_study_ids(store.db, args.older_than))
    with _progress() as progress:
        task = progress.add_task("checking" if args.dry_run else "purging", total=total)
        report = purge(store.db, store.spool, args.older_than, dry_run=args.dry_run,
                       progress=lambda n: progress.advance(task, n))
    store.dispose()
    verb = "would remove" if args.dry_run else "removed"
    print(f"{verb} {report.files} spooled file(s), {report.bytes / 2**20:.1f} MB, of {len(report.studies)} "
          f"study(ies) finished, delivered and older than {args.older_than:g} days (SRs and SQL rows kept)")
    for key in report.studies:
        print(f"  {key}")
    return 0


def cmd_db(args: argparse.Namespace) -> int:
    from osteogate.gateway.store.migrations import current_revision, head_revision
    from osteogate.gateway.store.wiring import open_store

    settings = _admin_settings(args)
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
    from osteogate.gateway.operate.service import preflight_problems

    try:
        settings = load_settings(args.file)
    except ConfigError as exc:
        problems = exc.problems
    else:
        problems = preflight_problems(settings, thorough=True)
    if problems:
        print(f"{args.file}: {len(problems)} problem(s):")
        for problem in problems:
            print(f"  - {problem}")
        return ExitCode.CONFIG
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
    return 0


def cmd_selfcheck(args: argparse.Namespace) -> int:
    from osteogate.gateway.operate.selfcheck import run_selfcheck

    settings = _admin_settings(args)
    store = _store(settings, migrate=False)
    try:
        findings = run_selfcheck(settings, store.db)
    finally:
        store.dispose()
    for finding in findings:
        print(f"{'ok  ' if finding.ok else 'FAIL'} {finding.check}: {finding.detail}")
    return ExitCode.OK if all(f.ok for f in findings) else ExitCode.PARTIAL


# -- parser ------------------------------------------------------------------------------------


_STUDY_STATUSES = ["receiving", "queued", "processing", "done", "skipped", "failed"]


def _examples(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


class _Commands:
    """Adds subcommands and remembers each one's group and one-line help for `osteogate --help`.

    training.cli.register receives it in place of argparse's subparsers object.
    """

    def __init__(self, sub: Any, group: str = "operations") -> None:
        self._sub = sub
        self.group = group
        self.listing: list[tuple[str, str, str]] = []  # (group, name, help)

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        text = kwargs.get("help", "").replace("%%", "%")  # help strings are %-formatted, these are not
        kwargs.setdefault("description", text[:1].upper() + text[1:] if text else None)
        group = next((g for g, names in COMMAND_GROUPS.items() if name in names), self.group)
        self.listing.append((group, name, text))
        return self._sub.add_parser(name, **kwargs)


def _serving_parsers(cmds: _Commands) -> None:
    serve = cmds.add_parser("serve", help="run the gateway (DICOM listener, worker, delivery)", epilog=_examples(
        "osteogate serve                                   # embedded defaults: port 11112, ./var, shipped model",
        "osteogate serve --config /etc/osteogate/osteogate.toml",
        "osteogate serve --bind 127.0.0.1 --to PACS@pacs.example.org:104"))
    _add_config(serve)
    serve.add_argument("--aet", metavar="AET", help="dicom.ae_title: the gateway's AE title (default OSTEOGATE)")
    serve.add_argument("--port", type=int, help="dicom.port: DICOM port to listen on (default 11112)")
    serve.add_argument("--bind", metavar="ADDRESS", help="dicom.bind: address to listen on (default 0.0.0.0)")
    _add_to(serve, "delivery.destinations: PACS that receives the SRs (repeatable)")
    serve.add_argument("--stable-seconds", type=float, metavar="SECONDS",
                       help="study.stable_seconds: quiet time after which a study is complete (default 10)")
    serve.add_argument("--model", type=Path, metavar="FILE", help="model.path: checkpoint (.safetensors) to serve")
    serve.add_argument("--backend", choices=["auto", "onnx", "torch"], help="model.backend: inference backend")
    serve.set_defaults(func=cmd_serve, to_is_destinations=True)

    worker = cmds.add_parser("worker", help="classifier + delivery only, no DICOM listener (scale-out)",
                             epilog=_examples("osteogate worker --config /etc/osteogate/osteogate.toml"))
    _add_config(worker)
    worker.add_argument("--model", type=Path, metavar="FILE", help="model.path: checkpoint (.safetensors) to serve")
    worker.add_argument("--backend", choices=["auto", "onnx", "torch"], help="model.backend: inference backend")
    _add_to(worker, "delivery.destinations: PACS that receives the SRs (repeatable)")
    worker.set_defaults(func=cmd_worker, to_is_destinations=True)

    echo = cmds.add_parser("echo", help="C-ECHO a DICOM peer", epilog=_examples("osteogate echo PACS@pacs.example.org:104"))
    echo.add_argument("peer", type=_dimse_destination, metavar="AET@HOST:PORT", help="the peer to echo")
    echo.add_argument("--calling-aet", default="OSTEOGATE", metavar="AET", help="our AE title (default OSTEOGATE)")
    echo.set_defaults(func=cmd_echo)

    send = cmds.add_parser("send", help="C-STORE files or folders to a DICOM peer", epilog=_examples(
        "osteogate send sample_dicom/ --to OSTEOGATE@127.0.0.1:11112"))
    send.add_argument("paths", type=Path, nargs="+", metavar="PATH", help="DICOM files, or folders searched for them")
    send.add_argument("--to", type=_dimse_destination, required=True, metavar="AET@HOST:PORT", help="the receiving peer")
    send.add_argument("--calling-aet", default="OSTEOGATE", metavar="AET", help="our AE title (default OSTEOGATE)")
    send.set_defaults(func=cmd_send)

    demo = cmds.add_parser("demo", help="gateway + local PACS on free ports; send the samples; print the SRs",
                           epilog=_examples("osteogate demo", "osteogate demo --cards /tmp/cards   # also save the result cards as PNG"))
    demo.add_argument("--model", type=Path, metavar="FILE", help="checkpoint to serve (default: the shipped one)")
    demo.add_argument("--cards", type=Path, metavar="DIR", help="save the result cards the PACS received as PNG files here")
    _add_timeout(demo, 180, "seconds to wait for the SRs")
    demo.set_defaults(func=cmd_demo)


def _operations_parsers(cmds: _Commands) -> None:
    studies = cmds.add_parser("studies", help="list studies", epilog=_examples(
        "osteogate studies --data-dir /var/lib/osteogate", "osteogate studies --status failed --since 7d --json"))
    _add_config(studies)
    studies.add_argument("--limit", type=int, default=50, help="at most this many, newest first (default 50)")
    studies.add_argument("--json", action="store_true", help="machine-readable output")
    studies.add_argument("--status", choices=_STUDY_STATUSES, help="studies with this status")
    studies.add_argument("--since", type=_when, help="last received at or after: 2026-01-31, ISO time, 7d, 12h")
    studies.add_argument("--region", help="region of the latest result (knee, spine)")
    studies.add_argument("--result", help="latest result: normal, osteopenia, osteoporosis or \"not assessed\"")
    studies.set_defaults(func=cmd_studies)

    show = cmds.add_parser("show", help="everything about one study", epilog=_examples(
        "osteogate show 1.2.826.0.1.3680043.8.498.1234", "osteogate show 3f2a9c0d11e4b7a6 --json   # study_key from the logs"))
    _add_config(show)
    show.add_argument("study", metavar="STUDY", help="Study Instance UID, or the study_key the logs print")
    show.add_argument("--json", action="store_true", help="machine-readable output (every stored field)")
    show.set_defaults(func=cmd_show)

    replay = cmds.add_parser("replay", help="classify studies again from the spool and send a new SR version",
                             epilog=_examples("osteogate replay --status failed --dry-run",
                                              "osteogate replay 1.2.3.4 --model new.safetensors --to PACS@pacs:104"))
    _add_config(replay)
    replay.add_argument("study_uids", nargs="*", metavar="STUDY_UID", help="studies to replay")
    replay.add_argument("--since", type=_when, help="studies last received at or after this time (2026-01-31, 7d)")
    replay.add_argument("--status", choices=["done", "skipped", "failed"], help="studies with this status")
    replay.add_argument("--model", dest="checkpoint", type=Path, metavar="FILE", help="another checkpoint for these runs")
    _add_to(replay, "PACS for the new SRs (default: delivery.destinations, else where earlier SRs went)")
    replay.add_argument("--dry-run", action="store_true", help="show what would be replayed, change nothing")
    _add_timeout(replay, 3600, "seconds to wait for the runs")
    replay.set_defaults(func=cmd_replay, to_is_destinations=True)

    resend = cmds.add_parser("resend", help="send the latest SR of a study again, where it is not yet delivered",
                             epilog=_examples("osteogate resend 1.2.3.4            # configured PACS without the SR",
                                              "osteogate resend 1.2.3.4 --to PACS2@pacs2:104   # there, even if sent"))
    _add_config(resend)
    resend.add_argument("study", metavar="STUDY", help="Study Instance UID or study key")
    _add_to(resend, "send here (repeatable), even where already delivered; default: the configured "
                    "destinations that do not have it yet")
    _add_timeout(resend, 30, "seconds to wait for the send")
    resend.set_defaults(func=cmd_resend)

    purge = cmds.add_parser("purge", help="remove spooled images of finished, delivered, old studies",
                            epilog=_examples("osteogate purge --older-than 30 --dry-run"))
    _add_config(purge)
    purge.add_argument("--older-than", type=float, required=True, metavar="DAYS",
                       help="only studies last received more than DAYS ago")
    purge.add_argument("--dry-run", action="store_true", help="say what would be removed, remove nothing")
    purge.set_defaults(func=cmd_purge)

    db = cmds.add_parser("db", help="database schema (Alembic migrations)",
                         epilog=_examples("osteogate db current --config /etc/osteogate/osteogate.toml",
                                          "osteogate db upgrade --config /etc/osteogate/osteogate.toml"))
    db_sub = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    for name, text in (("upgrade", "apply migrations up to head (creates the database if needed)"),
                       ("current", "show the schema revision (never creates anything)")):
        action = db_sub.add_parser(name, help=text, description=text)
        _add_config(action)
        action.set_defaults(func=cmd_db)

    config = cmds.add_parser("config", help="configuration tools",
                             epilog=_examples("osteogate config check /etc/osteogate/osteogate.toml"))
    config_sub = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    text = "validate a configuration file (and what serve needs: model, certificates); list every problem"
    check = config_sub.add_parser("check", help=text, description=text)
    check.add_argument("file", type=Path, metavar="FILE", help="the TOML file (environment overrides apply)")
    check.set_defaults(func=cmd_config_check)

    selfcheck = cmds.add_parser("selfcheck", help="disk space, database, C-ECHO of each destination",
                                epilog=_examples("osteogate selfcheck --config /etc/osteogate/osteogate.toml"))
    _add_config(selfcheck)
    selfcheck.set_defaults(func=cmd_selfcheck)


def _overview(listing: list[tuple[str, str, str]]) -> str:
    lines = []
    for group in (*COMMAND_GROUPS, *sorted({g for g, _, _ in listing} - set(COMMAND_GROUPS))):
        entries = [(name, text) for g, name, text in listing if g == group]
        if entries:
            lines.append(f"{group} commands:")
            lines.extend(f"  {name:<11} {text}" for name, text in entries)
            lines.append("")
    lines.append(_examples("osteogate serve --config /etc/osteogate/osteogate.toml",
                           "osteogate studies --data-dir ./var",
                           "osteogate show STUDY_UID_OR_KEY --json",
                           "osteogate COMMAND --help"))
    lines.append("")
    lines.append("exit codes:")
    lines.extend(f"  {int(code):<3} {meaning}" for code, meaning in EXIT_CODE_MEANINGS.items())
    lines.append("")
    lines.append("Set OSTEOGATE_DEBUG=1 to see the traceback behind an error.")
    return "\n".join(lines)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("osteogate")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="osteogate", usage="%(prog)s [-h] [--version] COMMAND ...", description="OsteoGate: DICOM gateway that screens knee and spine "
                     "radiographs for low bone density.")
    parser.add_argument("--version", action="version", version=f"osteogate {_version()}")
    # The subcommand list is printed grouped in the epilog (below), not as argparse's flat list.
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help=argparse.SUPPRESS,
                                prog="osteogate")
    cmds = _Commands(sub)
    _serving_parsers(cmds)
    _operations_parsers(cmds)
    add_dxa_parser(cmds)  # gateway/groundtruth/cli.py
    try:
        from osteogate.training.cli import register
    except ImportError:  # an install without the training package
        pass
    else:
        model_cmds = _Commands(sub, group="model")
        register(model_cmds)  # type: ignore[arg-type]
        cmds.listing.extend(model_cmds.listing)
    parser.epilog = _overview(cmds.listing)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if os.environ.get("OSTEOGATE_DEBUG") == "1":
            raise
        known = translate(exc)
        if known is None:
            detail = (str(exc).strip().splitlines() or [""])[0][:300]
            print(f"osteogate: internal error: {type(exc).__name__}: {detail}. This is a bug: run again with "
                  "OSTEOGATE_DEBUG=1 for the traceback and report it", file=sys.stderr)
            return ExitCode.SOFTWARE
        print(f"osteogate: {known.line()}", file=sys.stderr)
        return int(known.exit_code)


if __name__ == "__main__":
    sys.exit(main())
