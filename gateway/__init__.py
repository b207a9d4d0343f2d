"""OsteoGate's DICOM gateway, one package per stage the data passes through.

    receive -> store -> work -> report -> deliver        (the pipeline)
    groundtruth, backfill                                (DXA results in; the archive screened)
    operate                                              (CLI, service wiring, health, admin)
    core                                                 (config, errors, logs, UIDs, DICOM net)

A stage imports ``core``, ``store`` and the stages before it, never one after it; ``operate`` wires
them together. The rules are import-linter contracts in pyproject.toml; docs/ARCHITECTURE.md is
the map.
"""
