"""Screening the archive: Query/Retrieve (C-FIND, C-MOVE/C-GET) or DICOMweb (QIDO-RS,
WADO-RS) backfill, throttled and resumable, whose studies arrive through ``receive`` like any
other; the plan and each study's state live in the store.

May import: ``gateway.core``, ``gateway.store.wiring``.
"""
