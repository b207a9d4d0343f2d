"""/metrics and /healthz of a running gateway, scraped over HTTP while studies flow."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.gateway_harness import GatewayProcess
from tests.helpers import StoreSCP, free_port, sample_files, storescu, wait_until


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


def total(values: dict, name: str) -> float:
    return sum(v for (n, _), v in values.items() if n == name)


def test_metrics_move_and_health_reports(tmp_path: Path, dcmtk_pacs: StoreSCP, tiny_model: Path) -> None:
    http_port = free_port()
    files = [f for f in sample_files() if f.name.startswith("knee_dx")]
    gw = GatewayProcess(tmp_path / "gw", model=tiny_model, destinations=[f"PACS@127.0.0.1:{dcmtk_pacs.port}"],
                        env={"OSTEOGATE_HTTP_ENABLED": "true", "OSTEOGATE_HTTP_PORT": str(http_port)})
    with gw:
        health = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{http_port}/healthz", timeout=10).read())
        assert health["healthy"] is True and health["database"] is True and health["model_loaded"] is True
        before = scrape(http_port)
        assert total(before, "osteogate_instances_received_total") == 0
        assert total(before, "osteogate_spool_free_bytes") > 0

        assert storescu(files, "127.0.0.1", gw.port, "OSTEOGATE").returncode == 0
        dcmtk_pacs.wait_for_files("SR*.dcm", count=1, timeout=120)

        def delivered() -> dict:
            values = scrape(http_port)
            return values if total(values, "osteogate_deliveries_total") >= 1 else {}

        after = wait_until(delivered, 30)
        assert total(after, "osteogate_instances_received_total") == len(files)
        assert after[("osteogate_studies", (("status", "done"),))] == 1
        assert after[("osteogate_deliveries_total", (("outcome", "sent"),))] == 1
        assert total(after, "osteogate_inference_seconds_count") == 1
        assert after[("osteogate_queue_depth", ())] == 0
        missing = urllib.request.Request(f"http://127.0.0.1:{http_port}/nothing")
        try:
            urllib.request.urlopen(missing, timeout=10)
        except urllib.error.HTTPError as exc:
            assert exc.code == 404
        else:
            raise AssertionError("unknown path must be 404")
