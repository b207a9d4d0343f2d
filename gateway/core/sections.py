"""The sections of the gateway's configuration, one pydantic model each (unknown keys refused).

A new section: a model here (or in its own module, subclassing ``Section``) and a field on
``Settings`` in gateway/core/config.py; ``OSTEOGATE_<SECTION>_<KEY>`` overrides then work by
themselves.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any, Literal

from osteogate.gateway.core.destinations import Destination, check_ae_title
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)


def check_networks(value: list[str]) -> list[str]:
    """An allow-list of hosts or networks (``10.0.0.0/8``, ``127.0.0.1``); a ValueError names a bad entry.

    Shared by every listener's ``allowed_hosts`` (DICOM, HL7 MLLP).
    """
    for item in value:
        ipaddress.ip_network(item, strict=False)
    return value


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TlsConfig(Section):
    """TLS for DICOM (PS3.15 B.1). Receiving: cert + key, and a CA to require client certificates.

    Sending: a CA to verify the PACS (always verified when TLS is on), and an optional client
    certificate + key for PACS that require mutual TLS.
    """

    enabled: bool = False
    cert_file: Path | None = None
    key_file: Path | None = None
    ca_file: Path | None = None

    @model_validator(mode="after")
    def _files_exist(self) -> TlsConfig:
        for name in ("cert_file", "key_file", "ca_file"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{name} {path} does not exist")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        return self


class DicomConfig(Section):
    ae_title: str = "OSTEOGATE"
    bind: str = "0.0.0.0"
    port: int = Field(11112, ge=0, le=65535)  # 0: any free port (tests, demo)
    max_associations: int = Field(16, ge=1)
    # Calling AE titles allowed to store; empty means any.
    allowed_calling_aets: list[str] = []
    # Source addresses (IPs or CIDR networks) allowed to associate; empty means any.
    allowed_hosts: list[str] = []
    # Largest instance accepted, in MB; bigger ones are refused with 0xA700.
    max_instance_mb: int = Field(512, ge=1)
    network_timeout_seconds: float = Field(60, gt=0)
    # A new connection must finish its TLS handshake and send its A-ASSOCIATE-RQ within this
    # long, or it is closed; until then it holds no association slot.
    handshake_timeout_seconds: float = Field(5, gt=0)
    tls: TlsConfig = Field(default_factory=lambda: TlsConfig())

    @model_validator(mode="after")
    def _tls_needs_certificate(self) -> DicomConfig:
        # Checked here, not when the listener starts: `config check` must catch what `serve` dies on.
        if self.tls.enabled and not (self.tls.cert_file and self.tls.key_file):
            raise ValueError("tls.enabled = true needs tls.cert_file and tls.key_file (the server certificate "
                             "and its key); without them the listener cannot start")
        return self

    @field_validator("allowed_hosts")
    @classmethod
    def _valid_networks(cls, value: list[str]) -> list[str]:
        return check_networks(value)

    @field_validator("ae_title")
    @classmethod
    def _valid_ae_title(cls, value: str) -> str:
        return check_ae_title(value)

    @field_validator("allowed_calling_aets")
    @classmethod
    def _valid_ae_titles(cls, value: list[str]) -> list[str]:
        return [check_ae_title(v) for v in value]


class StorageConfig(Section):
    data_dir: Path = Path("./var")
    # Empty: sqlite file inside data_dir.
    database_url: str = ""
    # New associations are refused below this much free space on the spool's disk.
    min_free_mb: int = Field(500, ge=0)

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @property
    def reports_dir(self) -> Path:
        return self.data_dir / "reports"

    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'osteogate.db').resolve()}"


class StudyConfig(Section):
    # A study is complete after this long with no new instance.
    stable_seconds: float = Field(10, ge=0)
    check_interval_seconds: float = Field(1.0, gt=0)


class ModelConfig(Section):
    # Empty: the checkpoint shipped with the package (or an untrained one made on first start).
    path: str = ""
    backend: Literal["auto", "onnx", "torch"] = "auto"
    device: str = "auto"
    batch_size: int = Field(8, ge=1)
    threads: int = Field(0, ge=0)  # ONNX Runtime threads; 0: one per core (gateway/work/prefetch.py model_threads)
    # Images of a slow codec (JPEG 2000, JPEG-LS, JPEG lossless) decoded at once; 0: one per core, at
    # most 4. Others are decoded one at a time beside the model (gateway/work/prefetch.py decode_plan).
    decoders: int = Field(0, ge=0, le=64)
    decode_in_subprocess: bool = True  # those decoders are processes (gateway/work/decoding.py); false: threads
    # Images of one study that are read and scored (the first received); the rest are listed in the
    # SR as not read, with this reason. Knee and spine studies hold a few images; the cap keeps a
    # study of thousands from costing memory and CPU in proportion (the SR itemizes every read image).
    max_images_per_study: int = Field(64, ge=1, le=10000)


class ReportConfig(Section):
    """What is sent back for each result: the SR always; the result card image when enabled."""

    result_card: bool = True


class WorkerConfig(Section):
    enabled: bool = True
    poll_interval_seconds: float = Field(1.0, gt=0)
    # A job whose worker died is taken again once its lease expires.
    lease_seconds: float = Field(300, gt=0)
    max_attempts: int = Field(3, ge=1)


class DeliveryConfig(Section):
    destinations: list[Destination] = []
    calling_ae_title: str = ""  # empty: dicom.ae_title
    retry_base_seconds: float = Field(5, gt=0)
    retry_max_seconds: float = Field(600, gt=0)
    check_interval_seconds: float = Field(2, gt=0)
    timeout_seconds: float = Field(30, gt=0)
    # TLS for sending to destinations marked tls (``AET@HOST:PORT+tls`` or tls = true).
    tls: TlsConfig = Field(default_factory=lambda: TlsConfig())

    @field_validator("destinations", mode="before")
    @classmethod
    def _parse_destinations(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if isinstance(value, list):
            return [Destination.parse(v) if isinstance(v, str) else v for v in value]
        return value

    def resolve(self, text: str) -> Destination:
        """The destination a delivery row names (``str(destination)``): the configured one, with
        its credentials and TLS settings, or else parsed from the text (``resend --to``)."""
        for destination in self.destinations:
            if str(destination) == text:
                return destination
        return Destination.parse(text)


class HttpConfig(Section):
    """/healthz and /metrics. Off by default and bound to localhost: it is for the site's monitoring."""

    enabled: bool = False
    bind: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)


class RetentionConfig(Section):
    """Spool housekeeping: delivered, finished studies lose their image files after this long."""

    # Days after the last received instance; 0 keeps spooled images forever. SRs are always kept.
    spool_days: float = Field(0, ge=0)


class SchedulerConfig(Section):
    """Intervals of the periodic maintenance jobs (completion and delivery have their own)."""

    stale_jobs_seconds: float = Field(60, gt=0)
    retention_seconds: float = Field(3600, gt=0)
    selfcheck_seconds: float = Field(86400, gt=0)  # daily: disk, database, C-ECHO of destinations


class LoggingConfig(Section):
    format: Literal["auto", "json", "console"] = "auto"
    level: Literal["debug", "info", "warning", "error"] = "info"
    # Salt for the hashed study keys in logs; set it per site so keys cannot be reversed by lookup.
    hash_salt: str = "osteogate"
