"""Read-only views of the store for the CLI (studies, show) and /healthz (failing destinations)."""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import pydicom
from osteogate.gateway.core.config import Settings
from osteogate.gateway.core.errors import UsageError
from osteogate.gateway.store.db import (
    Database,
    Delivery,
    DeliveryStatus,
    Study,
    StudyResult,
    StudyStatus,
    as_utc,
    utcnow,
)
from osteogate.gateway.store.spool import Spool
from sqlalchemy import Select, func, inspect, or_, select
from sqlalchemy.orm import Session, selectinload

# study_key: the first 16 hex characters of a salted sha256 (gateway.core.logs.study_key).
_STUDY_KEY_RE = re.compile(r"^[0-9a-fA-F]{16}$")
# A destination whose SR was rejected this recently (and that took nothing since) counts as failing.
REJECTED_WINDOW = timedelta(hours=24)


def _fmt_time(value: Any) -> str:
    return as_utc(value).strftime("%Y-%m-%d %H:%M:%S") if value else "-"


NOT_ASSESSED = "not assessed"


def _fmt_probs(obj: Any) -> str:
    """Probabilities in CLASSES order as whole percentages (the numbers the SR and card show)."""
    if not obj.probabilities:
        return ""
    from osteogate.gateway.report.wording import PROBABILITY_WORDS, percentages

    return "  ".join(f"{PROBABILITY_WORDS.get(name, name)} {value} %"
                     for name, value in percentages(obj.probabilities).items())


def _result_words(result: StudyResult | None) -> str | None:
    """One result in words: "osteopenia (knee)", "not assessed (knee)", or the status."""
    if result is None:
        return None
    if result.label:
        from osteogate.gateway.report.wording import CATEGORY_WORDS

        category = CATEGORY_WORDS.get(result.label, result.label)
        return f"{result.decision}; {category} ({result.region})" if result.decision else \
            f"{category} ({result.region})"
    if result.assessed is False:
        return f"{NOT_ASSESSED} ({result.region})"
    return result.status.value


def _filtered(
    query: Select[Any], status: str | None, since: datetime | None, region: str | None, result: str | None,
) -> Select[Any]:
    """Filters of ``osteogate studies``; region and result look at each study's latest result."""
    if status:
        query = query.where(Study.status == StudyStatus(status))
    if since is not None:
        query = query.where(Study.last_received_at >= since)
    if region or result:
        latest = (select(StudyResult.study_id, func.max(StudyResult.version).label("version"))
                  .group_by(StudyResult.study_id).subquery())
        query = (query.join(latest, latest.c.study_id == Study.id)
                 .join(StudyResult, (StudyResult.study_id == Study.id) & (StudyResult.version == latest.c.version)))
        if region:
            query = query.where(StudyResult.region == region)
        if result:
            # "not assessed" (or not-assessed) selects results the model declined to give.
            if result.replace("-", " ").strip().lower() == NOT_ASSESSED:
                query = query.where(StudyResult.assessed.is_(False))
            else:
                query = query.where(StudyResult.label == result)
    return query


def list_studies(
    db: Database, limit: int = 50, *, status: str | None = None, since: datetime | None = None,
    region: str | None = None, result: str | None = None,
) -> list[dict[str, Any]]:
    with db.session() as session:
        query = _filtered(select(Study), status, since, region, result)
        studies = session.execute(
            query.options(selectinload(Study.results).selectinload(StudyResult.deliveries))
            .order_by(Study.last_received_at.desc()).limit(limit)
        ).scalars().all()
        rows = []
        for study in studies:
            latest = study.results[-1] if study.results else None
            delivered = None
            if latest and latest.deliveries:
                sent = sum(d.status == DeliveryStatus.SENT for d in latest.deliveries)
                delivered = f"{sent}/{len(latest.deliveries)}"
            rows.append({
                "study_key": study.study_key,
                "study_uid": study.study_uid,
                "last_received_at": as_utc(study.last_received_at),
                "instances": study.instance_count,
                "status": study.status.value,
                "version": study.version,
                "region": latest.region if latest else None,
                "label": (latest.label or (NOT_ASSESSED if latest.assessed is False else None)) if latest else None,
                "assessed": latest.assessed if latest else None,
                "result": _result_words(latest),
                "delivered": delivered,
                "sr_versions": sum(1 for r in study.results if r.sr_sop_instance_uid),
            })
        return rows


def _predecessor_uid(reports: Spool | None, sr_path: str | None) -> str | None:
    """The SR this one replaces, as the SR file itself states it (PredecessorDocumentsSequence)."""
    if not sr_path or reports is None:
        return None
    try:
        ds = pydicom.dcmread(reports.absolute(sr_path), stop_before_pixels=True)
        item = ds.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
        return str(item.ReferencedSOPInstanceUID)
    except (AttributeError, IndexError, OSError, ValueError):
        return None


def _sr_summary(reports: Spool | None, sr_path: str) -> list[str]:
    from osteogate.gateway.report.sr import sr_summary

    if reports is None:
        return ["(no reports directory here: SR file not available)"]
    try:
        return sr_summary(pydicom.dcmread(reports.absolute(sr_path))).splitlines()
    except (OSError, ValueError) as exc:
        return [f"(SR file unreadable: {type(exc).__name__})"]


def find_study(session: Session, ident: str) -> Study | None:
    """A study by Study Instance UID, or by the study key that logs print."""
    ident = ident.strip()
    study = session.execute(select(Study).where(Study.study_uid == ident)).scalar_one_or_none()
    if study is None and _STUDY_KEY_RE.match(ident):
        matches = session.execute(select(Study).where(Study.study_key == ident.lower())).scalars().all()
        if len(matches) > 1:  # keys are 64-bit hash prefixes: only a changed salt makes this likely
            raise UsageError(f"study key {ident} matches {len(matches)} studies", None,
                             "Name the study by its Study Instance UID (osteogate studies lists both)")
        study = matches[0] if matches else None
    return study


def _reports(settings: Settings) -> Spool | None:
    # Read-only: no reports directory is created just to look for SRs in it.
    return Spool(settings.storage.reports_dir) if settings.storage.reports_dir.is_dir() else None


def describe_study(db: Database, settings: Settings, ident: str) -> str | None:
    """A readable account of one study (by UID or study key): instances, jobs, results (with SR
    history), deliveries."""
    reports = _reports(settings)
    with db.session() as session:
        study = find_study(session, ident)
        if study is None:
            return None
        lines = [
            f"Study {study.study_uid}",
            f"  key {study.study_key}  status {study.status.value}  version {study.version}  "
            f"modality {study.modality or '-'}  description {study.description or '-'}",
            f"  first received {_fmt_time(study.first_received_at)}  last {_fmt_time(study.last_received_at)}",
            f"Instances ({len(study.instances)}):",
        ]
        for inst in sorted(study.instances, key=lambda i: i.received_at):
            lines.append(f"  {inst.sop_instance_uid}  {inst.transfer_syntax_uid}  {inst.size_bytes} B  "
                         f"from {inst.calling_ae or '-'} at {_fmt_time(inst.received_at)}"
                         + (f"  PURGED {_fmt_time(inst.purged_at)}" if inst.purged_at else ""))
        lines.append(f"Jobs ({len(study.jobs)}):")
        for job in study.jobs:
            lines.append(f"  #{job.id} v{job.study_version} {job.status.value} ({job.reason}) attempts {job.attempts} "
                         f"worker {job.worker or '-'} started {_fmt_time(job.started_at)} "
                         f"finished {_fmt_time(job.finished_at)}"
                         + (f" model {job.model_path}" if job.model_path else "")
                         + (f" error: {job.error}" if job.error else ""))
        lines.append(f"Results ({len(study.results)}):")
        for result in study.results:
            _describe_result(lines, result)
        lines.extend(_sr_history(study, reports))
        latest_sr = next((r for r in reversed(study.results) if r.sr_path), None)
        if latest_sr is not None:
            lines.append(f"Latest SR (version {latest_sr.version}):")
            lines.extend("  " + line for line in _sr_summary(reports, latest_sr.sr_path))  # type: ignore[arg-type]
        return "\n".join(lines)


def _inputs(result: StudyResult) -> str:
    if result.inputs_used is None:
        return ""
    text = f"inputs used: {', '.join(result.inputs_used) or 'none'}"
    if result.inputs_missing:
        text += f"; missing: {', '.join(result.inputs_missing)}"
    return text


def _describe_result(lines: list[str], result: StudyResult) -> None:
    from osteogate.gateway.report.wording import CATEGORY_WORDS, fmt_t_score, interval_text

    if result.assessed is False:
        outcome = f"NOT ASSESSED: {result.reason}"
    elif result.status == StudyStatus.SKIPPED:
        outcome = "not screened: no knee or spine image the model reads (each image's reason below)"
    else:
        category = CATEGORY_WORDS.get(result.label or "", result.label or "-")
        outcome = f"{result.decision or 'no decision recorded'}; {category}  {_fmt_probs(result)}".rstrip()
    lines.append(f"  v{result.version} {result.status.value} region {result.region or '-'} {outcome}")
    if result.t_score is not None:
        # The same endpoints, printed by the same helper, as the SR and the card.
        interval = (" (80 % interval {} to {})".format(*interval_text(result.t_score_low, result.t_score_high))
                    if result.t_score_low is not None and result.t_score_high is not None else "")
        lines.append(f"     estimated T-score {fmt_t_score(result.t_score)}{interval}")
    if _inputs(result):
        lines.append(f"     {_inputs(result)}")
    for note in getattr(result, "notes", None) or ():
        lines.append(f"     note: {note}")
    lines.append(f"     model {result.model_name} {result.model_version} sha256 {result.model_sha256[:12]} "
                 f"backend {result.backend} timings {result.timings}")
    for obj in result.objects or ():
        lines.append(f"     {'SR' if obj.kind == 'sr' else 'result card'} {obj.sop_instance_uid} "
                     f"(series {obj.series_uid})")
    if not result.objects and result.sr_sop_instance_uid:
        lines.append(f"     SR {result.sr_sop_instance_uid}")
    lines.append(f"     made {_fmt_time(result.created_at)}")
    for image in result.images:
        if image.status != "classified":
            detail = f"skipped: {image.reason}"
        elif image.assessed is False:
            detail = f"not assessed: {image.reason}"
        else:
            detail = f"{image.label or ''} {_fmt_probs(image)}"
        lines.append(f"     image {image.sop_instance_uid}: {image.region or '-'} {detail}".rstrip())
    for delivery in result.deliveries:
        lines.append(f"     delivery to {delivery.destination}: {delivery.status.value} "
                     f"attempts {delivery.attempts} sent {_fmt_time(delivery.sent_at)}"
                     + (f" last error: {delivery.last_error}" if delivery.last_error else ""))


def _sr_history(study: Study, reports: Spool | None) -> list[str]:
    srs = [r for r in study.results if r.sr_sop_instance_uid]
    lines = [f"SR history ({len(srs)}):"]
    for result in srs:
        sent = sum(d.status == DeliveryStatus.SENT for d in result.deliveries)
        cards = [o.sop_instance_uid for o in result.objects if o.kind == "card"]
        lines.append(f"  version {result.version}  SOP {result.sr_sop_instance_uid}  "
                     f"predecessor {_predecessor_uid(reports, result.sr_path) or '-'}  "
                     f"card {cards[0] if cards else '-'}  "
                     f"made {_fmt_time(result.created_at)}  sent {sent}/{len(result.deliveries)}")
    return lines


# -- show --json -----------------------------------------------------------------------------------


def _json_value(value: Any) -> Any:
    if isinstance(value, datetime):
        return as_utc(value).isoformat()
    if isinstance(value, enum.Enum):
        return value.value
    return value


def _columns(row: Any) -> dict[str, Any]:
    """Every column of an ORM row (so a column added to gateway/store/db.py shows up here by itself)."""
    return {attr.key: _json_value(getattr(row, attr.key)) for attr in inspect(row).mapper.column_attrs}


def study_record(db: Database, settings: Settings, ident: str) -> dict[str, Any] | None:
    """``osteogate show --json``: the study with its instances, jobs and results (each with its
    images and deliveries), as stored; None when no study has that UID or key."""
    reports = _reports(settings)
    with db.session() as session:
        study = find_study(session, ident)
        if study is None:
            return None
        record = _columns(study)
        record["instances"] = [_columns(i) for i in sorted(study.instances, key=lambda i: i.received_at)]
        record["jobs"] = [_columns(j) for j in study.jobs]
        record["results"] = [
            _columns(r) | {"predecessor_sr_uid": _predecessor_uid(reports, r.sr_path),
                           "images": [_columns(i) for i in r.images],
                           "deliveries": [_columns(d) for d in r.deliveries]}
            for r in study.results
        ]
        return record


# -- failing destinations (/healthz) -----------------------------------------------------------------


@dataclass(frozen=True)
class DeliveryRow:
    id: int
    destination: str
    status: DeliveryStatus
    attempts: int
    last_error: str | None
    created_at: datetime


def destination_problems(rows: Iterable[DeliveryRow], now: datetime,
                         window: timedelta = REJECTED_WINDOW) -> list[dict[str, Any]]:
    """Which destinations are failing, from their delivery rows.

    Failing: a pending delivery that has already failed at least once (being retried), or a
    rejection within ``window`` with nothing sent to that destination since.
    """
    by_destination: dict[str, list[DeliveryRow]] = {}
    for row in rows:
        by_destination.setdefault(row.destination, []).append(row)
    cutoff = now - window
    problems = []
    for destination, items in sorted(by_destination.items()):
        items.sort(key=lambda r: r.id)
        last_sent = max((r.id for r in items if r.status == DeliveryStatus.SENT), default=0)
        retrying = [r for r in items if r.status == DeliveryStatus.PENDING and r.attempts > 0]
        rejected = [r for r in items if r.status == DeliveryStatus.REJECTED and r.id > last_sent
                    and as_utc(r.created_at) >= cutoff]
        if retrying or rejected:
            latest = max(retrying + rejected, key=lambda r: r.id)
            problems.append({"destination": destination, "retrying": len(retrying), "rejected": len(rejected),
                             "last_error": latest.last_error})
    return problems


def failing_destinations(db: Database, now: datetime | None = None,
                         window: timedelta = REJECTED_WINDOW) -> list[dict[str, Any]]:
    now = now or utcnow()
    with db.session() as session:
        rows = session.execute(
            select(Delivery.id, Delivery.destination, Delivery.status, Delivery.attempts, Delivery.last_error,
                   Delivery.created_at)
            .where(or_(Delivery.status == DeliveryStatus.PENDING, Delivery.created_at >= now - window))
        ).all()
    return destination_problems((DeliveryRow(*row) for row in rows), now, window)
