"""Which body region an image shows, from its header.

BodyPartExamined uses the defined terms of PS3.16 Annex L (KNEE, LSPINE, ...); descriptions are
free text in many languages and abbreviations, so they are matched by keywords. When nothing says
knee or spine the result is ``None``: the worker records "region unknown" rather than guessing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pydicom.dataset import Dataset

KNEE = "knee"
SPINE = "spine"

_BODY_PART = {
    "KNEE": KNEE,
    "LEG": None,  # too vague: could be femur or tibia shaft
    "TSPINE": SPINE,
    "LSPINE": SPINE,
    "SSPINE": SPINE,
    "CSPINE": SPINE,
    "SPINE": SPINE,
    "TLSPINE": SPINE,
    "LUMBARSPINE": SPINE,
}
_KEYWORDS = [
    (KNEE, re.compile(r"\b(knee|knie|genou|rodilla|ginocchio|patella|tibial plateau)\b", re.I)),
    (SPINE, re.compile(r"\b(spine|lumbar|thoracic|l-?spine|t-?spine|wirbels[aä]ule|lws|bws|rachis|columna|vertebra[el]?)\b", re.I)),
]


@dataclass(frozen=True)
class RegionDecision:
    region: str | None
    source: str  # which attribute decided, for the audit trail

    @property
    def known(self) -> bool:
        return self.region is not None


def detect_region(ds: Dataset) -> RegionDecision:
    body_part = str(ds.get("BodyPartExamined") or "").strip().upper().replace(" ", "")
    if body_part:
        if body_part in _BODY_PART and _BODY_PART[body_part]:
            return RegionDecision(_BODY_PART[body_part], "BodyPartExamined")
        if body_part not in _BODY_PART:
            # A specific, different body part (CHEST, HAND...) is authoritative: out of scope.
            return RegionDecision(None, f"BodyPartExamined={body_part[:16]}")
    for keyword in ("SeriesDescription", "StudyDescription", "ProtocolName", "RequestedProcedureDescription"):
        text = str(ds.get(keyword) or "")
        for region, pattern in _KEYWORDS:
            if pattern.search(text):
                return RegionDecision(region, keyword)
    return RegionDecision(None, "no region in header")
