"""/metrics and /healthz over HTTP (off by default, localhost by default).

Values that live in SQL or on disk (studies by status, queue depth, free space) are read at
scrape time by a custom collector, so several gateway processes sharing one database all report
the same truth; the counters themselves live in gateway.core.metrics.
"""

from __future__ import annotations

import json
import socketserver
import threading
from collections.abc import Callable, Iterator
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from osteogate.gateway.core.logs import get_logger
from osteogate.gateway.core.metrics import REGISTRY
from osteogate.gateway.store.db import Database, Delivery, DeliveryStatus, Job, JobStatus, Study
from prometheus_client import make_wsgi_app
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select

log = get_logger("osteogate.gateway.operate.health")


class StoreCollector(Collector):
    """Gauges read from SQL and the spool's disk at scrape time."""

    def __init__(self, db: Database, free_bytes: Callable[[], int]) -> None:
        self.db = db
        self.free_bytes = free_bytes

    def collect(self) -> Iterator[GaugeMetricFamily]:
        studies = GaugeMetricFamily("osteogate_studies", "Studies by status", labels=["status"])
        queue = GaugeMetricFamily("osteogate_queue_depth", "Classify jobs pending or running")
        pending = GaugeMetricFamily("osteogate_deliveries_pending", "SR deliveries waiting to be sent")
        try:
            with self.db.session() as session:
                for status, count in session.execute(select(Study.status, func.count()).group_by(Study.status)):
                    studies.add_metric([status.value], count)
                queue.add_metric([], session.execute(
                    select(func.count()).select_from(Job)
                    .where(Job.status.in_([JobStatus.PENDING, JobStatus.RUNNING]))).scalar_one())
                pending.add_metric([], session.execute(
                    select(func.count()).select_from(Delivery)
                    .where(Delivery.status == DeliveryStatus.PENDING)).scalar_one())
        except Exception:
            log.warning("metrics_db_unavailable")
        else:
            yield studies
            yield queue
            yield pending
        yield GaugeMetricFamily("osteogate_spool_free_bytes", "Free bytes on the spool's disk", value=self.free_bytes())


# A request must arrive whole within this many seconds; a half-open one then loses its thread.
REQUEST_TIMEOUT_SECONDS = 5.0


class _QuietHandler(WSGIRequestHandler):
    # socketserver applies this to the connection: every read and write is bounded.
    timeout = REQUEST_TIMEOUT_SECONDS

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass  # scrapes every few seconds would flood the log


class _ThreadingWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
    """One thread per request: a slow or half-open client never blinds the health check."""

    daemon_threads = True
    block_on_close = False

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that timed out or went away: its problem, not a traceback on our stderr.
        log.debug("http_request_failed")


class HealthServer:
    """``/metrics`` (Prometheus text format) and ``/healthz`` (JSON; 200 healthy, 503 not)."""

    def __init__(self, host: str, port: int, health: Callable[[], dict[str, Any]]) -> None:
        self.health = health
        self._metrics_app = make_wsgi_app(REGISTRY)
        self._server: WSGIServer = make_server(host, port, self._app, server_class=_ThreadingWSGIServer,
                                               handler_class=_QuietHandler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="osteogate-http", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_port)

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return self._metrics_app(environ, start_response)
        if path == "/healthz":
            report = self.health()
            body = json.dumps(report, default=str).encode()
            status = "200 OK" if report.get("healthy") else "503 Service Unavailable"
            start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
            return [body]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found: try /healthz or /metrics\n"]

    def start(self) -> None:
        self._thread.start()
        log.info("http_listening", port=self.port)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
