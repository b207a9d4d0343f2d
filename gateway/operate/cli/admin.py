"""Admin commands that act on studies: replay, resend, purge."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from osteogate.gateway.core.config import Settings
from osteogate.gateway.core.errors import (
    ExitCode,
    NotFoundError,
    UsageError,
)
from osteogate.gateway.operate.cli.common import (
    Commands,
    add_config,
    add_timeout,
    add_to,
    admin_settings,
    admin_store,
    examples,
    print_plan,
    progress_bar,
    study_ident,
    when,
)


def cmd_replay(args: argparse.Namespace) -> int:
    from osteogate.gateway.operate.replay import job_deliveries, plan_replay, queue_replay, wait_for_jobs
    from osteogate.gateway.store.db import JobStatus

    if not (args.study_uids or args.since or args.status):
        raise UsageError("osteogate replay: name studies, or select them with --since / --status")
    if args.checkpoint and not args.checkpoint.is_file():
        raise NotFoundError(f"--model: checkpoint {args.checkpoint} does not exist")
    settings = admin_settings(args)
    store = admin_store(settings, migrate=True)
    db = store.db
    plan = plan_replay(db, args.study_uids, args.since, args.status)
    eligible = [c for c in plan if c.refusal is None]
    model = args.checkpoint or settings.model.path or "the served model"
    destinations = (", ".join(str(d) for d in settings.delivery.destinations)
                    or "where each study's earlier SRs went")
    print_plan(plan, f"replay: {len(eligible)} of {len(plan)} studies, model {model}, SR to {destinations}")
    if args.dry_run or not eligible:
        print("dry run: nothing changed" if args.dry_run else "nothing to replay")
        return ExitCode.OK if args.dry_run else ExitCode.PARTIAL
    # --to travels on the job rows: a running gateway's worker may run them before we do.
    deadline = time.monotonic() + args.timeout
    job_ids = queue_replay(db, plan, args.checkpoint, [str(d) for d in args.to] if args.to else None)
    worker = _replay_worker(settings, store, args.checkpoint)
    with progress_bar() as progress:
        task = progress.add_task("classifying", total=len(job_ids))
        states = wait_for_jobs(db, job_ids, lambda: worker.run_once(job_ids), args.timeout,
                               progress=lambda n: progress.advance(task, n))
    done = sum(s == JobStatus.DONE for s in states.values())
    failed = sum(s == JobStatus.FAILED for s in states.values())
    # One attempt's worth of waiting: a PACS that is down is retried by the gateway later, and the
    # rows say "pending" meanwhile (osteogate show / resend).
    wait = min(max(5.0, deadline - time.monotonic()), max(30.0, settings.delivery.timeout_seconds + 5))
    states_of_sends = _wait_for_deliveries(settings, store, job_deliveries(db, job_ids), wait)
    sent = sum(status == "sent" for _, status, _ in states_of_sends)
    print(f"replayed {done} of {len(job_ids)} studies ({failed} failed, "
          f"{len(job_ids) - done - failed} unfinished); {sent} of {len(states_of_sends)} SR delivery(ies) sent")
    for destination, status, error in states_of_sends:
        if status != "sent":
            print(f"  SR -> {destination}: {status}" + (f" ({error})" if error else ""))
    return ExitCode.OK if done == len(job_ids) else ExitCode.PARTIAL


def _wait_for_deliveries(settings: Settings, store: Any, ids: list[int],
                         timeout: float) -> list[tuple[str, str, str | None]]:
    """Send what is due and wait on the rows: a running gateway may be the one sending."""
    from osteogate.gateway.operate.admin import delivery_states

    deadline = time.monotonic() + timeout
    states: list[tuple[str, str, str | None]] = []
    while ids:
        _deliver_now(settings, store)
        states = delivery_states(store.db, ids)
        if all(status != "pending" for _, status, _ in states) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    return states


def _replay_worker(settings: Settings, store: Any, checkpoint: Path | None) -> Any:
    from osteogate.gateway.operate.preflight import ClassifierCache
    from osteogate.gateway.report.publisher import ReportPublisher
    from osteogate.gateway.work.worker import ClassifierWorker

    if checkpoint:
        # The replay checkpoint becomes this process's default too, so no other model is resolved
        # (or, with none configured, created) just to sit unused.
        settings = settings.model_copy(deep=True)
        settings.model.path = str(checkpoint.resolve())
    return ClassifierWorker(settings, store.db, store.spool, ReportPublisher(settings, store.reports), ClassifierCache(settings))


def _deliver_now(settings: Settings, store: Any) -> int:
    from osteogate.gateway.deliver.delivery import DeliveryManager

    return DeliveryManager(settings, store.db, store.reports).run_due()


def cmd_resend(args: argparse.Namespace) -> int:
    from osteogate.gateway.operate.admin import delivery_states, resend_latest

    settings = admin_settings(args)
    store = admin_store(settings, migrate=True)
    sr_uid, plan = resend_latest(store.db, settings, args.study, args.to or None)
    for target in plan:
        if target.action == "skip":
            print(f"SR {sr_uid} -> {target.destination}: already delivered, not sent again "
                  f"(--to {target.destination} sends it anyway)")
        elif target.action == "held":
            print(f"SR {sr_uid} -> {target.destination}: held by the site gate; it is sent when the gate "
                  "opens (osteogate validate shows how far the site's evidence is)")
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

    store = admin_store(args, migrate=True)
    total = len(purgeable_study_ids(store.db, args.older_than))
    with progress_bar() as progress:
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


def add_parsers(cmds: Commands) -> None:
    """replay, resend, purge."""
    replay = cmds.add_parser("replay", help="classify studies again from the spool and send a new SR version",
                             epilog=examples("osteogate replay --status failed --dry-run",
                                              "osteogate replay 1.2.3.4 --model new.safetensors --to PACS@pacs:104"))
    add_config(replay)
    replay.add_argument("study_uids", nargs="*", type=study_ident, metavar="STUDY", help="studies to replay (Study Instance UID or study key)")
    replay.add_argument("--since", type=when, help="studies last received at or after this time (2026-01-31, 7d)")
    replay.add_argument("--status", choices=["done", "skipped", "failed"], help="studies with this status")
    replay.add_argument("--model", dest="checkpoint", type=Path, metavar="FILE", help="another checkpoint for these runs")
    add_to(replay, "PACS for the new SRs (default: delivery.destinations, else where earlier SRs went)")
    replay.add_argument("--dry-run", action="store_true", help="show what would be replayed, change nothing")
    add_timeout(replay, 3600, "seconds to wait for the runs")
    replay.set_defaults(func=cmd_replay, to_is_destinations=True)

    resend = cmds.add_parser("resend", help="send the latest SR of a study again, where it is not yet delivered",
                             epilog=examples("osteogate resend 1.2.3.4            # configured PACS without the SR",
                                              "osteogate resend 1.2.3.4 --to PACS2@pacs2:104   # there, even if sent"))
    add_config(resend)
    resend.add_argument("study", type=study_ident, metavar="STUDY", help="Study Instance UID or study key")
    add_to(resend, "send here (repeatable), even where already delivered; default: the configured "
                    "destinations that do not have it yet")
    add_timeout(resend, 30, "seconds to wait for the send")
    resend.set_defaults(func=cmd_resend)

    purge = cmds.add_parser("purge", help="remove spooled images of finished, delivered, old studies",
                            epilog=examples("osteogate purge --older-than 30 --dry-run"))
    add_config(purge)
    purge.add_argument("--older-than", type=float, required=True, metavar="DAYS",
                       help="only studies last received more than DAYS ago")
    purge.add_argument("--dry-run", action="store_true", help="say what would be removed, remove nothing")
    purge.set_defaults(func=cmd_purge)
