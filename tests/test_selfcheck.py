"""Self-check findings, and the scheduler's maintenance jobs inside a running gateway."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from osteogate.gateway.core.config import load_settings
from osteogate.gateway.operate.selfcheck import run_selfcheck
from osteogate.gateway.store.db import Database

from tests.gateway_harness import GatewayProcess
from tests.helpers import (
    StoreSCP,
    dcmtk_available,
    free_port,
    make_dataset,
    storescu,
    wait_until,
    write_dataset,
)

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not dcmtk_available("storescu", "storescp"), reason="dcmtk missing")


def test_selfcheck_reports_each_finding(tmp_path: Path, dcmtk_pacs: StoreSCP) -> None:
    up, down = f"PACS@127.0.0.1:{dcmtk_pacs.port}", f"GONE@127.0.0.1:{free_port()}"
    settings = load_settings(environ={}, overrides={
        "storage": {"data_dir": str(tmp_path / "gw"), "min_free_mb": 0},
        "delivery": {"destinations": [up, down], "timeout_seconds": 3},
    })
    settings.storage.data_dir.mkdir()
    db = Database(settings.storage.resolved_database_url())
    db.migrate()
    findings = {f.check: f for f in run_selfcheck(settings, db)}
    assert findings["disk"].ok and findings["database"].ok
    assert findings[f"echo {up}"].ok and findings[f"echo {up}"].detail == "status 0x0000"
    assert not findings[f"echo {down}"].ok

    greedy = settings.model_copy(update={"storage": settings.storage.model_copy(update={"min_free_mb": 10**9})})
    assert not next(f for f in run_selfcheck(greedy, db) if f.check == "disk").ok
    db.dispose()

    env = {k: v for k, v in os.environ.items() if not k.startswith("OSTEOGATE_")}
    env |= {"OSTEOGATE_DELIVERY_DESTINATIONS": f"{up},{down}", "OSTEOGATE_STORAGE_MIN_FREE_MB": "0",
            "OSTEOGATE_DELIVERY_TIMEOUT_SECONDS": "3"}
    result = subprocess.run([sys.executable, "-m", "osteogate.gateway.operate.cli", "selfcheck", "--data-dir", str(tmp_path / "gw")],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert f"ok   echo {up}" in result.stdout and f"FAIL echo {down}" in result.stdout
    assert "ok   database" in result.stdout


def test_gateway_schedules_retention_and_selfcheck(tmp_path: Path, dcmtk_pacs: StoreSCP, tiny_model: Path) -> None:
    image = write_dataset(make_dataset(), tmp_path / "knee.dcm")
    study_uid = str(pydicom.dcmread(image).StudyInstanceUID)
    env = {"OSTEOGATE_RETENTION_SPOOL_DAYS": "7", "OSTEOGATE_SCHEDULER_RETENTION_SECONDS": "0.5"}
    with GatewayProcess(tmp_path / "gw", model=tiny_model, destinations=[f"PACS@127.0.0.1:{dcmtk_pacs.port}"],
                        env=env) as gw:
        assert storescu([image], "127.0.0.1", gw.port, "OSTEOGATE").returncode == 0
        dcmtk_pacs.wait_for_files("SR*.dcm", count=1, timeout=120)
        wait_until(lambda: gw.studies()[0]["delivered"] == "1/1", 30)
        spool = gw.data_dir / "spool" / study_uid
        assert list(spool.rglob("*.dcm"))
        # Delivered but young: kept. Then it "ages" 30 days: the next retention tick purges it.
        with sqlite3.connect(gw.data_dir / "osteogate.db") as conn:
            conn.execute("UPDATE studies SET last_received_at = datetime('now', '-30 days')")
        wait_until(lambda: not spool.exists(), 30)
        # The folder goes first, the spool_purged line right after it: wait for the line.
        events = wait_until(lambda: (lambda ev: ev if any(e.get("event") == "spool_purged" for e in ev) else None)(
            gw.events()), 10)
    purged = [e for e in events if e.get("event") == "spool_purged"]
    assert purged and purged[0]["files"] == 1
    checks = {e["check"]: e["ok"] for e in events if e.get("event") == "selfcheck"}
    assert checks.get("database") is True and checks.get(f"echo PACS@127.0.0.1:{dcmtk_pacs.port}") is True
    assert study_uid not in "".join(str(e) for e in events if e.get("event") in ("spool_purged", "selfcheck"))
