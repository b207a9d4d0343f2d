"""The documentation says what the code does: the facts that have drifted before (TLS, access
control, retention, migrations, exit codes, install steps, the torch the project pins) are
checked against the code, so the next change that makes them false fails here."""

from __future__ import annotations

import argparse
import re
import subprocess
from pathlib import Path

import pytest
from osteogate.gateway.core.config import DicomConfig, RetentionConfig, Settings, TlsConfig
from osteogate.gateway.core.errors import EXIT_CODE_MEANINGS, NO_RESTART, ExitCode
from osteogate.gateway.operate import cli

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
DEPLOY = REPO / "deploy" / "README.md"
CONFORMANCE = REPO / "deploy" / "CONFORMANCE.md"
EXAMPLE = REPO / "deploy" / "osteogate.example.toml"
DOCS = [README, DEPLOY, CONFORMANCE, EXAMPLE]


def text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def flat(path: Path) -> str:
    """Text with line breaks and Markdown emphasis folded, so phrases match across lines."""
    return " ".join(text(path).replace("*", "").split()).lower()


# -- TLS -------------------------------------------------------------------------------------------


def test_tls_is_documented_as_supported() -> None:
    assert Settings.model_fields["dicom"].annotation is DicomConfig
    assert DicomConfig.model_fields["tls"].annotation is TlsConfig  # the code has TLS ...
    denial = re.compile(r"no (dicom )?tls\b|tls[^.]{0,40}not supported|not supported in this release|no tls yet")
    for path in DOCS:
        assert not denial.search(flat(path)), f"{path.name} says TLS is not supported"
    for path in (README, DEPLOY, CONFORMANCE):  # ... and each document says how to use it
        assert "dicom.tls" in text(path), path.name
        assert "+tls" in text(path), path.name
    for key in TlsConfig.model_fields:
        assert f"dicom.tls.{key}" in text(CONFORMANCE) or key == "enabled" and "dicom.tls.enabled" in text(CONFORMANCE)


# -- access control ----------------------------------------------------------------------------------


def test_access_control_keys_are_documented() -> None:
    keys = [f"dicom.{name}" for name in DicomConfig.model_fields if name.startswith("allowed_")]
    assert keys == ["dicom.allowed_calling_aets", "dicom.allowed_hosts"]
    for path in (README, DEPLOY, CONFORMANCE):
        missing = [key for key in keys if key not in text(path)]
        assert not missing, f"{path.name} does not name {missing}"
    assert "ae title only" not in flat(CONFORMANCE)


# -- retention ---------------------------------------------------------------------------------------


def test_retention_is_documented_as_it_works() -> None:
    keys = [f"retention.{name}" for name in RetentionConfig.model_fields]
    for path in (README, DEPLOY, CONFORMANCE):
        assert all(key in text(path) for key in keys), path.name
        assert "no automatic retention" not in flat(path), path.name


# -- migrations ----------------------------------------------------------------------------------------


def test_schema_changes_are_documented_as_migrations() -> None:
    revisions = sorted((REPO / "gateway" / "store" / "migrations" / "versions").glob("0*.py"))
    assert len(revisions) >= 2  # the schema has changed since the first release: say so
    for path in (README, DEPLOY):
        assert "not altered in place" not in flat(path), path.name
        assert "osteogate db upgrade" in text(path) and "db current" in text(path), path.name
    assert "alembic" in flat(DEPLOY)


# -- exit codes and restarts --------------------------------------------------------------------------


def test_exit_codes_are_documented_where_operators_look() -> None:
    for path in (README, DEPLOY):
        body = text(path)
        missing = [int(code) for code in ExitCode if not re.search(rf"(?<![\d.]){int(code)}(?![\d.])", body)]
        assert not missing, f"{path.name} does not list exit codes {missing}"
    table = text(DEPLOY).split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines()
            if re.match(r"^\| \d+ \|", line)]
    assert sorted(int(row[0]) for row in rows) == sorted(map(int, EXIT_CODE_MEANINGS))
    assert sorted(int(row[0]) for row in rows if row[3] == "no") == sorted(map(int, NO_RESTART))


# -- install steps and images ------------------------------------------------------------------------


def test_install_steps_never_copy_a_working_copy() -> None:
    for path in (DEPLOY, README):
        assert not re.search(r"cp -[a-z]*r[a-z]* \. ", text(path)), f"{path.name} copies the working copy"
    for name in ("Dockerfile", "Dockerfile.cuda"):
        dockerfile = text(REPO / "deploy" / name)
        assert not re.search(r"^COPY\s+(\.|\.venv|var)\s", dockerfile, re.M), name
        ignore = text(REPO / "deploy" / f"{name}.dockerignore").splitlines()
        assert ignore[3:4] == ["*"] or "*" in ignore, "allow-list: everything excluded first"
        assert not [line for line in ignore if line.startswith("!") and (".venv" in line or "var" in line)]


def test_cuda_image_uses_the_torch_the_project_pins() -> None:
    makefile = text(REPO / "Makefile")
    torch_pin = re.search(r"'torch==([\d.]+)'", makefile)[1]  # type: ignore[index]
    vision_pin = re.search(r"'torchvision==([\d.]+)'", makefile)[1]  # type: ignore[index]
    cuda = text(REPO / "deploy" / "Dockerfile.cuda")
    assert "download.pytorch.org/whl/cu130" in cuda and "cu128" not in cuda
    assert f'TORCH_SPEC="torch=={torch_pin}"' in cuda and f'TORCHVISION_SPEC="torchvision=={vision_pin}"' in cuda
    assert "'.[gpu]'" in cuda
    cpu = text(REPO / "deploy" / "Dockerfile")
    assert "torch" not in re.sub(r"#.*", "", cpu), "the CPU image serves without torch"


def test_example_config_has_no_live_destination() -> None:
    assert re.search(r"^destinations = \[\]$", text(EXAMPLE), re.M)
    assert "retried with no limit" in flat(EXAMPLE) and "degraded" in flat(EXAMPLE)


# -- commands and monitoring -------------------------------------------------------------------------


def test_readme_commands_exist() -> None:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    named = set(re.findall(r"`osteogate ([a-z][a-z-]*)", text(README)))
    assert named and not named - set(sub.choices), named - set(sub.choices)
    assert set(cli.COMMAND_GROUPS["serving"] + cli.COMMAND_GROUPS["operations"]) <= named


@pytest.mark.parametrize("phrase", ["degraded", "failing_destinations", "any_caller_accepted", "no_destination"])
def test_monitoring_terms_are_documented(phrase: str) -> None:
    assert phrase in text(DEPLOY)


# -- statements about the code: event names, tests named, what make prints ------------------------


def _logged_events() -> set[str]:
    """Every event name the gateway logs (structlog: the first argument, a snake_case string)."""
    found: set[str] = set()
    for path in (REPO / "gateway").rglob("*.py"):
        found |= set(re.findall(r"\.(?:debug|info|warning|error|exception|critical)\(\s*\"([a-z][a-z0-9_]*)\"",
                                path.read_text(encoding="utf-8")))
    return found


def _documented_events() -> set[str]:
    """Event names deploy/README.md tells operators to watch: its list of main events and every
    `alert on` sentence (snake_case names only: `status` there is a /healthz field)."""
    body = text(DEPLOY)
    listing = body.split("Main events:", 1)[1].split("\n\n", 1)[0]
    alerts = " ".join(re.findall(r"[Aa]lert on (.*?)(?:\.\s|\n\n)", body, flags=re.S))
    return {name for name in re.findall(r"`([a-z][a-z0-9_]*)`", listing + " " + alerts) if "_" in name}


def test_documented_log_events_are_the_ones_the_code_logs() -> None:
    documented, logged = _documented_events(), _logged_events()
    assert {"association_rejected", "sr_delivery_rejected", "instance_refused"} <= documented
    assert not documented - logged, f"documented but never logged: {sorted(documented - logged)}"


def test_tests_the_docs_name_exist_and_their_expected_failure_claims_hold() -> None:
    sources = {path: path.read_text(encoding="utf-8") for path in (REPO / "tests").glob("test_*.py")}
    for doc in DOCS:
        body = flat(doc)
        for name in set(re.findall(r"`(test_[a-z0-9_]+)`", body)):
            [(path, source)] = [(p, s) for p, s in sources.items() if f"def {name}(" in s] or [(None, "")]
            assert path is not None, f"{doc.name} names {name}, which no test file defines"
            head = source[:source.index(f"def {name}(")].rsplit("\n\n", 1)[-1]  # its decorators
            xfail = "xfail" in head
            sentence = next(s for s in re.split(r"(?<=[.!?])\s", body) if name in s)
            claims = "expected failure" in sentence or "xfail" in sentence
            assert claims == xfail, f"{doc.name} on {name}: says expected failure {claims}, marked xfail {xfail}"
    assert "HTTP 500" not in text(DEPLOY)  # the whole-study re-send works (issue 19, item 6)


def test_make_run_says_what_each_step_waits_for(tmp_path: Path) -> None:
    """`make run` in a fresh checkout: pip runs --quiet for about a minute, so make prints one
    line per step first."""
    result = subprocess.run(["make", "-n", "run", f"VENV={tmp_path / 'venv'}"], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    install = next(i for i, line in enumerate(lines) if "pip install --quiet ." in line)
    said = [line for line in lines[:install + 1] if "installing the serving environment" in line]
    assert said and "once" in said[0], result.stdout
    assert any("creating the virtual environment" in line for line in lines[:install])
