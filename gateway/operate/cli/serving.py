"""Serving commands: serve, worker, echo, send, demo."""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from osteogate.gateway.core.errors import (
    ExitCode,
    PeerUnavailable,
)
from osteogate.gateway.core.logs import configure_logging
from osteogate.gateway.operate.cli.common import (
    Commands,
    add_config,
    add_timeout,
    add_to,
    dimse_destination,
    examples,
    settings_from_args,
)


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """Cap glibc's malloc arenas (before the service starts its threads). True if set.

    glibc gives threads that allocate at once arenas of their own (up to 8 per core) and keeps
    freed memory in each, so a receiver with dozens of association threads holds memory it no
    longer uses: benchmarks/hostile_load.py measured +145 MB over a warm gateway during a
    200-peer swarm, +44 MB with 2 arenas. An operator's MALLOC_ARENA_MAX wins; not glibc: no-op.
    """
    if os.environ.get("MALLOC_ARENA_MAX") or not sys.platform.startswith("linux"):
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(-8, arenas))  # -8: M_ARENA_MAX
    except (OSError, AttributeError):
        return False


def cmd_serve(args: argparse.Namespace) -> int:
    from osteogate.gateway.operate.service import Gateway

    limit_malloc_arenas()
    settings = settings_from_args(args)
    configure_logging(settings.logging.format, settings.logging.level)
    Gateway(settings).serve_forever()
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from osteogate.gateway.operate.service import WorkerService

    limit_malloc_arenas()
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
        why = "no such file or folder" if not path.exists() else "not a DICOM file (no DICM preamble) or unreadable"
        print(f"skip {path}: {why}", file=sys.stderr)
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


def add_parsers(cmds: Commands) -> None:
    serve = cmds.add_parser("serve", help="run the gateway (DICOM listener, worker, delivery)", epilog=examples(
        "osteogate serve                                   # embedded defaults: port 11112, ./var, shipped model",
        "osteogate serve --config /etc/osteogate/osteogate.toml",
        "osteogate serve --bind 127.0.0.1 --to PACS@pacs.example.org:104"))
    add_config(serve)
    serve.add_argument("--aet", metavar="AET", help="dicom.ae_title: the gateway's AE title (default OSTEOGATE)")
    serve.add_argument("--port", type=int, help="dicom.port: DICOM port to listen on (default 11112)")
    serve.add_argument("--bind", metavar="ADDRESS", help="dicom.bind: address to listen on (default 0.0.0.0)")
    add_to(serve, "delivery.destinations: PACS that receives the SRs (repeatable)")
    serve.add_argument("--stable-seconds", type=float, metavar="SECONDS",
                       help="study.stable_seconds: quiet time after which a study is complete (default 10)")
    serve.add_argument("--model", type=Path, metavar="FILE", help="model.path: checkpoint (.safetensors) to serve")
    serve.add_argument("--backend", choices=["auto", "onnx", "torch"], help="model.backend: inference backend")
    serve.set_defaults(func=cmd_serve, to_is_destinations=True)

    worker = cmds.add_parser("worker", help="classifier + delivery only, no DICOM listener (scale-out)",
                             epilog=examples("osteogate worker --config /etc/osteogate/osteogate.toml"))
    add_config(worker)
    worker.add_argument("--model", type=Path, metavar="FILE", help="model.path: checkpoint (.safetensors) to serve")
    worker.add_argument("--backend", choices=["auto", "onnx", "torch"], help="model.backend: inference backend")
    add_to(worker, "delivery.destinations: PACS that receives the SRs (repeatable)")
    worker.set_defaults(func=cmd_worker, to_is_destinations=True)

    echo = cmds.add_parser("echo", help="C-ECHO a DICOM peer", epilog=examples("osteogate echo PACS@pacs.example.org:104"))
    echo.add_argument("peer", type=dimse_destination, metavar="AET@HOST:PORT", help="the peer to echo")
    echo.add_argument("--calling-aet", default="OSTEOGATE", metavar="AET", help="our AE title (default OSTEOGATE)")
    echo.set_defaults(func=cmd_echo)

    send = cmds.add_parser("send", help="C-STORE files or folders to a DICOM peer", epilog=examples(
        "osteogate send sample_dicom/ --to OSTEOGATE@127.0.0.1:11112"))
    send.add_argument("paths", type=Path, nargs="+", metavar="PATH", help="DICOM files, or folders searched for them")
    send.add_argument("--to", type=dimse_destination, required=True, metavar="AET@HOST:PORT", help="the receiving peer")
    send.add_argument("--calling-aet", default="OSTEOGATE", metavar="AET", help="our AE title (default OSTEOGATE)")
    send.set_defaults(func=cmd_send)

    demo = cmds.add_parser("demo", help="gateway + local PACS on free ports; send the samples; print the SRs",
                           epilog=examples("osteogate demo", "osteogate demo --cards /tmp/cards   # also save the result cards as PNG"))
    demo.add_argument("--model", type=Path, metavar="FILE", help="checkpoint to serve (default: the shipped one)")
    demo.add_argument("--cards", type=Path, metavar="DIR", help="save the result cards the PACS received as PNG files here")
    add_timeout(demo, 180, "seconds to wait for the SRs")
    demo.set_defaults(func=cmd_demo)
