"""When a backfill may talk to the PACS: the ``--window HH:MM-HH:MM`` rule and the rate limit.

Pure functions and a small limiter with an injectable clock, so the rules are tested without
waiting for the night.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from datetime import time as clock_time

from osteogate.gateway.core.backfill_config import check_window


@dataclass(frozen=True)
class Window:
    """A daily time window in local time; ``end <= start`` means it crosses midnight
    (``19:00-07:00``). ``start == end`` is the whole day."""

    start: clock_time
    end: clock_time

    @classmethod
    def parse(cls, text: str) -> Window | None:
        """``"19:00-07:00"`` -> Window; empty -> None (any time). Raises ValueError otherwise."""
        text = check_window(text)
        if not text:
            return None
        first, second = text.split("-")
        return cls(clock_time.fromisoformat(first), clock_time.fromisoformat(second))

    def contains(self, moment: datetime | clock_time) -> bool:
        """Whether ``moment`` (its wall-clock time) lies inside: start inclusive, end exclusive."""
        now = moment.time() if isinstance(moment, datetime) else moment
        now = now.replace(tzinfo=None)
        if self.start == self.end:
            return True
        if self.start < self.end:
            return self.start <= now < self.end
        return now >= self.start or now < self.end  # crosses midnight

    def seconds_until_open(self, moment: datetime) -> float:
        """0 inside the window; otherwise the seconds until it next opens."""
        if self.contains(moment):
            return 0.0
        opening = moment.replace(hour=self.start.hour, minute=self.start.minute, second=0, microsecond=0)
        if opening <= moment:
            opening += timedelta(days=1)
        return (opening - moment).total_seconds()

    def __str__(self) -> str:
        return f"{self.start:%H:%M}-{self.end:%H:%M}"


class RateLimiter:
    """At most ``per_minute`` starts a minute, evenly spaced (60 / per_minute seconds apart), so a
    PACS sees a steady trickle rather than bursts. ``clock`` and ``sleep`` are injectable."""

    def __init__(self, per_minute: float, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], object] = time.sleep) -> None:
        if per_minute <= 0:
            raise ValueError("rate must be above 0 studies a minute")
        self.interval = 60.0 / per_minute
        self.clock = clock
        self.sleep = sleep
        self._last: float | None = None

    def wait_time(self) -> float:
        """Seconds until the next start is allowed (0: now)."""
        if self._last is None:
            return 0.0
        return max(0.0, self._last + self.interval - self.clock())

    def acquire(self, stop: Callable[[], bool] = lambda: False) -> bool:
        """Wait for the next slot (in short steps, so ``stop`` is honoured); False if stopped."""
        while (delay := self.wait_time()) > 0:
            if stop():
                return False
            self.sleep(min(delay, 0.5))
        self._last = self.clock()
        return True
