"""The ``[backfill]`` section: screening the archive through Query/Retrieve (gateway/backfill).

Kept apart from gateway/core/config.py (which only names it as a section) so the backfill's
settings read in one place. Every key has an ``OSTEOGATE_BACKFILL_<KEY>`` environment override,
as every other section; the command line (``osteogate backfill --rate ...``) overrides both.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

_WINDOW_RE = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-3]):([0-5]\d)$")
_DATE_RE = re.compile(r"^\d{8}$")


def check_window(value: str) -> str:
    """``HH:MM-HH:MM`` (local time; the end may be before the start: the window crosses midnight),
    or empty for always."""
    value = value.strip()
    if value and not _WINDOW_RE.match(value):
        raise ValueError(f"window {value!r} is not HH:MM-HH:MM (e.g. 19:00-07:00)")
    return value


def check_date(value: str) -> str:
    """A DICOM date ``YYYYMMDD``; ``YYYY-MM-DD`` is accepted and normalised; empty for open."""
    text = value.strip().replace("-", "")
    if text and not _DATE_RE.match(text):
        raise ValueError(f"date {value!r} is not YYYYMMDD or YYYY-MM-DD")
    return text


class BackfillConfig(BaseModel):
    """Screening the archive: where from, what, how gently, and whether the results are sent."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # Scheduled runs inside `osteogate serve` (off by default; `osteogate backfill` works regardless).
    enabled: bool = False
    # The archive: AET@HOST:PORT (DICOM Q/R) or https://host/dicom-web (QIDO-RS / WADO-RS).
    source: str = ""
    # DICOMweb source only: HTTP basic user, and the names of environment variables holding the
    # password or a bearer token (secrets never in the file); a CA bundle to verify HTTPS with.
    source_username: str = ""
    source_password_env: str = ""
    source_token_env: str = ""
    source_ca_file: str = ""
    since: str = ""  # study dates from (YYYYMMDD), empty: no lower bound
    until: str = ""  # study dates until, inclusive; empty: today
    modalities: list[str] = ["CR", "DX"]
    body_parts: list[str] = []  # e.g. KNEE, LSPINE; empty: any (the gateway skips what is out of scope)
    patients_file: str = ""  # one PatientID (optionally ",Issuer") a line: only those patients
    retrieve: Literal["move", "get"] = "move"
    # Our AE title as the Q/R SCU; empty: dicom.ae_title. The C-MOVE destination is dicom.ae_title.
    calling_ae_title: str = ""
    move_destination: str = ""  # C-MOVE destination AE; empty: dicom.ae_title (the gateway itself)
    # Where C-GET and WADO-RS results are forwarded: AET@HOST:PORT; empty: the gateway's own listener.
    forward_to: str = ""
    rate_per_minute: float = Field(10, gt=0)  # studies a minute, at most
    window: str = ""  # HH:MM-HH:MM local time, e.g. 19:00-07:00; empty: any time
    max_queue: int = Field(20, ge=1)  # pause while the gateway has more jobs than this pending
    chunk_days: int = Field(30, ge=1)  # date range of one C-FIND; halved while the PACS caps answers
    find_limit: int = Field(0, ge=0)  # the PACS's C-FIND result cap if known (0: detect by status)
    max_attempts: int = Field(5, ge=1)  # retrieves of a study before it is failed
    retry_base_seconds: float = Field(30, gt=0)
    retry_max_seconds: float = Field(1800, gt=0)
    timeout_seconds: float = Field(120, gt=0)  # DIMSE/HTTP wait for one answer
    # Seconds to wait after the last retrieve for the gateway to screen what arrived.
    screen_wait_seconds: float = Field(600, ge=0)
    # Results of backfilled studies go to delivery.destinations (true) or stay in SQL and the
    # case-finding list (false): many sites do not want historical SRs appearing in old studies.
    deliver: bool = False
    interval_seconds: float = Field(3600, gt=0)  # scheduled: how often a run starts (it resumes)

    @field_validator("window")
    @classmethod
    def _valid_window(cls, value: str) -> str:
        return check_window(value)

    @field_validator("since", "until")
    @classmethod
    def _valid_date(cls, value: str) -> str:
        return check_date(value)

    @field_validator("modalities", "body_parts", mode="before")
    @classmethod
    def _upper_list(cls, value: object) -> object:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if isinstance(value, list):
            return [str(v).strip().upper() for v in value if str(v).strip()]
        return value
