"""Pure decision logic of operations (exit-code mapping, resend targets, failing destinations,
purge safety, the model checks at start) and the CLI surface (help, aliases, version, logging)."""

from __future__ import annotations

import argparse
import errno
import io
import json
import logging
import socket
import urllib.request
from datetime import timedelta
from pathlib import Path

import pytest
from osteogate.gateway.core.config import ConfigError, load_settings
from osteogate.gateway.core.errors import EXIT_CODE_MEANINGS, ExitCode, OsteoGateError, translate
from osteogate.gateway.core.logs import configure_logging
from osteogate.gateway.operate import cli, preflight
from osteogate.gateway.operate.admin import AdminError, ResendTarget, _purge_safe, plan_resend
from osteogate.gateway.operate.queries import DeliveryRow, destination_problems
from osteogate.gateway.store.db import (
    Delivery,
    DeliveryStatus,
    Instance,
    Job,
    JobStatus,
    Study,
    StudyResult,
    StudyStatus,
    utcnow,
)
from osteogate.gateway.store.migrations import MigrationError
from osteogate.model.checkpoint import CheckpointError
from osteogate.model.taxonomy import TaxonomyError
from sqlalchemy.exc import OperationalError

from tests.gateway_harness import GatewayProcess
from tests.helpers import free_port, sample_file, storescu, wait_until

# -- exit codes ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("exc", "code"), [
    (OSError(errno.EADDRINUSE, "Address already in use"), ExitCode.TEMPFAIL),
    (OSError(errno.EADDRNOTAVAIL, "Cannot assign requested address"), ExitCode.CONFIG),
    (socket.gaierror(-2, "Name or service not known"), ExitCode.UNAVAILABLE),
    (PermissionError(errno.EACCES, "Permission denied", "/var/lib/osteogate"), ExitCode.CANTCREAT),
    (OSError(errno.ENOSPC, "No space left on device", "/x"), ExitCode.CANTCREAT),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "/x.dcm"), ExitCode.NOINPUT),
    (ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"), ExitCode.UNAVAILABLE),
    (CheckpointError("/m.pt is not a safetensors file"), ExitCode.CONFIG),
    (TaxonomyError("model card has classes ['a', 'b']"), ExitCode.CONFIG),
    (OperationalError("SELECT 1", {}, Exception("connection refused")), ExitCode.UNAVAILABLE),
    (OperationalError("INSERT", {}, Exception("database is locked")), ExitCode.TEMPFAIL),
    (MigrationError("schema matches no known revision"), ExitCode.DATAERR),
    (ConfigError(["dicom.port: too big"]), ExitCode.CONFIG),
    (AdminError("no study 1.2.3"), ExitCode.NOINPUT),
    (ModuleNotFoundError("No module named 'torch'", name="torch"), ExitCode.UNAVAILABLE),
])
def test_known_errors_map_to_exit_codes(exc: BaseException, code: ExitCode) -> None:
    known = translate(exc)
    assert known is not None and known.exit_code == code
    assert "\n" not in known.line() and known.line()


def test_unknown_errors_are_bugs() -> None:
    assert translate(RuntimeError("boom")) is None
    assert translate(ModuleNotFoundError("No module named 'yaml'", name="yaml")) is None


def test_every_exit_code_is_documented() -> None:
    assert set(EXIT_CODE_MEANINGS) == set(ExitCode)


def test_error_line_is_one_line_with_what_why_and_fix() -> None:
    error = OsteoGateError("cannot listen on 0.0.0.0:104", "permission\ndenied", "Use a port above 1023.")
    assert error.line() == "cannot listen on 0.0.0.0:104: permission denied. Use a port above 1023."


def test_main_turns_an_unexpected_exception_into_one_line(monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    def boom(args: argparse.Namespace) -> int:
        raise RuntimeError("something\nbroke")

    monkeypatch.setattr(cli.studies, "cmd_studies", boom)
    monkeypatch.delenv("OSTEOGATE_DEBUG", raising=False)
    assert cli.main(["studies"]) == ExitCode.SOFTWARE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "internal error: RuntimeError: something" in err and "OSTEOGATE_DEBUG" in err
    monkeypatch.setenv("OSTEOGATE_DEBUG", "1")
    with pytest.raises(RuntimeError):
        cli.main(["studies"])


# -- resend targets --------------------------------------------------------------------------------

A, B, C = "A@pacs-a:104", "B@pacs-b:104", "C@pacs-c:104"


def test_resend_goes_where_the_sr_is_not_yet_delivered() -> None:
    existing = [(1, A, DeliveryStatus.SENT), (2, B, DeliveryStatus.REJECTED)]
    assert plan_resend(existing, [], [A, B]) == [ResendTarget(A, "skip"), ResendTarget(B, "queue")]


def test_resend_reuses_a_pending_delivery_instead_of_a_second_retry_loop() -> None:
    existing = [(1, A, DeliveryStatus.PENDING), (2, B, DeliveryStatus.SENT)]
    assert plan_resend(existing, [], [A, B]) == [ResendTarget(A, "retry-now", 1), ResendTarget(B, "skip")]
    assert plan_resend(existing, [A], [B]) == [ResendTarget(A, "retry-now", 1)]


def test_resend_never_doubles_a_delivery_the_site_gate_holds() -> None:
    existing = [(1, A, DeliveryStatus.HELD), (2, B, DeliveryStatus.SENT)]
    assert plan_resend(existing, [], [A, B]) == [ResendTarget(A, "held"), ResendTarget(B, "skip")]
    assert plan_resend(existing, [A], []) == [ResendTarget(A, "held")]


def test_resend_goes_where_asked_even_if_delivered() -> None:
    existing = [(1, A, DeliveryStatus.SENT)]
    assert plan_resend(existing, [A, C], [B]) == [ResendTarget(A, "queue"), ResendTarget(C, "queue")]


def test_resend_without_configuration_uses_earlier_destinations() -> None:
    existing = [(1, A, DeliveryStatus.REJECTED), (2, B, DeliveryStatus.SENT), (3, A, DeliveryStatus.REJECTED)]
    assert plan_resend(existing, [], []) == [ResendTarget(A, "queue"), ResendTarget(B, "skip")]
    assert plan_resend([], [], []) == []


# -- failing destinations (/healthz degraded) ------------------------------------------------------


def _row(row_id: int, destination: str, status: DeliveryStatus, attempts: int = 1, age_h: float = 1,
         error: str | None = "boom") -> DeliveryRow:
    return DeliveryRow(row_id, destination, status, attempts, error, utcnow() - timedelta(hours=age_h))


def test_destination_failing_while_retrying() -> None:
    rows = [_row(1, A, DeliveryStatus.PENDING, attempts=3, error="association failed"),
            _row(2, B, DeliveryStatus.PENDING, attempts=0, error=None)]  # not tried yet: not failing
    assert destination_problems(rows, utcnow()) == [
        {"destination": A, "retrying": 1, "rejected": 0, "last_error": "association failed"}]


def test_destination_failing_after_a_recent_rejection_until_something_is_sent() -> None:
    now = utcnow()
    rejected = [_row(1, A, DeliveryStatus.REJECTED, error="rejected-permanent")]
    assert destination_problems(rejected, now)[0]["rejected"] == 1
    assert destination_problems([*rejected, _row(2, A, DeliveryStatus.SENT, error=None)], now) == []
    old = [_row(1, A, DeliveryStatus.REJECTED, age_h=48)]
    assert destination_problems(old, now) == []
    assert destination_problems([_row(1, A, DeliveryStatus.SENT, error=None)], now) == []


# -- purge safety ------------------------------------------------------------------------------------


def _study(status: StudyStatus, deliveries: list[DeliveryStatus] | None, *, job: JobStatus = JobStatus.DONE,
           purged: bool = False) -> Study:
    study = Study(study_uid="1.2.3", study_key="k", status=status)
    study.instances = [Instance(sop_instance_uid="1.2.3.1", purged_at=utcnow() if purged else None)]
    study.jobs = [Job(status=job)]
    if deliveries is not None:
        study.results = [StudyResult(version=1, deliveries=[Delivery(destination=A, status=s) for s in deliveries])]
    return study


@pytest.mark.parametrize(("study", "safe"), [
    (_study(StudyStatus.DONE, [DeliveryStatus.SENT]), True),
    (_study(StudyStatus.DONE, [DeliveryStatus.SENT, DeliveryStatus.PENDING]), False),  # not everywhere yet
    (_study(StudyStatus.DONE, [DeliveryStatus.REJECTED]), False),  # the SR may have to be made again
    (_study(StudyStatus.DONE, []), False),  # never delivered
    (_study(StudyStatus.DONE, None), False),  # no result at all
    (_study(StudyStatus.SKIPPED, None), True),  # nothing to deliver
    (_study(StudyStatus.DONE, [DeliveryStatus.SENT], job=JobStatus.RUNNING), False),  # a replay is running
    (_study(StudyStatus.DONE, [DeliveryStatus.SENT], purged=True), False),  # nothing left to remove
])
def test_purge_safety(study: Study, safe: bool) -> None:
    assert _purge_safe(study) is safe


# -- model checks at start ------------------------------------------------------------------------


def test_missing_onnx_without_torch_is_a_config_problem(tmp_path: Path, tiny_model: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A serving-only install (no torch) cannot export: config check says so; nothing is attempted."""
    import importlib.util

    checkpoint = tmp_path / "m.safetensors"
    checkpoint.write_bytes(tiny_model.read_bytes())  # no ONNX sibling here
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real_find_spec(name, *a))
    settings = load_settings(environ={}, overrides={"model": {"path": str(checkpoint), "backend": "onnx"},
                                                    "storage": {"data_dir": str(tmp_path / "gw")}})
    problems = preflight.preflight_problems(settings)
    assert len(problems) == 1 and "no ONNX file made from" in problems[0] and "torch" in problems[0]
    assert not (tmp_path / "gw" / "models" / "onnx").exists() or not list((tmp_path / "gw").rglob("*.onnx"))
    monkeypatch.setattr(preflight, "SHIPPED_MODEL", tmp_path / "absent.safetensors")
    bare = load_settings(environ={}, overrides={"storage": {"data_dir": str(tmp_path / "gw")}})
    assert "no model to serve" in preflight.preflight_problems(bare)[0]


def test_config_check_accepts_the_shipped_model(tmp_path: Path) -> None:
    settings = load_settings(environ={}, overrides={"storage": {"data_dir": str(tmp_path)}})
    assert preflight.preflight_problems(settings) == []
    assert preflight.SHIPPED_MODEL.with_suffix(".onnx").is_file(), "the ONNX file ships with the checkpoint"


# -- CLI surface ---------------------------------------------------------------------------------


def _command_subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    gateway = [name for group in ("serving", "operations", "model") for name in cli.COMMAND_GROUPS[group]]
    parsers = {}
    for name in gateway:
        parsers[name] = sub.choices[name]
        for action in sub.choices[name]._actions:  # db upgrade/current, config check, dataset audit
            if isinstance(action, argparse._SubParsersAction):
                parsers.update({f"{name} {child}": p for child, p in action.choices.items()})
    return parsers


def test_every_option_of_every_command_has_help() -> None:
    missing = [f"{name} {action.option_strings or action.dest}"
               for name, parser in _command_subparsers().items() for action in parser._actions
               if not isinstance(action, argparse._SubParsersAction | argparse._HelpAction) and not action.help]
    assert not missing, missing


def test_help_groups_commands_and_documents_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    positions = [text.index(f"{group} commands:") for group in ("serving", "operations", "model")]
    assert positions == sorted(positions)
    for code in ExitCode:
        assert f"  {int(code):<3} " in text
    assert "examples:" in text
    with pytest.raises(SystemExit):
        cli.main(["--version"])
    assert capsys.readouterr().out.startswith("osteogate ")


def test_old_option_names_still_work_hidden() -> None:
    parser = cli.build_parser()
    args = parser.parse_args(["serve", "--destination", "PACS@h:104", "--to", "B@h:105"])
    assert [str(d) for d in args.to] == ["PACS@h:104", "B@h:105"]
    assert parser.parse_args(["resend", "1.2.3", "--wait", "5"]).timeout == 5
    assert parser.parse_args(["replay", "--status", "done", "--timeout", "9"]).timeout == 9
    help_text = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["serve"].format_help()
    assert "--to" in help_text and "--destination" not in help_text


def test_stdlib_logging_goes_through_structlog() -> None:
    stream = io.StringIO()
    configure_logging("json", "info", stream=stream)
    try:
        logging.getLogger("osteogate.model.inference").info("exporting %s", "m.safetensors")
        logging.getLogger("highdicom.base").info('copy Patient-related attributes from dataset "1.2.3"')
    finally:
        configure_logging("json", "info")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert lines == [{"event": "exporting m.safetensors", "level": "info", "logger": "osteogate.model.inference",
                      "timestamp": lines[0]["timestamp"]}]  # library INFO chatter (with a UID) dropped


# -- /healthz degraded ---------------------------------------------------------------------------


def test_healthz_degraded_names_the_failing_destination(tmp_path: Path, tiny_model: Path) -> None:
    http_port = free_port()
    down = f"GONE@127.0.0.1:{free_port()}"
    gw = GatewayProcess(tmp_path / "gw", model=tiny_model, destinations=[down],
                        env={"OSTEOGATE_HTTP_ENABLED": "true", "OSTEOGATE_HTTP_PORT": str(http_port)})

    def health() -> tuple[int, dict]:
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/healthz", timeout=10) as response:
            return response.status, json.loads(response.read())

    with gw:
        status, before = health()
        assert status == 200 and before["status"] == "ok" and before["failing_destinations"] == []
        assert storescu([sample_file("knee_dx.dcm")], "127.0.0.1", gw.port, "OSTEOGATE").returncode == 0
        status, report = wait_until(lambda: (h := health())[1]["status"] == "degraded" and h, 120)
    assert status == 200 and report["healthy"] is True
    assert [d["destination"] for d in report["failing_destinations"]] == [down]
    assert report["failing_destinations"][0]["retrying"] == 1 and report["failing_destinations"][0]["last_error"]
