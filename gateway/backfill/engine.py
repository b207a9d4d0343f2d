"""The backfill loop: plan (query the archive in chunks, write what matched), then fetch one
study at a time, at most ``rate`` a minute, only inside the window, never while the gateway's
own queue is long; then wait for the gateway to screen what arrived.

The clock, the sleep and the stop signal are injectable (tests run the window logic on a fake
clock and the rest over real associations).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from osteogate.gateway.backfill import metrics
from osteogate.gateway.backfill.ledger import Counts, Ledger
from osteogate.gateway.backfill.query import Chunk, FindError
from osteogate.gateway.backfill.retrieve import MoveDestinationUnknown
from osteogate.gateway.backfill.sources import Source
from osteogate.gateway.backfill.window import RateLimiter, Window
from osteogate.gateway.core.dicomnet import Outcome, backoff_seconds
from osteogate.gateway.core.errors import OsteoGateError, PeerUnavailable
from osteogate.gateway.core.logs import get_logger, scrub
from osteogate.gateway.store.backfill import BackfillState

log = get_logger("osteogate.gateway.backfill.engine")


class MoveRefused(OsteoGateError):
    """The archive refuses to send to the gateway's AE title: a configuration problem of the PACS."""

    exit_code = PeerUnavailable.exit_code


@dataclass
class Options:
    """How a run behaves (from ``[backfill]`` and the command line)."""

    rate_per_minute: float = 10
    window: Window | None = None
    max_queue: int = 20
    max_attempts: int = 5
    retry_base_seconds: float = 30
    retry_max_seconds: float = 1800
    screen_wait_seconds: float = 600
    poll_seconds: float = 1.0
    dry_run: bool = False
    retry_failed: bool = False
    move_destination: str = "OSTEOGATE"


@dataclass
class Progress:
    """What the progress line and the closing report show."""

    counts: Counts = field(default_factory=Counts)
    already_screened: int = 0  # found, but screened by the current model before this run
    would_retrieve: int = 0  # dry run
    rate_per_minute: float = 0.0
    eta_seconds: float | None = None
    status: str = "starting"
    capped_days: list[str] = field(default_factory=list)

    @property
    def skipped(self) -> int:
        return self.counts.skipped + self.already_screened

    @property
    def found(self) -> int:
        return self.counts.found + self.already_screened

    def line(self) -> str:
        eta = "-" if self.eta_seconds is None else _duration(self.eta_seconds)
        return (f"found {self.found} · retrieved {self.counts.retrieved} · screened {self.counts.screened} · "
                f"skipped {self.skipped} · failed {self.counts.failed} · {self.rate_per_minute:.1f}/min · "
                f"ETA {eta} · {self.status}")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class _Pacing:
    """Waiting: for the window, for the gateway's queue, for screening; and the progress report."""

    ledger: Ledger
    options: Options
    progress: Progress
    stop: threading.Event
    sleep: Callable[[float], object]
    monotonic: Callable[[], float]
    now: Callable[[], datetime]
    on_progress: Callable[[Progress], None]
    run_id: int | None
    _retrieves: deque[float]
    _held_at: float

    def _sleep(self, seconds: float) -> None:
        # The real sleep waits on the stop event, so a SIGTERM ends a long wait at once.
        if self.sleep is time.sleep:
            self.stop.wait(seconds)
        else:
            self.sleep(seconds)

    def _report(self, status: str | None = None) -> None:
        if status:
            self.progress.status = status
        if self.run_id is not None:
            self.progress.counts = self.ledger.counts(self.run_id)
            if self.monotonic() - self._held_at >= 30:  # keep this process's hold on the store
                self.ledger.hold(self.run_id)
                self._held_at = self.monotonic()
        recent = [t for t in self._retrieves if self.monotonic() - t <= 600]
        if len(recent) >= 2:
            span = max(self.monotonic() - recent[0], 60 / self.options.rate_per_minute)
            self.progress.rate_per_minute = len(recent) / span * 60
        waiting = self.progress.counts.waiting
        pace = self.progress.rate_per_minute or self.options.rate_per_minute
        self.progress.eta_seconds = waiting / pace * 60 if waiting else None
        self.on_progress(self.progress)

    def _wait_for_slot(self) -> bool:
        """The rate's next slot, inside the window, with a short queue (False: stopped)."""
        while self._wait_until_allowed():
            if not self.limiter.acquire(self.stop.is_set):
                return False
            # Waiting for the slot may have crossed the window's end.
            if self.options.window is None or self.options.window.contains(self.now()):
                return True
        return False

    def _wait_until_allowed(self) -> bool:
        """Inside the window and the gateway's queue short, both at once: a long queue may outlast
        the window, and then the next window is awaited."""
        while self._wait_window() and self._wait_queue():
            if self.options.window is None or self.options.window.contains(self.now()):
                return True
        return False

    def _wait_window(self) -> bool:
        window = self.options.window
        while window is not None and not window.contains(self.now()):
            if self.stop.is_set():
                return False
            self._report(f"waiting for the window {window}")
            self._sleep(min(60.0, max(1.0, window.seconds_until_open(self.now()))))
        return not self.stop.is_set()

    def _wait_queue(self) -> bool:
        while (depth := self.ledger.queue_depth()) > self.options.max_queue:
            if self.stop.is_set():
                return False
            self.ledger.refresh_screened()
            self._report(f"paused: the gateway has {depth} jobs queued (backfill.max_queue {self.options.max_queue})")
            self._sleep(self.options.poll_seconds)
        return not self.stop.is_set()

    def _wait_screened(self) -> None:
        deadline = self.monotonic() + self.options.screen_wait_seconds
        assert self.run_id is not None
        while not self.stop.is_set():
            self.ledger.refresh_screened()
            self._report()
            if self.progress.counts.receiving == 0 or self.monotonic() >= deadline:
                return
            self._report(f"waiting for the gateway to screen {self.progress.counts.receiving} studies")
            self._sleep(self.options.poll_seconds)


class Backfill(_Pacing):
    """One run against one source."""

    def __init__(self, ledger: Ledger, source: Source, filters: dict, chunks: list[Chunk], options: Options, *,
                 now: Callable[[], datetime] = lambda: datetime.now().astimezone(),
                 monotonic: Callable[[], float] = time.monotonic, sleep: Callable[[float], object] = time.sleep,
                 stop: threading.Event | None = None, on_progress: Callable[[Progress], None] = lambda p: None) -> None:
        self.ledger = ledger
        self.source = source
        self.filters = filters
        self.chunks = chunks
        self.options = options
        self.now = now
        self.monotonic = monotonic
        self.sleep = sleep
        self.stop = stop or threading.Event()
        self.on_progress = on_progress
        self.limiter = RateLimiter(options.rate_per_minute, monotonic, self._sleep)
        self.progress = Progress()
        self._retrieves: deque[float] = deque(maxlen=50)
        self.run_id: int | None = None
        self._received_any = False
        self._held_at = 0.0
        self._refused_rows: list[int] = []

    # -- the run -------------------------------------------------------------------------------

    def run(self) -> Progress:
        """Plan, retrieve, wait for screening. Returns the final figures."""
        if self.options.dry_run:
            self._plan(None)
            self._report("dry run: nothing retrieved, nothing written")
            return self.progress
        self.run_id, resumed = self.ledger.start_run(self.source.name, self.filters)
        log.info("backfill_started", run=self.run_id, resumed=resumed, source_kind=type(self.source).__name__)
        if self.options.retry_failed:
            self.ledger.retry_failed(self.run_id)
        self._held_at = self.monotonic()
        try:
            self._plan(self.run_id)
            self._retrieve_all(self.run_id)
            self._wait_screened()
        finally:
            self.ledger.hold(self.run_id, release=True)
        counts = self.ledger.counts(self.run_id)
        if not self.stop.is_set() and counts.waiting == 0:
            self.ledger.finish_run(self.run_id)
        self._report("stopped" if self.stop.is_set() else "done")
        return self.progress

    def _plan(self, run_id: int | None) -> None:
        done = self.ledger.chunks_done(run_id) if run_id is not None else set()
        for chunk in self.chunks:
            if self.stop.is_set():
                return
            if chunk.key in done:
                continue
            self._report(f"querying {chunk.key}")
            try:
                for found in self.source.studies(chunk, lambda c: self.progress.capped_days.append(c.key)):
                    self._plan_one(run_id, found)
            except FindError as exc:
                raise PeerUnavailable(f"backfill query to {self.source.name} failed", str(exc),
                                      "Check the PACS and run the same command again: it resumes") from None
            if run_id is not None:
                self.ledger.chunk_done(run_id, chunk.key)

    def _plan_one(self, run_id: int | None, found: object) -> None:
        from osteogate.gateway.backfill.query import FoundStudy

        assert isinstance(found, FoundStudy)
        if run_id is None:
            verdict = "skipped" if found.skip_reason else self.ledger.judge_found(found.study_uid, dry_run=True)
            self.progress.counts.found += verdict != "screened"
            if verdict == "screened":
                self.progress.already_screened += 1
            elif verdict in ("skipped", "failed"):
                self.progress.counts.skipped += 1
            elif verdict == "retrieve":
                self.progress.would_retrieve += 1
            return
        verdict = self.ledger.record_found(run_id, self.source.name, found)
        if verdict in ("screened", "failed"):
            self.progress.already_screened += 1

    def _retrieve_all(self, run_id: int) -> None:
        while not self.stop.is_set():
            self.ledger.refresh_screened()
            row = self.ledger.next_due(run_id, datetime.now(UTC))
            if row is None:
                retry_at = self.ledger.next_retry_at(run_id)
                if retry_at is None:
                    return
                wait = (retry_at.replace(tzinfo=retry_at.tzinfo or UTC) - datetime.now(UTC)).total_seconds()
                self._report(f"waiting {wait:.0f} s to retry")
                self._sleep(min(max(wait, 0.05), self.options.poll_seconds * 5))
                continue
            if not self._wait_for_slot():
                return
            self._retrieve_one(row.id, row.study_uid, row.study_key, row.series_uids)

    def _retrieve_one(self, row_id: int, study_uid: str, key: str, series_uids: list[str] | None) -> None:
        row = self.ledger.set_state(row_id, BackfillState.RETRIEVING, attempt=True)
        self._report(f"retrieving {key}")
        self._retrieves.append(self.monotonic())
        try:
            result = self.source.retrieve(study_uid, series_uids)
        except MoveDestinationUnknown as exc:
            self._refused(row_id, str(exc), "the PACS does not know the C-MOVE destination AE title "
                          f"{self.options.move_destination}")
        if result.nothing_sent and not self._received_any and self.options.move_destination:
            # Some PACS (Orthanc: 0xC000) refuse an unknown move destination without saying so.
            # Twice in a row, before anything came, is a configuration problem, not bad luck.
            self._refused_rows.append(row_id)
            if len(self._refused_rows) >= 2:
                self._refused(row_id, result.detail, "every C-MOVE so far was refused before a single instance "
                              f"was sent, which is how PACS answer when they do not know the move destination "
                              f"AE title {self.options.move_destination}")
        if result.received:
            self._received_any = True
            self.ledger.set_state(row_id, BackfillState.RECEIVED)
            metrics.RETRIEVES.labels("received").inc()
            log.info("backfill_retrieved", study_key=key, instances=result.completed)
        elif result.outcome is Outcome.TRANSIENT and row.attempts < self.options.max_attempts:
            wait = backoff_seconds(row.attempts, self.options.retry_base_seconds, self.options.retry_max_seconds)
            self.ledger.set_state(row_id, BackfillState.FOUND, result.detail, retry_in=wait)
            metrics.RETRIEVES.labels("retry").inc()
            log.warning("backfill_retrieve_retry", study_key=key, detail=scrub(result.detail), attempt=row.attempts,
                        retry_in=wait)
        else:
            reason = result.detail if result.outcome is not Outcome.TRANSIENT else \
                f"{result.detail} (gave up after {row.attempts} attempts)"
            self.ledger.set_state(row_id, BackfillState.FAILED, reason)
            metrics.RETRIEVES.labels("failed").inc()
            log.warning("backfill_retrieve_failed", study_key=key, detail=scrub(reason))
        self._report()

    def _refused(self, row_id: int, detail: str, why: str) -> None:
        """Stop the run: the studies refused so far go back to the plan untouched."""
        for refused in {*self._refused_rows, row_id}:
            self.ledger.set_state(refused, BackfillState.FOUND, f"move refused: {detail}", attempt=False)
        metrics.RETRIEVES.labels("refused").inc()
        raise MoveRefused(f"{self.source.name} refused to send to {self.options.move_destination} ({detail})", why,
                          "Register OsteoGate in the PACS as a DICOM node (its AE title, host and port: "
                          "deploy/README.md), then run the same command again: it resumes")
