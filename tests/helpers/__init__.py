"""Reusable test helpers: free ports, polling, dcmtk/Orthanc/PostgreSQL test servers, datasets."""

from .datasets import REPO_ROOT, SAMPLE_DIR, make_dataset, sample_file, sample_files, write_dataset
from .dcmtk import STORESCU_TS_FLAGS, StoreSCP, dcmtk_available, echoscu, storescu
from .net import free_port, port_open, wait_until
from .orthanc import OrthancServer, dicomweb_plugin, orthanc_binary, recipe_orthanc
from .postgres import PostgresCluster, pg_bindir, unavailable_reason

__all__ = [
    "REPO_ROOT",
    "SAMPLE_DIR",
    "STORESCU_TS_FLAGS",
    "OrthancServer",
    "PostgresCluster",
    "StoreSCP",
    "dcmtk_available",
    "dicomweb_plugin",
    "echoscu",
    "free_port",
    "make_dataset",
    "orthanc_binary",
    "pg_bindir",
    "recipe_orthanc",
    "port_open",
    "sample_file",
    "sample_files",
    "storescu",
    "unavailable_reason",
    "wait_until",
    "write_dataset",
]
