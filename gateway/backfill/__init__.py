"""Screening the archive: Query/Retrieve (C-FIND, C-MOVE/C-GET) or DICOMweb (QIDO-RS,
WADO-RS) backfill, throttled and resumable, whose studies arrive through ``receive`` like any
other (the PACS sends them to the gateway's listener); the plan and each study's state live in
the store (gateway/store/backfill.py).

Owns: ``query`` (C-FIND keys, date chunks, capped answers), ``retrieve`` (C-MOVE, C-GET, statuses,
forwarding), ``dicomweb`` (QIDO-RS/WADO-RS source), ``sources``, ``window`` (time window, rate
limit), ``ledger`` (SQL plan and states), ``engine`` (the loop), ``metrics`` (Prometheus),
``setup`` (settings -> a run; the scheduled job) and ``cli`` (``osteogate backfill``).
May import: ``gateway.core``, ``gateway.store``, ``model.checkpoint`` (the served model's hash).
"""
