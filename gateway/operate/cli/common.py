"""Shared pieces of the CLI: the parser class (exit 64 on usage errors), option helpers,
settings from flags, the store opener and the command registry behind the grouped help."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from osteogate.gateway.core.config import Destination, Settings, load_settings
from osteogate.gateway.core.errors import (
    ExitCode,
)
from osteogate.gateway.core.logs import configure_logging

# The three groups of `osteogate --help`; a command registered elsewhere lands in the group named
# for its registrar.
COMMAND_GROUPS: dict[str, tuple[str, ...]] = {
    "serving": ("serve", "worker", "echo", "send", "demo"),
    "operations": ("studies", "show", "replay", "resend", "purge", "db", "config", "selfcheck", "dxa", "backfill",
                   "cases", "validate"),
    "model": ("train", "evaluate", "export", "dataset", "refit-site"),
}


class Parser(argparse.ArgumentParser):
    """argparse with the sysexits usage code (64) instead of 2, which also meant config errors."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(ExitCode.USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def parse_destination(text: str) -> Destination:
    try:
        return Destination.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def dimse_destination(text: str) -> Destination:
    """AET@HOST:PORT only: for commands that speak DIMSE (echo, send)."""
    destination = parse_destination(text)
    if destination.kind != "dimse":
        raise argparse.ArgumentTypeError(f"{text!r}: this command needs AET@HOST:PORT (a DICOM peer), not a URL")
    return destination


_STUDY_IDENT = re.compile(r"[0-9.]{1,64}|[0-9a-fA-F]{16}")


def study_ident(text: str) -> str:
    """A study named on the command line: a Study Instance UID (digits and dots, at most 64) or
    the 16-hex-digit study key that logs and ``show`` print. Anything else (``../``, shell
    metacharacters, long strings) is refused here, before it reaches SQL or a path."""
    if not _STUDY_IDENT.fullmatch(text.strip()):
        shown = text[:40].encode("unicode_escape").decode("ascii") + ("..." if len(text) > 40 else "")
        raise argparse.ArgumentTypeError(f"{shown!r} is not a Study Instance UID (digits and dots, at most 64) "
                                         "or a study key (16 hex digits)")
    return text.strip()


def add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", type=Path, metavar="FILE",
                        help="TOML configuration file (env: OSTEOGATE_CONFIG)")
    parser.add_argument("--data-dir", type=Path, metavar="DIR",
                        help="storage.data_dir: spool, reports and the SQLite file live here (default ./var)")
    parser.add_argument("--database-url", metavar="URL",
                        help="storage.database_url, e.g. postgresql+psycopg://user@host/db (default: SQLite in DIR)")


def add_to(parser: argparse.ArgumentParser, text: str, *, required: bool = False) -> None:
    """``--to AET@HOST:PORT`` (repeatable); ``--destination`` is its old name, hidden, kept for one release."""
    parser.add_argument("--to", type=parse_destination, action="append", metavar="AET@HOST:PORT|URL", required=required,
                        help=text)
    parser.add_argument("--destination", dest="to", type=parse_destination, action="append", help=argparse.SUPPRESS)


def add_timeout(parser: argparse.ArgumentParser, default: float, text: str) -> None:
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


def admin_settings(args: argparse.Namespace) -> Settings:
    """Settings for a one-shot admin command; its logs go to stderr so stdout stays parseable, and
    read as lines of text (not JSON, unless logging.format says so): a person reads them."""
    settings = settings_from_args(args)
    fmt = "console" if settings.logging.format == "auto" else settings.logging.format
    configure_logging(fmt, "warning" if settings.logging.level == "info" else settings.logging.level)
    return settings


def admin_store(args: argparse.Namespace | Settings, *, migrate: bool) -> Any:
    """The existing store (never created here: only serve, worker and `db upgrade` create one)."""
    from osteogate.gateway.store.wiring import open_store

    settings = args if isinstance(args, Settings) else admin_settings(args)
    return open_store(settings, create=False, migrate=migrate)


def when(text: str) -> datetime:
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


def console() -> Any:
    """A terminal gets its own width; piped output gets wide lines, so UIDs are never wrapped."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=250)


def progress_bar() -> Any:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    # On stderr: stdout carries the command's result, and may be piped.
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=Console(stderr=True), transient=False)


def print_plan(plan: Sequence[Any], title: str) -> None:
    from rich.table import Table

    table = Table(title=title)
    for column in ("study key", "study UID", "status", "action"):
        table.add_column(column)
    for item in plan:
        table.add_row(item.study_key, item.study_uid, item.status,
                      "replay" if item.refusal is None else f"skip: {item.refusal}")
    console().print(table)


STUDY_STATUSES = ["receiving", "queued", "processing", "done", "skipped", "failed"]


def examples(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


class Commands:
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
