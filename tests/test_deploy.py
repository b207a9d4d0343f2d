"""deploy/ stays in step with the code: example config, compose file, systemd unit, conformance.

These are text checks (no Docker engine, no systemd needed): every Settings key is documented
in the example file with its default and its environment variable, the compose environment is
accepted by the settings loader, and the conformance statement names every SOP class and
transfer syntax the SCP really accepts.
"""

from __future__ import annotations

import configparser
import re
import tomllib
from pathlib import Path

import pytest
import yaml
from osteogate.gateway.core.config import ENV_PREFIX, Settings, load_settings
from osteogate.gateway.core.errors import NO_RESTART
from osteogate.gateway.receive.scp import TRANSFER_SYNTAXES
from osteogate.gateway.receive.validation import (
    ACCEPTED_SOP_CLASSES,
    CANNOT_UNDERSTAND,
    DATASET_DOES_NOT_MATCH_SOP_CLASS,
    OUT_OF_RESOURCES,
)

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
EXAMPLE = DEPLOY / "osteogate.example.toml"
COMPOSE = DEPLOY / "compose.yaml"
UNIT = DEPLOY / "osteogate.service"
CONFORMANCE = DEPLOY / "CONFORMANCE.md"

VERIFICATION = "1.2.840.10008.1.1"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


def settings_keys() -> list[tuple[str, str]]:
    """(section, key) for every field of every section model of Settings."""
    keys = []
    for section, field in Settings.model_fields.items():
        model = field.annotation
        assert model is not None and hasattr(model, "model_fields"), section
        keys.extend((section, key) for key in model.model_fields)
    return keys


def env_name(section: str, key: str) -> str:
    return f"{ENV_PREFIX}{section.upper()}_{key.upper()}"


# -- example configuration -----------------------------------------------------------------------


def test_example_config_loads_without_environment():
    settings = load_settings(EXAMPLE, environ={})
    # No live example destination: copied as is, it must not retry a PACS that is not there.
    assert settings.delivery.destinations == []


def test_example_config_values_are_the_defaults():
    """The example documents the defaults, every one of them."""
    assert load_settings(EXAMPLE, environ={}).model_dump() == Settings().model_dump()


def test_example_config_names_every_settings_key():
    data = tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))
    missing = [f"{s}.{k}" for s, k in settings_keys() if k not in data.get(s, {})]
    assert not missing, f"keys missing from {EXAMPLE.name}: {missing}"
    extra = [f"{s}.{k}" for s, items in data.items() for k in items if (s, k) not in settings_keys()]
    assert not extra, f"keys in {EXAMPLE.name} that Settings does not know: {extra}"


def test_example_config_names_every_env_override():
    text = EXAMPLE.read_text(encoding="utf-8")
    missing = [env_name(s, k) for s, k in settings_keys() if env_name(s, k) not in text]
    assert not missing, f"environment variables not documented in {EXAMPLE.name}: {missing}"


def test_example_config_comments_every_key():
    """Each key line is preceded by a comment (its documentation)."""
    lines = EXAMPLE.read_text(encoding="utf-8").splitlines()
    undocumented = []
    for index, line in enumerate(lines):
        match = re.match(r"^([a-z_]+)\s*=", line)
        if match and not lines[index - 1].lstrip().startswith("#"):
            undocumented.append(match[1])
    assert not undocumented, f"keys without a comment above them: {undocumented}"


# -- compose -------------------------------------------------------------------------------------


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))


def _interpolate(value: str) -> str:
    """Compose's ${VAR:-default} / ${VAR} with an empty environment."""
    return re.sub(r"\$\{[A-Z0-9_]+(?::?-([^}]*))?\}", lambda m: m[1] or "", value)


def test_compose_parses_and_names_the_services():
    services = _compose()["services"]
    for name in ("gateway", "worker", "postgres", "orthanc"):
        assert name in services, name
    assert services["postgres"]["image"].startswith("postgres:15")
    assert "healthcheck" in services["postgres"]
    assert "4242:4242" in services["orthanc"]["ports"]
    assert any(str(p).endswith("8042:8042") for p in services["orthanc"]["ports"])
    # Orthanc's settings (the gateway as its DICOM modality among them) live in the mounted recipe,
    # deploy/orthanc/orthanc.json; tests/test_orthanc_recipe.py checks the wiring in full.
    assert "./orthanc/orthanc.json:/etc/orthanc/orthanc.json:ro" in services["orthanc"]["volumes"]


@pytest.mark.parametrize("service", ["gateway", "worker", "worker-gpu"])
def test_compose_gateway_environment_is_valid_settings(service):
    """Every OSTEOGATE_* variable of a gateway container is a real key with a valid value."""
    environment = _compose()["services"][service]["environment"]
    env = {k: _interpolate(str(v)) for k, v in environment.items() if k.startswith(ENV_PREFIX)}
    settings = load_settings(EXAMPLE, environ=env)
    assert settings.storage.database_url.startswith("postgresql+psycopg://")
    assert [str(d) for d in settings.delivery.destinations] == ["ORTHANC@orthanc:4242"]
    assert settings.worker.enabled


def test_compose_services_share_the_data_volume():
    services = _compose()["services"]
    for name in ("gateway", "worker"):
        assert "osteogate-data:/var/lib/osteogate" in services[name]["volumes"], name


# -- Dockerfiles ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfile_essentials(name):
    text = (DEPLOY / name).read_text(encoding="utf-8")
    assert re.search(r"^USER\s+osteogate", text, re.M), "must run as a non-root user"
    assert re.search(r"^EXPOSE\s+11112", text, re.M)
    assert re.search(r"^VOLUME\s+/var/lib/osteogate", text, re.M)
    assert "osteogate echo OSTEOGATE@127.0.0.1:11112" in text.replace('", "', " ").replace('"', "")
    assert '"serve", "--config", "/etc/osteogate/osteogate.toml"' in text
    assert (DEPLOY / f"{name}.dockerignore").is_file()
    # Files the image COPYs exist and are let through by the allow-list .dockerignore.
    root = DEPLOY.parent
    allowed = {
        line[1:].rstrip("/")
        for line in (DEPLOY / f"{name}.dockerignore").read_text(encoding="utf-8").splitlines()
        if line.startswith("!")
    }
    for source in re.findall(r"^COPY\s+(?!--from)(.+?)\s+\S+$", text, re.M):
        for part in source.split():
            assert (root / part).exists(), f"{name} copies missing {part}"
            assert part.rstrip("/") in allowed, f"{name}.dockerignore excludes {part}"


def test_dockerfile_environment_is_valid_settings():
    """ENV OSTEOGATE_* lines of both images are accepted by the settings loader."""
    for name in ("Dockerfile", "Dockerfile.cuda"):
        text = (DEPLOY / name).read_text(encoding="utf-8")
        env = dict(re.findall(r"\b(OSTEOGATE_[A-Z_]+)=(\"[^\"]*\"|\S+)", text))
        env = {k: v.strip('"') for k, v in env.items() if k != "OSTEOGATE_CONFIG"}
        assert env, name
        load_settings(EXAMPLE, environ=env)


# -- systemd -------------------------------------------------------------------------------------


def test_systemd_unit():
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # keys are case-sensitive
    parser.read_string(UNIT.read_text(encoding="utf-8"))
    service = parser["Service"]
    assert "osteogate serve" in service["ExecStart"]
    assert "--config /etc/osteogate/osteogate.toml" in service["ExecStart"]
    assert service["User"] == "osteogate"
    assert service["Restart"] == "on-failure"
    # No restart after what only an administrator can fix (gateway/core/errors.py NO_RESTART).
    assert sorted(int(c) for c in service["RestartPreventExitStatus"].split()) == sorted(map(int, NO_RESTART))
    # Documentation= points where the install steps of deploy/README.md put the sources.
    install_dir = re.search(r"git clone [^\n]* (/opt/osteogate/src)\n", (DEPLOY / "README.md").read_text())
    assert install_dir, "deploy/README.md install steps"
    for url in parser["Unit"]["Documentation"].split():
        assert url.startswith(f"file://{install_dir[1]}/deploy/"), url
        assert (DEPLOY / url.rsplit("/", 1)[1]).is_file(), url
    assert service["KillSignal"] == "SIGTERM"
    assert service["ProtectSystem"] == "strict"
    assert "/var/lib/osteogate" in service["ReadWritePaths"]
    assert service["NoNewPrivileges"] == "yes"
    assert service["PrivateTmp"] == "yes"
    # The worker gets 30 s to finish its study on stop; systemd must wait longer.
    assert int(service["TimeoutStopSec"]) > 30
    assert parser["Install"]["WantedBy"] == "multi-user.target"


# -- conformance statement -----------------------------------------------------------------------


def test_conformance_lists_every_accepted_sop_class():
    text = CONFORMANCE.read_text(encoding="utf-8")
    missing = [uid for uid in [*ACCEPTED_SOP_CLASSES, VERIFICATION, COMPREHENSIVE_3D_SR] if uid not in text]
    assert not missing, f"SOP classes missing from CONFORMANCE.md: {missing}"


def test_conformance_lists_every_transfer_syntax():
    text = CONFORMANCE.read_text(encoding="utf-8")
    missing = [str(uid) for uid in TRANSFER_SYNTAXES if f"| {uid} |" not in text]
    assert not missing, f"transfer syntaxes missing from CONFORMANCE.md: {missing}"


def test_conformance_lists_no_transfer_syntax_the_scp_lacks():
    """Rows of the transfer syntax table are exactly gateway.receive.scp.TRANSFER_SYNTAXES."""
    text = CONFORMANCE.read_text(encoding="utf-8")
    table = text.split("Table 3.2.2.2-b", 1)[1].split("\n\n", 2)[1]
    listed = re.findall(r"\|\s*(1\.2\.840\.10008\.1\.2[0-9.]*)\s*\|", table)
    assert sorted(listed) == sorted(str(uid) for uid in TRANSFER_SYNTAXES)


def test_conformance_lists_the_status_codes():
    text = CONFORMANCE.read_text(encoding="utf-8")
    for code in (0x0000, OUT_OF_RESOURCES, DATASET_DOES_NOT_MATCH_SOP_CLASS, CANNOT_UNDERSTAND):
        assert f"0x{code:04X}" in text, hex(code)
