"""The ``[gate]`` configuration section: whether results wait for the site's own validation.

Its own module (``config.py`` only adds it to ``Settings``), like ``groundtruth_config``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class GateConfig(BaseModel):
    """The site gate (gateway/groundtruth/gate.py; docs/SITE_VALIDATION.md).

    ``site_validation``: "off" (results delivered as made), "shadow" (results made and stored,
    deliveries held until the site's validation opens the gate), "required" (results reported as
    "not assessed: awaiting site validation (N of M DXA-matched studies)" until it opens).
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    site_validation: Literal["off", "shadow", "required"] = "off"
    # The gate opens when the lower 95 % bound of the site's low-BMD AUC exceeds this ...
    site_min_auc: float = Field(0.70, gt=0.5, lt=1.0)
    # ... over at least this many DXA-matched studies with a result.
    site_min_pairs: int = Field(100, ge=10)
    # The last this many pairs are watched: their AUC lower bound below site_min_auc closes it again.
    drift_window: int = Field(200, ge=10)
    # How long the gate's state is reused before the pairs are read again (seconds).
    refresh_seconds: float = Field(60, gt=0)
    # Patient-bootstrap resamples behind each lower bound (the report uses 1000).
    bootstrap: int = Field(400, ge=50, le=5000)
