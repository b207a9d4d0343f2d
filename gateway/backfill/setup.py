"""From settings to a ready backfill: the source (DICOM Q/R or DICOMweb), the filters, the
chunks, the options, and the model whose results count as "screened". Used by the command and
by the scheduled job inside `osteogate serve`."""

from __future__ import annotations

import threading
from collections.abc import Callable
from importlib.resources import files
from pathlib import Path

from osteogate.gateway.backfill.engine import Backfill, Options, Progress
from osteogate.gateway.backfill.ledger import Ledger
from osteogate.gateway.backfill.query import Filters, plan_chunks
from osteogate.gateway.backfill.sources import DimseSource, Source
from osteogate.gateway.backfill.window import Window
from osteogate.gateway.core.config import Destination, Settings
from osteogate.gateway.core.dicomnet import Peer
from osteogate.gateway.core.errors import ConfigurationError, NotFoundError, UsageError
from osteogate.gateway.store.db import Database

SHIPPED_MODEL = Path(str(files("osteogate.model") / "shipped" / "osteogate-knee.safetensors"))


def read_patients(path: Path) -> tuple[tuple[str, str], ...]:
    """``--patients FILE``: one PatientID a line, optionally ``,IssuerOfPatientID``; blank lines,
    ``#`` comments and a ``patient_id`` header are passed over."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise NotFoundError(f"--patients: {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise NotFoundError(f"--patients: {path} cannot be read", str(exc)) from None
    patients: list[tuple[str, str]] = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        patient, _, issuer = (part.strip() for part in line.partition(","))
        if patient.lower() in ("patient_id", "patientid"):
            continue
        if len(patient) > 64 or "\\" in patient or "*" in patient or "?" in patient:
            raise UsageError(f"--patients: {path}: {patient[:20]!r}... is not a PatientID (no wildcards, "
                             "at most 64 characters)")
        patients.append((patient, issuer))
    if not patients:
        raise UsageError(f"--patients: {path} lists no PatientID")
    return tuple(dict.fromkeys(patients))


def model_sha256(settings: Settings) -> str | None:
    """The checkpoint the gateway serves (model.path, else the shipped one): a study counts as
    screened when it has a result of this model. None when it cannot be read here."""
    from osteogate.model.checkpoint import checkpoint_sha256

    path = Path(settings.model.path) if settings.model.path else SHIPPED_MODEL
    try:
        return checkpoint_sha256(path)
    except OSError:
        return None


def gateway_peer(settings: Settings) -> Peer:
    """Where C-GET and WADO-RS results are sent: backfill.forward_to, else the gateway's listener."""
    if settings.backfill.forward_to:
        return Peer.of(Destination.parse(settings.backfill.forward_to))
    bind = settings.dicom.bind
    host = "127.0.0.1" if bind in ("", "0.0.0.0", "::") else bind
    return Peer(settings.dicom.ae_title, host, settings.dicom.port, settings.dicom.tls.enabled)


def make_filters(settings: Settings, patients_file: Path | None = None) -> Filters:
    cfg = settings.backfill
    file = patients_file or (Path(cfg.patients_file) if cfg.patients_file else None)
    return Filters(since=cfg.since, until=cfg.until, modalities=tuple(cfg.modalities),
                   body_parts=tuple(cfg.body_parts), patients=read_patients(file) if file else ())


def make_source(settings: Settings, filters: Filters) -> Source:
    cfg = settings.backfill
    text = cfg.source.strip()
    if not text:
        raise ConfigurationError("no archive to backfill from", "neither --from nor backfill.source is set",
                                 "Give --from AET@HOST:PORT (or https://host/dicom-web)")
    calling = cfg.calling_ae_title or settings.dicom.ae_title
    scratch = settings.storage.data_dir / "backfill-scratch"
    if text.startswith(("http://", "https://")):
        from osteogate.gateway.backfill.dicomweb import DicomwebSource, web_session

        session = web_session(cfg.source_username, cfg.source_password_env, cfg.source_token_env, cfg.source_ca_file)
        return DicomwebSource(text, filters, forward_to=gateway_peer(settings), calling_aet=calling,
                              timeout=cfg.timeout_seconds, scratch=scratch, session=session)
    try:
        destination = Destination.parse(text)
    except ValueError as exc:
        raise UsageError(f"--from {text!r}", str(exc), "Write AET@HOST:PORT or https://host/dicom-web") from None
    return DimseSource(Peer.of(destination), calling, filters,
                       move_destination=cfg.move_destination or settings.dicom.ae_title,
                       forward_to=gateway_peer(settings), method=cfg.retrieve, timeout=cfg.timeout_seconds,
                       find_limit=cfg.find_limit, scratch=scratch)


def filters_record(source: Source, filters: Filters) -> dict[str, object]:
    """The run's identity in SQL (backfill_runs.filters): patients as a count and a digest only."""
    import hashlib

    digest = hashlib.sha256(repr(filters.patients).encode()).hexdigest()[:16] if filters.patients else ""
    return {"since": filters.since, "until": filters.until, "modalities": list(filters.modalities),
            "body_parts": list(filters.body_parts), "patients": len(filters.patients), "patients_digest": digest}


def make_backfill(settings: Settings, db: Database, *, patients_file: Path | None = None, dry_run: bool = False,
                  retry_failed: bool = False, stop: threading.Event | None = None,
                  on_progress: Callable[[Progress], None] = lambda p: None) -> Backfill:
    cfg = settings.backfill
    filters = make_filters(settings, patients_file)
    source = make_source(settings, filters)
    options = Options(rate_per_minute=cfg.rate_per_minute, window=Window.parse(cfg.window), max_queue=cfg.max_queue,
                      max_attempts=cfg.max_attempts, retry_base_seconds=cfg.retry_base_seconds,
                      retry_max_seconds=cfg.retry_max_seconds, screen_wait_seconds=cfg.screen_wait_seconds,
                      dry_run=dry_run, retry_failed=retry_failed,
                      move_destination=(cfg.move_destination or settings.dicom.ae_title)
                      if cfg.retrieve == "move" and not cfg.source.startswith(("http://", "https://")) else "")
    return Backfill(Ledger(db, model_sha256(settings)), source, filters_record(source, filters),
                    plan_chunks(filters, cfg.chunk_days), options, stop=stop, on_progress=on_progress)


def run_scheduled(settings: Settings, db: Database, stop: threading.Event) -> Progress | None:
    """The ``[backfill]`` job of `osteogate serve`: the same run, resumed at each interval. While
    another backfill (`osteogate backfill` by hand) holds the store, this tick is skipped."""
    from osteogate.gateway.core.errors import TemporaryFailure
    from osteogate.gateway.core.logs import get_logger

    try:
        return make_backfill(settings, db, stop=stop).run()
    except TemporaryFailure as exc:
        get_logger("osteogate.gateway.backfill.setup").info("backfill_skipped", reason=exc.why)
        return None
