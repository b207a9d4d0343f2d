"""The documentation says what the code does: the facts that have drifted before (TLS, access
control, retention, migrations, exit codes, install steps, the torch the project pins) are
checked against the code, so the next change that makes them false fails here."""

from __future__ import annotations

import argparse
import re
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
    named = set(re.findall(r"`osteogate ([a-z]+)", text(README)))
    assert named and not named - set(sub.choices), named - set(sub.choices)
    assert set(cli.COMMAND_GROUPS["serving"] + cli.COMMAND_GROUPS["operations"]) <= named


@pytest.mark.parametrize("phrase", ["degraded", "failing_destinations", "any_caller_accepted", "no_destination"])
def test_monitoring_terms_are_documented(phrase: str) -> None:
    assert phrase in text(DEPLOY)


# -- log events and test claims (issue 19 item 6) ----------------------------------------------------

_LOG_CALL = re.compile(r"\.(?:debug|info|warning|error|exception|critical)\(\s*\"([a-z][a-z0-9_]*)\"")


def logged_events() -> set[str]:
    """Every event name the gateway and the model code log (structlog's first argument)."""
    return {name for root in ("gateway", "model") for path in (REPO / root).rglob("*.py")
            for name in _LOG_CALL.findall(text(path))}


def test_event_names_in_the_docs_are_logged_by_the_code() -> None:
    """deploy/README once told operators to alert on `association_refused`, which nothing logs."""
    events = logged_events()
    assert {"association_rejected", "sr_delivery_retry", "instance_stored"} <= events  # the scan works
    body = text(DEPLOY)
    paragraphs = [body.split("Main events:", 1)[1].split("\n\n", 1)[0],
                  body.split("Alert on", 1)[1].split("\n\n", 1)[0]]
    named = {name for part in paragraphs for name in re.findall(r"`([a-z]+(?:_[a-z]+)+)`", part)}
    assert len(named) > 10, named
    assert not named - events, f"deploy/README names events nothing logs: {sorted(named - events)}"


def test_tests_named_in_the_docs_exist_and_their_xfail_claims_hold() -> None:
    """A test a document names must exist; "expected failure" / "xfail" next to it must be true,
    and a test marked xfail must not be described as passing."""
    sources = {path: text(path) for path in (REPO / "tests").glob("test_*.py")}
    for doc in (README, DEPLOY, CONFORMANCE, *sorted((REPO / "docs").glob("*.md"))):
        flat_doc = " ".join(text(doc).split())
        for match in re.finditer(r"`(test_[a-z0-9_]+)`", flat_doc):
            name = match[1]
            where = [src for src in sources.values() if re.search(rf"^def {name}\(", src, re.M)]
            assert where, f"{doc.name} names {name}, which no test file defines"
            before = where[0].split(f"def {name}(", 1)[0].rsplit("\n\n", 1)[-1]
            marked = "xfail" in before
            around = flat_doc[max(0, match.start() - 300): match.end() + 300].lower()
            claims = "expected failure" in around or "xfail" in around
            assert claims == marked, (f"{doc.name} {'calls' if claims else 'does not call'} {name} an expected "
                                      f"failure; the test is {'' if marked else 'not '}marked xfail")


def test_make_says_what_each_slow_step_does() -> None:
    """`make run` once sat silent for a minute while pip installed (--quiet): each recipe that
    creates or installs an environment announces itself in one line first (issue 19 item 9)."""
    makefile = text(REPO / "Makefile")
    recipes = re.split(r"\n(?=\S[^\n]*:)", makefile)
    slow = [r for r in recipes if "pip install" in r or "-m venv" in r]
    assert len(slow) >= 3, slow
    for recipe in slow:
        lines = [line.strip() for line in recipe.splitlines()[1:] if line.startswith("\t")]
        for index, line in enumerate(lines):
            if "pip install" in line and "--upgrade pip" not in line or "-m venv" in line:
                earlier = " ".join(lines[: index + 1])
                assert re.search(r"echo \"(installing|creating)[^\"]*\.\.\.\"", earlier), recipe
    run = next(r for r in recipes if r.startswith("run:"))
    assert "echo \"starting osteogate serve" in run
