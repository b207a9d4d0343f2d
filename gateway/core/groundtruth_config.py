"""The ``[groundtruth]`` configuration section: DXA results in (HL7 v2 over MLLP) and matching.

Its own module (``config.py`` only adds it to ``Settings``) so the section can grow without
growing the main configuration file.
"""

from __future__ import annotations

import re
from pathlib import Path

from osteogate.gateway.core.sections import check_networks
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# LOINC T-score codes read by default: the DXA T-scores of panel 83311-1 ("Bone density
# quantitative measurement by DXA panel") at the sites the WHO classification uses (femur, hip,
# lumbar spine, spine, forearm), with and without laterality. Calcaneus and humerus are left
# out: peripheral sites are not diagnostic for the WHO categories. Femoral-neck T-scores are
# usually sent as 38263-0 (femur) or a laterality code with the site named in OBX-3.2.
DEFAULT_LOINC_CODES: tuple[str, ...] = (
    "38263-0",  # DXA Femur [T-score]
    "80947-5",  # DXA Femur - right [T-score]
    "80948-3",  # DXA Femur - left [T-score]
    "38264-8",  # DXA Hip [T-score]
    "80945-9",  # DXA Hip - right [T-score]
    "80946-7",  # DXA Hip - left [T-score]
    "38267-1",  # DXA Lumbar spine [T-score]
    "104938-6",  # DXA Spine [T-score]
    "38265-5",  # DXA Radius and Ulna [T-score] (forearm)
    "80943-4",  # DXA Radius and Ulna - right [T-score]
    "80944-2",  # DXA Radius and Ulna - left [T-score]
)
_LOINC_RE = re.compile(r"^[0-9]{1,7}-[0-9]$")


class GroundTruthConfig(BaseModel):
    """DXA results from the site: the MLLP listener (off unless ``mllp_port`` is set) and matching."""

    @property
    def mllp_enabled(self) -> bool:
        return self.mllp_port != 0

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # HL7 v2 MLLP port for ORU^R01 DXA results; 0 (the default) = no listener.
    mllp_port: int = Field(0, ge=0, le=65535)
    bind: str = "0.0.0.0"
    # Source addresses (IPs or CIDR networks) allowed to connect; empty means any.
    allowed_hosts: list[str] = []
    # TLS (both or neither; empty: plain TCP): the interface engine then connects with TLS.
    tls_cert: str = ""
    tls_key: str = ""
    # A message larger than this is refused (AR) without being held in memory.
    max_message_bytes: int = Field(1_048_576, ge=1024)
    # A frame not completed within this long (a half-sent message, then silence) closes the connection.
    read_timeout_seconds: float = Field(30, gt=0)
    # A DXA exam pairs with screened studies of the same patient this many days either side.
    match_days: int = Field(365, ge=0, le=3650)
    # OBX-3 codes (LOINC) whose OBX-5 is a DXA T-score; OBX with other codes are ignored.
    loinc_codes: list[str] = Field(default_factory=lambda: list(DEFAULT_LOINC_CODES))

    @field_validator("allowed_hosts")
    @classmethod
    def _valid_networks(cls, value: list[str]) -> list[str]:
        return check_networks(value)

    @field_validator("loinc_codes")
    @classmethod
    def _valid_codes(cls, value: list[str]) -> list[str]:
        codes = [v.strip() for v in value if v.strip()]
        bad = [c for c in codes if not _LOINC_RE.match(c)]
        if bad:
            raise ValueError(f"not LOINC codes (NNNNN-N): {bad}")
        if not codes:
            raise ValueError("at least one T-score code is needed")
        return codes

    @model_validator(mode="after")
    def _tls_pair(self) -> GroundTruthConfig:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key go together")
        for name in ("tls_cert", "tls_key"):
            path = getattr(self, name)
            if path and not Path(path).is_file():
                raise ValueError(f"{name} {path} does not exist")
        return self
