"""``osteogate``: the one command admins use.

Commands come in three groups (``osteogate --help``): serving (serve, worker, echo, send, demo),
operations (studies, show, replay, resend, purge, db, config, selfcheck, dxa, validate) and model (train,
evaluate, export, dataset; registered by training.cli, which imports torch only in its handlers).

New commands: a module with ``add_parsers(cmds)`` in this package, listed in COMMAND_MODULES.

Every failure ends here as one line on stderr and a sysexits-style exit code (gateway/core/errors.py;
the table is in ``osteogate --help`` and README). ``OSTEOGATE_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from osteogate.gateway.backfill import cli as backfill
from osteogate.gateway.core.errors import EXIT_CODE_MEANINGS, ExitCode, translate
from osteogate.gateway.operate.cli import admin, cases, dxa, maintenance, serving, studies, validate
from osteogate.gateway.operate.cli.common import (
    COMMAND_GROUPS,
    Commands,
    Parser,
    examples,
    settings_from_args,
)

__all__ = ["COMMAND_GROUPS", "build_parser", "main", "settings_from_args"]

# One module per command group; each has ``add_parsers(cmds)``. A new command goes in its
# group's module, or in a new module listed here (COMMAND_GROUPS in common.py names its group).
COMMAND_MODULES = (serving, studies, admin, maintenance, dxa, backfill, cases, validate)


def _overview(listing: list[tuple[str, str, str]]) -> str:
    lines = []
    for group in (*COMMAND_GROUPS, *sorted({g for g, _, _ in listing} - set(COMMAND_GROUPS))):
        entries = [(name, text) for g, name, text in listing if g == group]
        if entries:
            lines.append(f"{group} commands:")
            lines.extend(f"  {name:<11} {text}" for name, text in entries)
            lines.append("")
    lines.append(examples("osteogate serve --config /etc/osteogate/osteogate.toml",
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
    parser = Parser(prog="osteogate", usage="%(prog)s [-h] [--version] COMMAND ...", description="OsteoGate: DICOM gateway that screens knee and spine "
                     "radiographs for low bone density.")
    parser.add_argument("--version", action="version", version=f"osteogate {_version()}")
    # The subcommand list is printed grouped in the epilog (below), not as argparse's flat list.
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help=argparse.SUPPRESS,
                                prog="osteogate")
    cmds = Commands(sub)
    for module in COMMAND_MODULES:
        module.add_parsers(cmds)
    try:
        from osteogate.training.cli import register
    except ImportError:  # an install without the training package
        pass
    else:
        model_cmds = Commands(sub, group="model")
        register(model_cmds)  # type: ignore[arg-type]
        cmds.listing.extend(model_cmds.listing)
    parser.epilog = _overview(cmds.listing)
    return parser


# The longest single argument accepted: PATH_MAX. Anything longer is no path, UID, key or URL
# this tool knows; refusing it here keeps 10 kB strings out of error lines and SQL.
MAX_ARGUMENT = 4096


def _hostile_argument(argv: Sequence[str]) -> str | None:
    """Why an argument is refused before parsing (a NUL byte, or longer than any path), or None."""
    for position, arg in enumerate(argv, 1):
        if "\x00" in arg:
            return f"argument {position} contains a NUL byte"
        if len(arg) > MAX_ARGUMENT:
            return f"argument {position} is {len(arg)} characters long (at most {MAX_ARGUMENT})"
    return None


def _stdout_gone() -> bool:
    """True when stdout is a pipe whose reader has gone (``osteogate studies | head``)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):
        return False


def _quiet_exit_on_closed_stdout() -> int:
    # What other Unix tools do when the reader of their output goes: stop, quietly. Point stdout
    # at /dev/null so the interpreter's final flush does not raise again.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 128 + 13  # as a shell reports a process ended by SIGPIPE


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if (refused := _hostile_argument(argv)) is not None:
        print(f"osteogate: error: {refused} (see osteogate --help)", file=sys.stderr)
        return ExitCode.USAGE
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
        return code
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if isinstance(exc, BrokenPipeError) and _stdout_gone():
            return _quiet_exit_on_closed_stdout()
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
