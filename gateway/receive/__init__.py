"""Stage 1, receive: DICOM in. The pynetdicom Storage/Verification SCP (scp), its connection
gate (connections) and streaming socket (streaming), ingest (validation: parse and checks;
integrity: duplicates and UID conflicts; ingest: spool and SQL record *before* the success
status) and the study tracker that turns a quiet study into a job.

Hands on: a spooled instance (file + instances row), then a classify job (jobs row).
May import: ``gateway.core``, ``gateway.store.wiring``, ``osteogate.model`` (pixel budget checks).
"""
