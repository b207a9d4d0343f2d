"""The site gate: results reach the PACS only once the site's own DXA evidence supports them.

``[gate] site_validation``:

* "off": no gate (results delivered as made).
* "shadow": results are made and stored, their deliveries are HELD; when the gate opens the held
  deliveries are released (every held SR goes out, in order, so no SR names a predecessor that
  was never sent).
* "required": while closed, results are reported as "not assessed: awaiting site validation (37
  of 100 DXA-matched studies)"; the model's figures are kept beside the row (``withheld``) so the
  validation keeps growing.

Open = at least ``site_min_pairs`` DXA-matched studies with figures and the lower 95 %
patient-bootstrap bound of their low-BMD AUC above ``site_min_auc``, and the last
``drift_window`` pairs' lower bound not below it (drift closes the gate again; /healthz then says
degraded naming it). ``decide`` is the pure rule; ``SiteGate`` caches it per ``refresh_seconds``.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from osteogate.gateway.core.gate_config import GateConfig
from osteogate.gateway.core.logs import get_logger
from osteogate.gateway.core.metrics import SITE_GATE
from osteogate.gateway.groundtruth.matching import MatchedPair, load_pairs
from osteogate.gateway.groundtruth.stats import Figure, PatientBootstrap, auc
from osteogate.gateway.groundtruth.validation import usable
from osteogate.gateway.store.db import Database, Delivery, DeliveryStatus, StudyResult, utcnow
from osteogate.model.assessment import Assessment, StudyAssessment
from osteogate.model.taxonomy import T_SCORE_OSTEOPENIA
from sqlalchemy import func, select, update

log = get_logger("osteogate.gateway.groundtruth.gate")
SEED = 20261203


@dataclass(frozen=True)
class GateState:
    """What the gate says now and the evidence behind it."""

    mode: str
    open: bool
    kind: str  # off | open | awaiting | not_enough | below | drift
    reason: str | None  # why closed, one line (None when open)
    pairs: int = 0
    needed: int = 0
    auc: float | None = None
    auc_lower: float | None = None
    rolling_pairs: int = 0
    rolling_auc: float | None = None
    rolling_lower: float | None = None

    @property
    def degraded(self) -> bool:
        """The gate had the evidence and lost it (drift): an operator must look."""
        return self.kind == "drift"

    @property
    def holds(self) -> bool:
        """Deliveries made now are held (shadow mode, closed)."""
        return self.mode == "shadow" and not self.open

    @property
    def withholds(self) -> bool:
        """Results made now are reported as not assessed (required mode, closed)."""
        return self.mode == "required" and not self.open

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("mode", "open", "kind", "reason", "pairs", "needed", "auc", "auc_lower",
                                              "rolling_pairs", "rolling_auc", "rolling_lower")}


def _auc_figure(pairs: Sequence[MatchedPair], n_boot: int) -> Figure:
    low = np.array([p.dxa_t_score < T_SCORE_OSTEOPENIA for p in pairs])
    score = np.array([p.p_low for p in pairs], dtype=float)
    boot = PatientBootstrap([p.patient_hash for p in pairs], n_boot=n_boot, seed=SEED)
    positives = int(low.sum())
    note = None if 2 <= positives <= len(pairs) - 2 else (
        f"not enough evidence: {positives} of {len(pairs)} DXA-matched studies with low bone density")
    return boot.figure(lambda i: auc(low[i], score[i]), np.arange(len(pairs)), note=note)


def awaiting(pairs: int, needed: int) -> str:
    """The not-assessed reason while the gate waits for pairs (issue 17's wording)."""
    return f"awaiting site validation ({pairs} of {needed} DXA-matched studies)"


def decide(pairs: Sequence[MatchedPair], config: GateConfig) -> GateState:
    """The gate's state from the site's pairs (ordered by study day, as ``load_pairs`` gives them).

    Parameters
    ----------
    pairs : sequence of MatchedPair
        Every DXA-matched study; those without figures do not count.
    config : GateConfig
        Mode, thresholds, window.

    Returns
    -------
    GateState
        Never raises for too little or one-class evidence: the gate stays closed and says why.
    """
    mode, needed = config.site_validation, config.site_min_pairs
    if mode == "off":
        return GateState(mode, True, "off", None)
    scored = [p for p in pairs if usable(p)]
    n = len(scored)
    if n < needed:
        return GateState(mode, False, "awaiting", awaiting(n, needed), n, needed)
    overall = _auc_figure(scored, config.bootstrap)
    base = GateState(mode, False, "not_enough", None, n, needed, overall.value, overall.ci[0] if overall.ci else None)
    if overall.ci is None:
        return replace(base, reason=f"awaiting site validation: {overall.note or 'no AUC interval'} ({n} studies)")
    threshold = f"gate.site_min_auc {config.site_min_auc:.2f}"
    if overall.ci[0] <= config.site_min_auc:
        return replace(base, kind="below", reason=(
            f"awaiting site validation: site low-BMD AUC {overall.text()} over {n} DXA-matched studies, "
            f"lower bound not above {threshold}"))
    window = scored[-config.drift_window:]
    rolling = overall if len(window) == n else _auc_figure(window, config.bootstrap)
    state = replace(base, kind="open", rolling_pairs=len(window), rolling_auc=rolling.value,
                    rolling_lower=rolling.ci[0] if rolling.ci else None)
    if rolling.ci is None or rolling.ci[0] < config.site_min_auc:
        shown = rolling.text() if rolling.ci else (rolling.note or "no interval")
        return replace(state, kind="drift", reason=(
            f"drift: low-BMD AUC of the last {len(window)} DXA-matched studies {shown}, lower bound below {threshold}"))
    return replace(state, open=True)


def withhold(assessment: StudyAssessment, reason: str) -> StudyAssessment:
    """The study as reported while "required" holds results back: not assessed, with ``reason``.

    What was read (inputs, notes, the producing head) stays; labels, probabilities, the estimate
    and the decision go, so the SR, the card and ``show`` say no more than "not assessed".
    """
    study = assessment.study

    def not_assessed(a: Assessment) -> Assessment:
        return Assessment(assessed=False, reason=reason, inputs_used=a.inputs_used, inputs_missing=a.inputs_missing,
                          situation=a.situation, notes=a.notes, model_name=a.model_name, population=a.population)

    images = tuple(replace(i, assessment=not_assessed(i.assessment)) if i.assessment.assessed else i
                   for i in assessment.images)
    return replace(assessment, study=not_assessed(study), images=images)


def withheld_figures(study: Assessment) -> dict[str, Any]:
    """The model's figures kept beside a withheld result (``study_results.withheld``) for validation."""
    interval = study.t_score_interval or (None, None)
    return {"label": study.label, "probabilities": dict(study.probabilities or {}), "t_score": study.t_score,
            "t_score_low": interval[0], "t_score_high": interval[1], "decision": study.decision,
            "referral_threshold": study.referral_threshold}


def release_held(db: Database) -> int:
    """Held deliveries of each study's newest result become pending (due now); those of older
    results are withdrawn: an out-of-date result must not reach the PACS after the gate opens
    (nor race its successor in the lanes), and since it was never sent no later SR names it.
    Returns how many were released."""
    now = utcnow()
    with db.session() as session:
        held = session.execute(select(Delivery.id, StudyResult.study_id, StudyResult.version).join(StudyResult)
                               .where(Delivery.status == DeliveryStatus.HELD)).all()
        if not held:
            return 0
        newest = dict(session.execute(
            select(StudyResult.study_id, func.max(StudyResult.version))
            .where(StudyResult.study_id.in_({study for _, study, _ in held})).group_by(StudyResult.study_id)).all())
        release = [d for d, study, version in held if version == newest[study]]
        withdraw = [d for d, study, version in held if version != newest[study]]
        if withdraw:
            session.execute(update(Delivery).where(Delivery.id.in_(withdraw), Delivery.status == DeliveryStatus.HELD)
                            .values(status=DeliveryStatus.WITHDRAWN,
                                    last_error="held by the site gate, then superseded by a newer result"))
        done = session.execute(update(Delivery).where(Delivery.id.in_(release), Delivery.status == DeliveryStatus.HELD)
                               .values(status=DeliveryStatus.PENDING, next_attempt_at=now))
        return int(done.rowcount or 0)


def _gauge(value: float | None) -> float:
    return math.nan if value is None else float(value)


class SiteGate:
    """The gate's state for the running gateway, recomputed at most every ``refresh_seconds``.

    Parameters
    ----------
    config : GateConfig
    db : Database
    match_days : int
        ``groundtruth.match_days``.
    on_release : callable, optional
        Called after held deliveries were released (the service wakes its delivery lanes).
    on_open : callable, optional
        Called when the gate is found open after being closed (or at the first check): the service
        replays the results "required" reported as not assessed, so they reach the PACS as a new
        version.
    """

    def __init__(self, config: GateConfig, db: Database, match_days: int = 365,
                 on_release: Callable[[int], None] | None = None, clock: Callable[[], float] = time.monotonic,
                 on_open: Callable[[GateState], None] | None = None) -> None:
        self.config = config
        self.db = db
        self.match_days = match_days
        self.on_release = on_release
        self.on_open = on_open
        self.clock = clock
        self._lock = threading.Lock()
        self._state: GateState | None = None
        self._at = -math.inf

    def state(self) -> GateState:
        """The cached state (asked once per study by the worker)."""
        if self.config.site_validation == "off":
            return GateState("off", True, "off", None)
        with self._lock:
            if self._state is not None and self.clock() - self._at < self.config.refresh_seconds:
                return self._state
        return self.refresh()

    def refresh(self) -> GateState:
        """Read the pairs again, decide, export the figures; release held deliveries when open."""
        with self._lock:
            previous = self._state
            state = decide(load_pairs(self.db, match_days=self.match_days), self.config)
            self._state, self._at = state, self.clock()
        for name, value in (("open", float(state.open)), ("pairs", state.pairs), ("needed", state.needed),
                            ("auc", state.auc), ("auc_lower", state.auc_lower), ("rolling_pairs", state.rolling_pairs),
                            ("rolling_auc", state.rolling_auc), ("rolling_auc_lower", state.rolling_lower)):
            SITE_GATE.labels(figure=name).set(_gauge(value))
        if previous is None or (previous.open, previous.kind) != (state.open, state.kind):
            log.info("site_gate", mode=state.mode, open=state.open, kind=state.kind, pairs=state.pairs,
                     reason=state.reason)
        if state.open and (previous is None or not previous.open) and self.on_open:
            self.on_open(state)
        # Every refresh while open (not only the opening one): a result committed while the gate
        # was opening must not stay held until the next change.
        if state.open and state.mode == "shadow":
            released = release_held(self.db)
            if released:
                log.info("site_gate_released", deliveries=released)
                if self.on_release:
                    self.on_release(released)
        return state
