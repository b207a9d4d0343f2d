"""Suite-wide fixtures: dcmtk PACS, Orthanc PACS, throwaway PostgreSQL, sample files.

Servers are real processes on free localhost ports; each fixture stops what it started, so a
failed test never leaves a listener behind.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# The repo root must be importable (gateway, model, training, sample_dicom, tests.helpers) even
# when the package is not pip-installed, e.g. a fresh CI checkout running plain `pytest`.
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

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
