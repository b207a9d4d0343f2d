"""``osteogate``: the one command admins use.

Commands come in three groups (``osteogate --help``): serving (serve, worker, echo, send, demo),
operations (studies, show, replay, resend, purge, db, config, selfcheck, dxa) and model (train,
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
from osteogate.gateway.operate.cli import admin, cases, dxa, maintenance, serving, studies
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
COMMAND_MODULES = (serving, studies, admin, maintenance, dxa, backfill, cases)


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


def _stdout_closed() -> bool:
    """Whether our stdout is a pipe whose reader went away (``studies --json | head``)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(event & select.POLLERR for _, event in poller.poll(0))
    except (OSError, ValueError):
        return False


def _quiet_after_epipe() -> int:
    """Exit as ``cat`` or ``grep`` do when the reader of their output has gone: silently.

    Whatever is still buffered for stdout would raise again when Python flushes it at exit, so
    stdout is pointed at /dev/null first. 141 is what a shell reports for a process killed by
    SIGPIPE, the exit status those tools end with.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 141


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # here, where a reader that went away is handled, not at interpreter exit
        return code
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        # A reader of our output that went away is not a network error (studies --json | head).
        if isinstance(exc, BrokenPipeError) and _stdout_closed():
            return _quiet_after_epipe()
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
