"""/metrics and /healthz of a running gateway, scraped over HTTP while studies flow."""

from __future__ import annotations

import json
import socket
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.gateway_harness import GatewayProcess
from tests.helpers import StoreSCP, free_port, make_dataset, sample_files, storescu, wait_until, write_dataset


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


def test_half_open_request_does_not_blind_health(tmp_path: Path, tiny_model: Path) -> None:
    http_port = free_port()
    env = {"OSTEOGATE_HTTP_ENABLED": "true", "OSTEOGATE_HTTP_PORT": str(http_port)}
    with GatewayProcess(tmp_path / "gw", model=tiny_model, env=env):
        stalled = [socket.create_connection(("127.0.0.1", http_port), timeout=10) for _ in range(3)]
        for sock in stalled:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # ... and never the blank line
        try:
            started = time.monotonic()
            health = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{http_port}/healthz", timeout=5).read())
            assert health["healthy"] is True
            assert "osteogate_instances_received_total" in urllib.request.urlopen(
                f"http://127.0.0.1:{http_port}/metrics", timeout=5).read().decode()
            assert time.monotonic() - started < 2
            # The stalled requests are dropped once the request timeout passes.
            for sock in stalled:
                sock.settimeout(10)
                assert sock.recv(1024) == b""
        finally:
            for sock in stalled:
                sock.close()


def test_calling_ae_labels_are_bounded(tmp_path: Path, tiny_model: Path) -> None:
    """Only AE titles on the allow-list become label values; everyone else is "other"."""
    http_port = free_port()
    callers = ["GOODMOD", *(f"RANDOM{n}" for n in range(5))]
    env = {"OSTEOGATE_HTTP_ENABLED": "true", "OSTEOGATE_HTTP_PORT": str(http_port),
           "OSTEOGATE_DICOM_ALLOWED_CALLING_AETS": "GOODMOD"}
    with GatewayProcess(tmp_path / "gw", model=tiny_model, env=env, stable_seconds=60) as gw:
        for n, caller in enumerate(callers):
            path = write_dataset(make_dataset(), tmp_path / f"{n}.dcm")
            storescu([path], "127.0.0.1", gw.port, "OSTEOGATE", calling_aet=caller)
        values = scrape(http_port)
    received = {labels: v for (name, labels), v in values.items() if name == "osteogate_instances_received_total"}
    assert received == {(("calling_ae", "GOODMOD"),): 1.0}  # the others were refused at association
    # Without an allow-list every caller is accepted, and every one is "other".
    with GatewayProcess(tmp_path / "gw2", model=tiny_model, env={**env, "OSTEOGATE_DICOM_ALLOWED_CALLING_AETS": ""},
                        stable_seconds=60) as gw:
        for n, caller in enumerate(callers):
            path = write_dataset(make_dataset(), tmp_path / f"b{n}.dcm")
            storescu([path], "127.0.0.1", gw.port, "OSTEOGATE", calling_aet=caller)
        values = scrape(http_port)
    received = {labels: v for (name, labels), v in values.items() if name == "osteogate_instances_received_total"}
    assert received == {(("calling_ae", "other"),): float(len(callers))}
