"""Backfill figures for Prometheus, in the style of gateway/core/metrics.py: a counter of
retrieves by outcome (in the process that retrieves), and gauges read from SQL at scrape time
(studies by backfill state, the recent retrieve rate and the ETA), so the gateway's /metrics
shows a backfill run by `osteogate backfill` in another process. Labels are bounded: the
outcome (4 values) and the state (6 values)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

from osteogate.gateway.core.logs import get_logger
from osteogate.gateway.core.metrics import REGISTRY
from osteogate.gateway.store.backfill import BackfillState, BackfillStudy
from osteogate.gateway.store.db import Database, utcnow
from prometheus_client import Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select

log = get_logger("osteogate.gateway.backfill.metrics")

RETRIEVES = Counter("osteogate_backfill_retrieves", "Backfill retrieves by outcome (received, retry, failed, refused)",
                    ["outcome"], registry=REGISTRY)
RATE_WINDOW_MINUTES = 10


class BackfillCollector(Collector):
    """Gauges of the backfill read from SQL at scrape time."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def collect(self) -> Iterator[GaugeMetricFamily]:
        states = GaugeMetricFamily("osteogate_backfill_studies", "Backfill studies by state", labels=["state"])
        rate = GaugeMetricFamily("osteogate_backfill_rate_per_minute",
                                 f"Studies retrieved a minute over the last {RATE_WINDOW_MINUTES} minutes")
        eta = GaugeMetricFamily("osteogate_backfill_eta_seconds",
                                "Seconds until the studies waiting are retrieved at the recent rate (-1: unknown)")
        try:
            with self.db.session() as session:
                counts = dict(session.execute(select(BackfillStudy.state, func.count())
                                              .group_by(BackfillStudy.state)).all())
                recent = session.execute(select(func.count()).select_from(BackfillStudy).where(
                    BackfillStudy.retrieved_at >= utcnow() - timedelta(minutes=RATE_WINDOW_MINUTES))).scalar_one()
        except Exception:
            log.warning("metrics_db_unavailable")
            return
        for state in BackfillState:
            states.add_metric([state.value], int(counts.get(state, 0)))
        per_minute = recent / RATE_WINDOW_MINUTES
        waiting = int(counts.get(BackfillState.FOUND, 0)) + int(counts.get(BackfillState.RETRIEVING, 0))
        rate.add_metric([], per_minute)
        eta.add_metric([], waiting / per_minute * 60 if per_minute else (0 if not waiting else -1))
        yield states
        yield rate
        yield eta
