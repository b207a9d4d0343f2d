"""Foundations every stage uses: settings, errors and exit codes, logging, UID checks, DICOM
networking primitives (TLS, client associations, status classes, backoff) and the Prometheus
counters.

Owns: ``config``, ``errors``, ``logs``, ``uids``, ``dicomnet``, ``metrics``.
May import: ``osteogate.model`` (taxonomy only) and libraries; never another gateway package.
"""
