"""Prometheus metrics: the registry and the counters/histograms updated where things happen.

Counters and histograms are updated where things happen; values that live in SQL or on disk
(studies by status, queue depth, free space) are read at scrape time by a custom collector, so
several gateway processes sharing one database all report the same truth.
"""

from __future__ import annotations

from collections.abc import Collection

from osteogate.gateway.core.logs import get_logger
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

log = get_logger("osteogate.gateway.core.metrics")

REGISTRY = CollectorRegistry(auto_describe=True)

# Label values come from peers: an AE title is a label only when it is on the calling-AE
# allow-list (a fixed, configured set), otherwise "other"; 200 callers must not make 200 series.
OTHER = "other"


def ae_label(calling_ae: str | None, allowed: Collection[str]) -> str:
    title = (calling_ae or "").strip()
    return title if title and title in allowed else OTHER


INSTANCES_RECEIVED = Counter(
    "osteogate_instances_received", "Instances stored (acknowledged with success)", ["calling_ae"],
    registry=REGISTRY,
)
INSTANCES_REFUSED = Counter(
    "osteogate_instances_refused", "Instances refused with a failure status", ["status"], registry=REGISTRY
)
INSTANCES_NOT_STORED = Counter(
    "osteogate_instances_not_stored",
    "Objects acknowledged but not stored: out-of-scope SOP classes, the gateway's own results", ["outcome"],
    registry=REGISTRY,
)
CONNECTIONS_REFUSED = Counter(
    "osteogate_connections_refused",
    "DICOM connections closed before association (host not allowed, too many waiting, TLS handshake)",
    ["reason"], registry=REGISTRY,
)
STUDIES_PROCESSED = Counter(
    "osteogate_studies_processed", "Processing runs finished", ["outcome"], registry=REGISTRY
)
INFERENCE_SECONDS = Histogram(
    "osteogate_inference_seconds", "Model time per study (preprocess + forward)", registry=REGISTRY,
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
STUDY_PROCESSING_SECONDS = Histogram(
    "osteogate_study_processing_seconds", "Wall time per study job (decode, model, SR)", registry=REGISTRY,
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
DELIVERIES = Counter("osteogate_deliveries", "SR delivery attempts", ["outcome"], registry=REGISTRY)
HL7_MESSAGES = Counter(
    "osteogate_hl7_messages",
    "DXA results listener (HL7 MLLP): messages answered AA / AE / AR, frames timed out, hosts refused",
    ["outcome"], registry=REGISTRY,
)
# The site gate (gateway/groundtruth/gate.py): the evidence it opens or closes on, per refresh.
SITE_GATE = Gauge("osteogate_site_gate", "site gate figures: open (1/0), pairs, needed, auc, auc_lower, "
                  "rolling_pairs, rolling_auc, rolling_auc_lower (NaN while not computable)", ["figure"],
                  registry=REGISTRY)
