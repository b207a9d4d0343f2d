"""Self-check: disk space, database reachability, C-ECHO (DICOMweb: QIDO-RS) of each destination.

Run daily by the scheduler (findings go to the log, where the site's monitoring picks them up)
and on demand by ``osteogate selfcheck``. A failed check is reported, never raised: the point is
to say what is wrong while the gateway keeps doing what it still can.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from typing import Any

from osteogate.gateway.core.config import Destination, Settings
from osteogate.gateway.core.logs import get_logger
from osteogate.gateway.store.db import Database

log = get_logger("osteogate.gateway.operate.selfcheck")


@dataclass(frozen=True)
class Finding:
    check: str  # "disk", "database", "echo AET@HOST:PORT"
    ok: bool
    detail: str


def check_disk(settings: Settings) -> Finding:
    path = settings.storage.data_dir
    path.mkdir(parents=True, exist_ok=True)
    free_mb = shutil.disk_usage(path).free / 2**20
    ok = free_mb >= settings.storage.min_free_mb
    return Finding("disk", ok, f"{free_mb:.0f} MB free under data_dir (minimum {settings.storage.min_free_mb} MB)")


def check_database(db: Database) -> Finding:
    try:
        ok = db.ping()
    except Exception as exc:
        return Finding("database", False, f"unreachable: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    return Finding("database", ok, f"{db.engine.dialect.name} reachable")


def check_echo(destination: Destination, calling_aet: str, timeout: float, tls: Any = None) -> Finding:
    from osteogate.gateway.core.dicomnet import (
        AssociationError,
        association,
        client_ae,
        response_status,
        response_text,
    )
    from pynetdicom.sop_class import Verification

    ae = client_ae(calling_aet, timeout)
    ae.add_requested_context(Verification)
    name = f"echo {destination}"
    try:
        with association(ae, destination, tls) as assoc:
            response = assoc.send_c_echo()
    except AssociationError as exc:
        return Finding(name, False, exc.detail)
    code = response_status(response)
    return Finding(name, code == 0, f"status 0x{code:04X}" if code == 0 else response_text(response))


def run_selfcheck(settings: Settings, db: Database) -> list[Finding]:
    findings = [check_disk(settings), check_database(db)]
    for destination in settings.delivery.destinations:
        if destination.kind == "dicomweb":  # no C-ECHO over HTTP: a QIDO-RS search instead
            from osteogate.gateway.deliver.stow import check_stow

            ok, detail = check_stow(destination, min(settings.delivery.timeout_seconds, 10))
            findings.append(Finding(f"dicomweb {destination}", ok, detail))
            continue
        try:
            findings.append(check_echo(destination, settings.delivery_calling_aet,
                                       min(settings.delivery.timeout_seconds, 10),
                                       getattr(settings.delivery, "tls", None)))
        except Exception as exc:  # e.g. TLS misconfiguration: report it, do not stop the others
            findings.append(Finding(f"echo {destination}", False, f"{type(exc).__name__}: {exc}"))
    for finding in findings:
        (log.info if finding.ok else log.error)("selfcheck", check=finding.check, ok=finding.ok, detail=finding.detail)
    return findings
