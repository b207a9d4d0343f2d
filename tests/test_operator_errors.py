"""Every operator-facing failure: one line on stderr, no traceback, a documented exit code.

Each case runs `osteogate` as a subprocess, the way an operator meets it: a port already taken,
a database that is down, a wrong AE title, an unreadable file in a folder being sent, a file
that is not a checkpoint, TLS switched on without a certificate, a read-only command pointed at
a data directory that does not exist.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from osteogate.gateway.core.errors import ExitCode
from osteogate.model.card import ModelCard
from pydicom.uid import generate_uid
from safetensors.numpy import save_file

from tests.gateway_harness import GatewayProcess
from tests.helpers import dcmtk_available, free_port, sample_file, wait_until

REPO = Path(__file__).resolve().parent.parent


def osteogate(*args: str, env: dict[str, str] | None = None, cwd: Path = REPO,
              timeout: float = 120) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("OSTEOGATE_")}
    base |= {"OMP_NUM_THREADS": "1", "OSTEOGATE_LOGGING_FORMAT": "json", "OSTEOGATE_STORAGE_MIN_FREE_MB": "0"}
    return subprocess.run([sys.executable, "-m", "osteogate.gateway.operate.cli", *args], cwd=cwd, env=base | (env or {}),
                          capture_output=True, text=True, timeout=timeout)


def one_line_error(result: subprocess.CompletedProcess[str], code: int, *words: str) -> str:
    """The failure is exactly one `osteogate:` line, the last on stderr, with the exit code."""
    output = result.stdout + result.stderr
    assert result.returncode == code, f"exit {result.returncode}, expected {code}:\n{output[-3000:]}"
    assert "Traceback" not in output, output[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("osteogate: ")]
    assert len(lines) == 1, result.stderr[-3000:]
    assert result.stderr.rstrip().splitlines()[-1] == lines[0]
    for word in words:
        assert word in lines[0], (word, lines[0])
    print(lines[0])  # the exact message, visible with pytest -s
    return lines[0]


def serve_args(tmp_path: Path, model: Path, port: int | None = None) -> list[str]:
    return ["serve", "--data-dir", str(tmp_path / "gw"), "--bind", "127.0.0.1", "--port", str(port or free_port()),
            "--model", str(model)]


# -- serve ---------------------------------------------------------------------------------------


def test_port_in_use_stops_serve_before_the_model_loads(tmp_path: Path, tiny_model: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = osteogate(*serve_args(tmp_path, tiny_model, port))
    one_line_error(result, ExitCode.TEMPFAIL, f"cannot listen on 127.0.0.1:{port}", "already in use", "--port")
    assert "model_loaded" not in result.stderr
    assert not (tmp_path / "gw").exists(), "nothing is created for a start that cannot work"


def test_http_port_in_use_is_named(tmp_path: Path, tiny_model: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = osteogate(*serve_args(tmp_path, tiny_model),
                           env={"OSTEOGATE_HTTP_ENABLED": "true", "OSTEOGATE_HTTP_PORT": str(port)})
    one_line_error(result, ExitCode.TEMPFAIL, f"127.0.0.1:{port}", "http.port")


def test_database_down(tmp_path: Path, tiny_model: Path) -> None:
    url = f"postgresql+psycopg://osteogate:s3cret@127.0.0.1:{free_port()}/osteogate"
    result = osteogate(*serve_args(tmp_path, tiny_model), "--database-url", url)
    line = one_line_error(result, ExitCode.UNAVAILABLE, "database", "unavailable", "127.0.0.1")
    assert "s3cret" not in result.stdout + result.stderr and "***" in line
    studies = osteogate("studies", "--database-url", url)
    one_line_error(studies, ExitCode.UNAVAILABLE, "database", "unavailable", "--database-url")


def test_bad_model_file(tmp_path: Path) -> None:
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"this is not a checkpoint" * 10)
    one_line_error(osteogate(*serve_args(tmp_path, bad)), ExitCode.CONFIG, "unusable model file", str(bad),
                   "not a safetensors file")
    config = tmp_path / "site.toml"
    config.write_text(f'[model]\npath = "{bad}"\n')
    check = osteogate("config", "check", str(config))
    assert check.returncode == ExitCode.CONFIG and "not a safetensors file" in check.stdout, check.stdout


def test_model_with_other_classes_is_refused_at_start(tmp_path: Path) -> None:
    """A card whose classes are not the gateway's (model/taxonomy.py) fails at start, not per job."""
    other = tmp_path / "other.safetensors"
    card = ModelCard(name="other", classes=("benign", "malignant"), regions=("knee",), trained=True)
    save_file({"w": np.zeros(1, dtype=np.float32)}, str(other), metadata={"osteogate.card": card.to_json()})
    result = osteogate(*serve_args(tmp_path, other))
    one_line_error(result, ExitCode.CONFIG, "model refused", "benign", "normal")
    assert "model_loaded" not in result.stderr


def test_tls_without_certificate(tmp_path: Path, tiny_model: Path) -> None:
    result = osteogate(*serve_args(tmp_path, tiny_model), env={"OSTEOGATE_DICOM_TLS_ENABLED": "true"})
    one_line_error(result, ExitCode.CONFIG, "dicom", "tls.enabled = true needs tls.cert_file and tls.key_file")
    config = tmp_path / "tls.toml"
    config.write_text("[dicom.tls]\nenabled = true\n")
    check = osteogate("config", "check", str(config))
    assert check.returncode == ExitCode.CONFIG and "tls.cert_file" in check.stdout, check.stdout


def test_unreadable_certificate_is_caught_by_config_check(tmp_path: Path) -> None:
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    cert.write_text("not a certificate\n")
    key.write_text("not a key\n")
    config = tmp_path / "tls.toml"
    config.write_text(f'[dicom.tls]\nenabled = true\ncert_file = "{cert}"\nkey_file = "{key}"\n')
    check = osteogate("config", "check", str(config))
    assert check.returncode == ExitCode.CONFIG and "dicom.tls: the certificate or key cannot be used" in check.stdout


# -- DICOM peers ---------------------------------------------------------------------------------


def _image_without_pixels(path: Path) -> Path:
    """A DX header with no Pixel Data: the gateway refuses it (0xA900), the send goes on."""
    ds = pydicom.dcmread(sample_file("knee_dx.dcm"))
    del ds.PixelData
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.skipif(not dcmtk_available("storescu"), reason="dcmtk missing")
def test_wrong_ae_and_unreadable_files_in_a_sent_folder(tmp_path: Path, tiny_model: Path) -> None:
    folder = tmp_path / "to-send"
    folder.mkdir()
    for name in ("knee_dx.dcm", "knee_dx_2.dcm"):
        (folder / name).write_bytes(sample_file(name).read_bytes())
    (folder / "garbage.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 64)  # preamble, then nothing usable
    _image_without_pixels(folder / "report.dcm")  # refused by the gateway: no Pixel Data
    (folder / "notes.txt").write_text("not DICOM\n")

    with GatewayProcess(tmp_path / "gw", model=tiny_model, stable_seconds=30) as gw:
        wrong = osteogate("send", str(folder / "knee_dx.dcm"), "--to", f"WRONG@127.0.0.1:{gw.port}")
        one_line_error(wrong, ExitCode.UNAVAILABLE, f"send to WRONG@127.0.0.1:{gw.port}", "rejected")
        echo = osteogate("echo", f"WRONG@127.0.0.1:{gw.port}")
        one_line_error(echo, ExitCode.UNAVAILABLE, f"echo to WRONG@127.0.0.1:{gw.port}", "rejected")

        sent = osteogate("send", str(folder), "--to", gw.address)
        output = sent.stdout + sent.stderr
        print(output)  # the exact lines, visible with pytest -s
        assert sent.returncode == ExitCode.PARTIAL, output
        assert "Traceback" not in output
        assert "skip" in sent.stderr and "garbage.dcm" in sent.stderr
        assert any(line.startswith("FAIL") and "report.dcm" in line for line in sent.stdout.splitlines()), output
        assert sum(line.startswith("ok") for line in sent.stdout.splitlines()) == 2, output
        assert "sent 2 of 3 DICOM file(s)" in sent.stdout
        wait_until(lambda: sum(r["instances"] for r in gw.studies()) == 2, 30)


# -- read-only commands create nothing ------------------------------------------------------------


READ_ONLY = [["studies"], ["show", "1.2.3.4"], ["db", "current"], ["selfcheck"], ["purge", "--older-than", "7"],
             ["resend", "1.2.3.4"], ["replay", "1.2.3.4"]]


@pytest.mark.parametrize("command", READ_ONLY, ids=lambda c: c[0] + ("-" + c[1] if c[0] == "db" else ""))
def test_commands_never_create_a_database(tmp_path: Path, command: list[str]) -> None:
    result = osteogate(*command, cwd=tmp_path)  # no --data-dir: the default ./var, relative to tmp_path
    one_line_error(result, ExitCode.NOINPUT, f"no OsteoGate database at {tmp_path / 'var' / 'osteogate.db'}",
                   "the default", f"working directory {tmp_path}", "--data-dir")
    assert list(tmp_path.iterdir()) == [], "a read-only command created files"


def test_missing_database_names_the_setting_that_led_there(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    line = one_line_error(osteogate("studies", "--data-dir", str(missing)), ExitCode.NOINPUT, str(missing),
                          "--data-dir")
    assert "from the command line (--data-dir)" in line
    config = tmp_path / "site.toml"
    config.write_text(f'[storage]\ndata_dir = "{missing}"\n')
    one_line_error(osteogate("show", "1.2.3", "--config", str(config)), ExitCode.NOINPUT, str(config))
    one_line_error(osteogate("db", "current", env={"OSTEOGATE_STORAGE_DATA_DIR": str(missing)}), ExitCode.NOINPUT,
                   "OSTEOGATE_STORAGE_DATA_DIR")
    assert not missing.exists()


def test_usage_errors_exit_64(tmp_path: Path) -> None:
    result = osteogate("studies", "--since", "whenever", "--data-dir", str(tmp_path))
    assert result.returncode == ExitCode.USAGE and "Traceback" not in result.stderr
    assert osteogate("no-such-command").returncode == ExitCode.USAGE


def test_db_upgrade_creates_and_db_current_reads(tmp_path: Path) -> None:
    data_dir = tmp_path / "gw"
    upgrade = osteogate("db", "upgrade", "--data-dir", str(data_dir))
    assert upgrade.returncode == 0 and "was empty" in upgrade.stdout, upgrade.stderr
    current = osteogate("db", "current", "--data-dir", str(data_dir))
    assert current.returncode == 0 and "head is" in current.stdout
    studies = osteogate("studies", "--json", "--data-dir", str(data_dir))
    assert studies.returncode == 0 and json.loads(studies.stdout) == []


def test_show_unknown_study_is_one_line(tmp_path: Path) -> None:
    data_dir = tmp_path / "gw"
    assert osteogate("db", "upgrade", "--data-dir", str(data_dir)).returncode == 0
    one_line_error(osteogate("show", "0123456789abcdef", "--data-dir", str(data_dir)), ExitCode.NOINPUT,
                   "no study 0123456789abcdef", "osteogate studies")
    one_line_error(osteogate("resend", "1.2.3.4", "--data-dir", str(data_dir)), ExitCode.NOINPUT, "no study 1.2.3.4")


# -- the serving path never imports torch --------------------------------------------------------


BLOCKER = '''
import sys
BLOCKED = {"torch", "torchvision", "timm", "albumentations", "onnx", "onnxscript"}
class _Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            with open(LOG, "a") as handle:
                handle.write(name + "\\n")
            raise ImportError(f"blocked by the test: {name}")
        return None
sys.meta_path.insert(0, _Blocker())
'''


@pytest.mark.skipif(not dcmtk_available("storescu", "storescp"), reason="dcmtk missing")
def test_serve_classifies_with_the_shipped_model_without_torch(tmp_path: Path, dcmtk_pacs: object) -> None:
    """With torch made unimportable, `serve` with the shipped model (and its shipped ONNX file)
    receives, classifies and delivers: what a serving-only install does."""
    from osteogate.gateway.operate.preflight import SHIPPED_MODEL

    from tests.helpers import storescu

    site = tmp_path / "site"
    site.mkdir()
    log = tmp_path / "blocked.txt"
    (site / "sitecustomize.py").write_text(f"LOG = {str(log)!r}\n" + BLOCKER)
    env = {"PYTHONPATH": f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}".rstrip(os.pathsep)}
    pacs = dcmtk_pacs
    with GatewayProcess(tmp_path / "gw", model=SHIPPED_MODEL, env=env,
                        destinations=[f"PACS@127.0.0.1:{pacs.port}"]) as gw:  # type: ignore[attr-defined]
        assert storescu([sample_file("knee_dx.dcm")], "127.0.0.1", gw.port, "OSTEOGATE").returncode == 0
        reports = pacs.wait_for_files("SR*.dcm", count=1, timeout=180)  # type: ignore[attr-defined]
        events = gw.events()
    assert not log.exists(), f"the serving path tried to import: {log.read_text()}"
    loaded = [e for e in events if e.get("event") == "model_loaded"]
    assert loaded and loaded[0]["backend"] == "onnxruntime-cpu" and loaded[0]["trained"] is True
    assert pydicom.dcmread(reports[0]).Modality == "SR"
    warnings = {e.get("event") for e in events if e.get("level") == "warning"}
    assert "any_caller_accepted" in warnings  # loud: no allow-list


def test_database_schema_this_release_does_not_know(tmp_path: Path) -> None:
    """A schema made by a newer release, or one altered by hand: refused with 65, never 'fixed'."""
    import sqlite3

    newer = tmp_path / "newer"
    assert osteogate("db", "upgrade", "--data-dir", str(newer)).returncode == 0
    with sqlite3.connect(newer / "osteogate.db") as connection:
        connection.execute("UPDATE alembic_version SET version_num = '0099_from_the_future'")
    one_line_error(osteogate("db", "upgrade", "--data-dir", str(newer)), ExitCode.DATAERR,
                   "0099_from_the_future", "newer release")

    odd = tmp_path / "odd"
    odd.mkdir()
    with sqlite3.connect(odd / "osteogate.db") as connection:
        connection.execute("CREATE TABLE studies (id INTEGER PRIMARY KEY, something TEXT)")
    one_line_error(osteogate("db", "upgrade", "--data-dir", str(odd)), ExitCode.DATAERR,
                   "matches no known revision", "by hand")


# -- operator arguments: missing and mistyped config, hostile values, a closed stdout -------------


def test_config_file_missing_is_66_and_typos_name_the_key_meant(tmp_path: Path) -> None:
    one_line_error(osteogate("serve", "--config", str(tmp_path / "nosuch.toml")), ExitCode.NOINPUT,
                   "nosuch.toml does not exist", "--config")
    typo = tmp_path / "typo.toml"
    typo.write_text('[dicom]\nprot = 104\n[storage]\ndata_dir = "a\\u0000b"\n')
    line = one_line_error(osteogate("studies", "--config", str(typo)), ExitCode.CONFIG,
                          "dicom.prot: unknown key (did you mean `port`?)", "storage.data_dir: contains a NUL byte")
    assert "Extra inputs" not in line
    check = osteogate("config", "check", str(typo))
    assert check.returncode == ExitCode.CONFIG and "did you mean `port`?" in check.stdout + check.stderr
    # `config check` of a file that is not there: 66 as well (it said 78, "a wrong file").
    missing = osteogate("config", "check", str(tmp_path / "nosuch.toml"))
    assert missing.returncode == ExitCode.NOINPUT and "does not exist" in missing.stdout, missing


@pytest.mark.parametrize("option", ["--data-dir", "--config"])
def test_long_paths_under_the_argument_limit_still_give_a_short_line(tmp_path: Path, option: str) -> None:
    """A 3 kB path (below the 4096-character argument limit) once came back twice in a 6 kB
    error line: the line names its start and end, and stays readable."""
    path = "a/" * 1500 + "end"
    line = one_line_error(osteogate("studies", option, path, cwd=tmp_path),
                          ExitCode.NOINPUT, "characters]", "/end")
    assert len(line) < 1200, len(line)


HOSTILE = ["../../../etc/passwd", "1.2.3/../../x", "1.2.3;touch PWNED", "$(touch PWNED)", "`touch PWNED`",
           "1.2.3 | tee PWNED", "x" * 10_000, "\u202e1.2.3", "-1.2.3"]


@pytest.mark.parametrize("verb", ["show", "resend", "replay"])
def test_hostile_study_identifiers_are_refused_before_anything_runs(tmp_path: Path, verb: str) -> None:
    data_dir = tmp_path / "gw"
    assert osteogate("db", "upgrade", "--data-dir", str(data_dir)).returncode == 0
    before = sorted(p.name for p in data_dir.iterdir())
    for value in HOSTILE:
        result = osteogate(verb, "--data-dir", str(data_dir), "--", value, cwd=tmp_path)
        output = result.stdout + result.stderr
        assert result.returncode == ExitCode.USAGE, (value[:40], output[-2000:])
        assert "Traceback" not in output and len(result.stderr) < 2000, output[-2000:]
        assert "x" * 100 not in output  # a 10 kB argument is not echoed back
    assert not list(tmp_path.glob("PWNED*")) and sorted(p.name for p in data_dir.iterdir()) == before


def test_hostile_paths_and_options(tmp_path: Path) -> None:
    from osteogate.gateway.core.config import ConfigError, load_settings
    from osteogate.gateway.operate.cli import main

    long = osteogate("studies", "--data-dir", "d" * 10_000, cwd=tmp_path)
    one_line_error(long, ExitCode.USAGE, "10000 characters")
    metachar = osteogate("studies", "--data-dir", "$(touch PWNED);x", cwd=tmp_path)
    one_line_error(metachar, ExitCode.NOINPUT, "no OsteoGate database")
    assert list(tmp_path.iterdir()) == []
    # A NUL cannot pass through exec(); in-process callers and config files can carry one.
    assert main(["studies", "--data-dir", "a\0b"]) == ExitCode.USAGE
    assert main(["show", "1.2\0.3"]) == ExitCode.USAGE
    with pytest.raises(ConfigError, match="NUL byte"):
        load_settings("a\0b.toml", environ={})
    with pytest.raises(ConfigError, match="model.path: contains a NUL byte"):
        load_settings(environ={"OSTEOGATE_MODEL_PATH": "x"}, overrides={"model": {"path": "a\0b"}})


def test_closed_stdout_ends_quietly(tmp_path: Path) -> None:
    """`osteogate studies --json | head`: the reader leaving is not a network error."""
    data_dir = tmp_path / "gw"
    assert osteogate("db", "upgrade", "--data-dir", str(data_dir)).returncode == 0
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first byte
    base = {k: v for k, v in os.environ.items() if not k.startswith("OSTEOGATE_")}
    try:
        result = subprocess.run([sys.executable, "-m", "osteogate.gateway.operate.cli", "studies", "--json",
                                 "--data-dir", str(data_dir)], stdout=write_end, stderr=subprocess.PIPE,
                                cwd=REPO, env=base, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert result.returncode == 141, result.stderr
    assert result.stderr == ""
