"""Suite-wide fixtures: dcmtk PACS, Orthanc PACS, throwaway PostgreSQL, sample files.

Servers are real processes on free localhost ports; each fixture stops what it started, so a
failed test never leaves a listener behind.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# The repo root must be importable (gateway, model, training, sample_dicom, tests.helpers) even
# when the package is not pip-installed, e.g. a fresh CI checkout running plain `pytest`.
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# A skip whose reason says a system tool is missing. Outside CI it stays a skip (a developer may
# lack Orthanc); in CI (CI=true, as .ci/run runs) it is a failure: the suite must not go green on
# a machine without the tools it exists to exercise.
MISSING_TOOL = re.compile(r"not installed|dcmtk missing|missing: |initdb|no '\w+' OS user", re.IGNORECASE)


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if not (report.skipped and in_ci()) or hasattr(report, "wasxfail"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if MISSING_TOOL.search(reason):
        report.outcome = "failed"
        report.longrepr = f"CI=true and a system tool this test needs is missing ({reason}): install it (.ci/run)"


from tests.helpers import (  # noqa: E402
    OrthancServer,
    PostgresCluster,
    StoreSCP,
    dcmtk_available,
    orthanc_binary,
    sample_files,
    unavailable_reason,
)


@pytest.fixture
def dcmtk_pacs(tmp_path: Path) -> Iterator[StoreSCP]:
    """dcmtk storescp as PACS (AE "PACS") on a free port; received files land in `.dir`."""
    if not dcmtk_available("storescp", "storescu", "echoscu"):
        pytest.skip("dcmtk (storescp/storescu/echoscu) not installed")
    scp = StoreSCP(tmp_path / "pacs", ae_title="PACS")
    scp.start()
    try:
        yield scp
    finally:
        scp.stop()


@pytest.fixture
def orthanc_pacs(tmp_path: Path) -> Iterator[OrthancServer]:
    """A private Orthanc (AE "ORTHANC"), DICOM and HTTP on free ports, REST at `.http_url`."""
    if orthanc_binary() is None:
        pytest.skip("Orthanc not installed")
    server = OrthancServer(tmp_path / "orthanc")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    """One throwaway cluster per test session (initdb costs seconds; databases are cheap)."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    cluster = PostgresCluster(database="osteogate")
    try:
        # Binaries present but start failing is a real problem: error loudly, do not skip.
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def postgres_url(postgres_cluster: PostgresCluster) -> str:
    """SQLAlchemy URL of database `osteogate` in the session cluster (shared by all tests)."""
    return postgres_cluster.url


_fresh_db_counter = iter(range(1, 1_000_000))


@pytest.fixture
def fresh_postgres_url(postgres_cluster: PostgresCluster) -> Iterator[str]:
    """SQLAlchemy URL of a brand-new empty database, dropped after the test (isolation)."""
    name = f"osteogate_t{next(_fresh_db_counter)}"
    url = postgres_cluster.create_database(name)
    try:
        yield url
    finally:
        postgres_cluster.drop_database(name)


@pytest.fixture
def samples() -> list[Path]:
    """Paths of the shipped sample DICOM files (sample_dicom/*.dcm)."""
    files = sample_files()
    if not files:
        pytest.fail("sample_dicom/*.dcm missing: run python sample_dicom/make_samples.py")
    return files


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained small-CNN checkpoint with its ONNX sibling: a real forward pass, made fast."""
    from osteogate.model.export import export_onnx
    from osteogate.model.network import create_untrained_checkpoint

    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    create_untrained_checkpoint(path, architecture="osteogate_smallcnn")
    export_onnx(path)
    return path


@pytest.fixture(autouse=True)
def _fresh_logging() -> Iterator[None]:
    """Each test starts from structlog's defaults: a test that configured logging onto its own
    captured stream (the CLI does, on every call) must not leave later tests in the same worker
    writing into that stale stream."""
    yield
    import logging

    import structlog
    from osteogate.gateway.core.logs import _OurHandler

    structlog.reset_defaults()
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _OurHandler)]:
        root.removeHandler(handler)
    logging.captureWarnings(False)
