"""Time, in one place. Only this module reads the system clock.

The database's clock is the reference for leases and timers: a worker learns the offset between
its own clock and the database's at every claim and corrects by it, so a worker whose clock is
off never wakes a timer early or spins on one that the database thinks is due.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Protocol


class Clock(Protocol):
    """What the engine needs from a clock."""

    def now(self) -> datetime:
        """The current time, timezone-aware UTC."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back."""
        ...


class SystemClock:
    """The real clock."""

    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()


class DatabaseTime:
    """The database's time, estimated from a local clock and the last offset measured."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._offset = timedelta(0)

    def observe(self, db_now: datetime) -> None:
        """Record a reading of the database's clock taken just now."""
        self._offset = db_now - self._clock.now()

    def now(self) -> datetime:
        return self._clock.now() + self._offset

    def seconds_until(self, moment: datetime) -> float:
        return (moment - self.now()).total_seconds()
