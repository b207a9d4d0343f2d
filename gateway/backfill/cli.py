"""``osteogate backfill``: screen the archive (listed in gateway/operate/cli COMMAND_MODULES;
``add_parsers`` registers it). Settings come from the config file and environment like every command; the
flags here override the ``[backfill]`` section for this run."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from osteogate.gateway.core.backfill_config import check_date, check_window
from osteogate.gateway.core.config import load_settings
from osteogate.gateway.core.errors import ExitCode
from osteogate.gateway.core.logs import configure_logging

EXAMPLES = """examples:
  osteogate backfill --from PACS@pacs.example.org:104 --since 2024-01-01 --body-part KNEE,SPINE --dry-run
  osteogate backfill --from PACS@pacs.example.org:104 --since 2024-01-01 --rate 6 --window 19:00-07:00
  osteogate backfill --from PACS@pacs:104 --patients dxa-patients.txt --retrieve get
  osteogate backfill --from https://pacs.example.org/dicom-web --since 20230101"""


def _date(text: str) -> str:
    try:
        return check_date(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _window(text: str) -> str:
    try:
        return check_window(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _rate(text: str) -> float:
    """``10``, ``10/min`` or ``0.5``: studies a minute."""
    try:
        value = float(text.strip().lower().removesuffix("/min"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a rate (studies a minute, e.g. 10 or 10/min)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("the rate must be above 0 studies a minute")
    return value


def _words(text: str) -> list[str]:
    return [w.strip().upper() for w in text.split(",") if w.strip()]


def add_parsers(cmds: Any) -> None:
    """Register ``backfill`` on the ``osteogate`` parser (``cmds``: its subcommand registrar)."""
    parser = cmds.add_parser("backfill", help="screen the archive: query/retrieve past studies, gently and resumably",
                             epilog=EXAMPLES)
    parser.add_argument("--config", "-c", type=Path, metavar="FILE", help="TOML configuration file (env: OSTEOGATE_CONFIG)")
    parser.add_argument("--data-dir", type=Path, metavar="DIR", help="storage.data_dir of the gateway (default ./var)")
    parser.add_argument("--database-url", metavar="URL", help="storage.database_url of the gateway")
    parser.add_argument("--from", dest="source", metavar="AET@HOST:PORT|URL",
                        help="backfill.source: the archive (DICOM Q/R peer, or its DICOMweb root)")
    parser.add_argument("--since", type=_date, metavar="DATE", help="backfill.since: study date from (2024-01-01)")
    parser.add_argument("--until", type=_date, metavar="DATE", help="backfill.until: study date until, inclusive")
    parser.add_argument("--modality", type=_words, metavar="CR,DX", help="backfill.modalities (default CR,DX)")
    parser.add_argument("--body-part", type=_words, metavar="KNEE,SPINE",
                        help="backfill.body_parts: series whose BodyPartExamined contains one of these")
    parser.add_argument("--patients", type=Path, metavar="FILE",
                        help="only these patients: one PatientID a line (optionally ,IssuerOfPatientID)")
    parser.add_argument("--rate", type=_rate, metavar="N/min", help="backfill.rate_per_minute: studies a minute (default 10)")
    parser.add_argument("--window", type=_window, metavar="HH:MM-HH:MM",
                        help="backfill.window: only retrieve inside this local time window (19:00-07:00 crosses midnight)")
    parser.add_argument("--retrieve", choices=["move", "get"], help="backfill.retrieve: C-MOVE to the gateway (default) or C-GET")
    parser.add_argument("--calling-aet", metavar="AET", help="backfill.calling_ae_title: our AE title as Q/R SCU")
    parser.add_argument("--max-queue", type=int, metavar="N", help="backfill.max_queue: pause while the gateway has more jobs queued")
    parser.add_argument("--wait", type=float, metavar="SECONDS",
                        help="backfill.screen_wait_seconds: wait this long for the gateway to screen what arrived")
    parser.add_argument("--dry-run", action="store_true", help="query only: say what would be retrieved, change nothing")
    parser.add_argument("--retry-failed", action="store_true", help="retrieve studies an earlier run gave up on again")
    parser.set_defaults(func=cmd_backfill)


_FLAGS = {"source": "source", "since": "since", "until": "until", "modality": "modalities", "body_part": "body_parts",
          "rate": "rate_per_minute", "window": "window", "retrieve": "retrieve", "calling_aet": "calling_ae_title",
          "max_queue": "max_queue", "wait": "screen_wait_seconds"}


def _settings(args: argparse.Namespace) -> Any:
    overrides: dict[str, dict[str, Any]] = {"backfill": {}}
    for flag, key in _FLAGS.items():
        if getattr(args, flag, None) is not None:
            overrides["backfill"][key] = getattr(args, flag)
    if args.data_dir is not None:
        overrides.setdefault("storage", {})["data_dir"] = args.data_dir
    if args.database_url is not None:
        overrides.setdefault("storage", {})["database_url"] = args.database_url
    settings = load_settings(args.config, overrides=overrides)
    level = "warning" if settings.logging.level == "info" else settings.logging.level
    configure_logging(settings.logging.format, level)
    return settings


class _Line:
    """The progress line on stderr: redrawn in place on a terminal, else printed when it changes
    (at most every 5 seconds, so a log file stays readable)."""

    def __init__(self) -> None:
        from rich.console import Console

        self.console = Console(stderr=True)
        self.live = None
        self._last = self._printed = ""
        self._printed_at = 0.0
        if self.console.is_terminal:
            from rich.live import Live

            self.live = Live("", console=self.console, refresh_per_second=4, transient=False)
            self.live.start()

    def __call__(self, progress: Any) -> None:
        import time

        text = progress.line()
        if self.live is not None:
            self.live.update(text)
        elif text != self._printed and time.monotonic() - self._printed_at >= 5:
            self._print(text)
        self._last = text

    def _print(self, text: str) -> None:
        import time

        print(text, file=sys.stderr, flush=True)
        self._printed, self._printed_at = text, time.monotonic()

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()
        elif self._last and self._last != self._printed:
            self._print(self._last)  # the final figures, always


def cmd_backfill(args: argparse.Namespace) -> int:
    from osteogate.gateway.backfill.setup import make_backfill
    from osteogate.gateway.store.wiring import open_store

    settings = _settings(args)
    store = open_store(settings, create=False, migrate=not args.dry_run)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    line = _Line()
    try:
        backfill = make_backfill(settings, store.db, patients_file=args.patients, dry_run=args.dry_run,
                                 retry_failed=args.retry_failed, stop=stop, on_progress=line)
        progress = backfill.run()
        failures = backfill.ledger.failures(backfill.run_id) if backfill.run_id is not None else []
    finally:
        line.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        store.dispose()
    source = settings.backfill.source
    for day in progress.capped_days:
        print(f"warning: {source} capped its answer for {day} even for one day: some studies of that day may be "
              "missing (raise the PACS's C-FIND limit, or narrow --modality / --body-part)")
    if args.dry_run:
        print(f"dry run against {source}: {progress.found} studies match; {progress.would_retrieve} would be "
              f"retrieved, {progress.already_screened} already screened with the current model, "
              f"{progress.counts.skipped} skipped (no fitting series, or failed before); nothing changed")
        return ExitCode.OK
    counts = progress.counts
    print(f"backfill from {source}: {progress.found} found, {counts.retrieved} retrieved, {counts.screened} screened, "
          f"{progress.skipped} skipped, {counts.failed} failed"
          + (f", {counts.waiting} still to retrieve" if counts.waiting else "")
          + (f", {counts.receiving} not yet screened" if counts.receiving else ""))
    for key, reason in failures:
        print(f"  failed {key}: {reason}")
    if stop.is_set():
        print("stopped: run the same command again to continue where it stopped")
    complete = not (counts.failed or counts.waiting or counts.receiving or stop.is_set())
    return ExitCode.OK if complete else ExitCode.PARTIAL
