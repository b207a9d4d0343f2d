"""Read-only views of the store for the CLI (studies, show)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import selectinload

from gateway.config import Settings
from gateway.db import Database, DeliveryStatus, Study, StudyResult, as_utc


def _fmt_time(value: Any) -> str:
    return as_utc(value).strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def _fmt_probs(obj: Any) -> str:
    if obj.p_normal is None:
        return ""
    return f"normal {obj.p_normal:.3f}  osteopenia {obj.p_osteopenia:.3f}  osteoporosis {obj.p_osteoporosis:.3f}"


def list_studies(db: Database, limit: int = 50) -> list[dict[str, Any]]:
    with db.session() as session:
        studies = session.execute(
            select(Study).options(selectinload(Study.results).selectinload(StudyResult.deliveries))
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
                "result": (f"{latest.label} ({latest.region})" if latest and latest.label else
                           (latest.status.value if latest else None)),
                "delivered": delivered,
            })
        return rows


def describe_study(db: Database, settings: Settings, study_uid: str) -> str | None:
    """A readable account of one study: instances, jobs, results (with the SR text), deliveries."""
    with db.session() as session:
        study = session.execute(select(Study).where(Study.study_uid == study_uid)).scalar_one_or_none()
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
                         f"from {inst.calling_ae or '-'} at {_fmt_time(inst.received_at)}")
        lines.append(f"Jobs ({len(study.jobs)}):")
        for job in study.jobs:
            lines.append(f"  #{job.id} v{job.study_version} {job.status.value} ({job.reason}) attempts {job.attempts} "
                         f"started {_fmt_time(job.started_at)} finished {_fmt_time(job.finished_at)}"
                         + (f" error: {job.error}" if job.error else ""))
        lines.append(f"Results ({len(study.results)}):")
        for result in study.results:
            lines.append(f"  v{result.version} {result.status.value} region {result.region or '-'} "
                         f"label {result.label or '-'}  {_fmt_probs(result)}")
            lines.append(f"     model {result.model_name} {result.model_version} sha256 {result.model_sha256[:12]} "
                         f"backend {result.backend} timings {result.timings}")
            lines.append(f"     SR {result.sr_sop_instance_uid} at {_fmt_time(result.created_at)}")
            for image in result.images:
                detail = _fmt_probs(image) if image.status == "classified" else image.reason
                lines.append(f"     image {image.sop_instance_uid}: {image.status} {image.region or ''} "
                             f"{image.label or ''} {detail}")
            for delivery in result.deliveries:
                lines.append(f"     delivery to {delivery.destination}: {delivery.status.value} "
                             f"attempts {delivery.attempts} sent {_fmt_time(delivery.sent_at)}"
                             + (f" last error: {delivery.last_error}" if delivery.last_error else ""))
        return "\n".join(lines)
