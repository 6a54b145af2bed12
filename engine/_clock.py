"""Time, in one place. Only this module reads the system clock.

The database's clock is the reference for leases and timers: a worker learns the offset between
its own clock and the database's at every claim and corrects by it, so a worker whose clock is
off never wakes a timer early or spins on one that the database thinks is due.
"""

from __future__ import annotations

import asyncio
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

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` on this clock (a step's retry backoff, a short timer wait)."""
        ...

    async def sleep_until(self, moment: datetime) -> None:
        """Wait until ``moment`` on this clock, however long (a reservation that must come)."""
        ...


class SystemClock:
    """The real clock."""

    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))

    async def sleep_until(self, moment: datetime) -> None:
        await self.sleep((moment - self.now()).total_seconds())


class DatabaseTime:
    """The database's time, estimated from a local clock and the offsets measured.

    A reading of the database's clock arrives some time after it was taken (the rest of its
    statement, the commit, the trip back, the event loop's turn: 1 to 15 ms on a loaded
    machine), so each offset it gives is at most the true one: the estimate lags, and a timer
    waited for on it is late, never early. Of the readings of the last ``WINDOW`` seconds the
    largest offset, the one that lagged least, is kept; an older one gives way to the next
    reading. (A database clock stepped back by D within the window reads up to D early until
    the window passes.)"""

    WINDOW = 2.0

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._offset = timedelta(0)
        self._taken: float | None = None  # when the kept offset was read (monotonic)

    def observe(self, db_now: datetime) -> None:
        """Record a reading of the database's clock taken just now."""
        offset = db_now - self._clock.now()
        at = self._clock.monotonic()
        if self._taken is None or offset >= self._offset or at - self._taken > self.WINDOW:
            self._offset, self._taken = offset, at

    def now(self) -> datetime:
        return self._clock.now() + self._offset

    def seconds_until(self, moment: datetime) -> float:
        return (moment - self.now()).total_seconds()

    async def sleep(self, seconds: float) -> None:
        await self._clock.sleep(seconds)

    async def sleep_until(self, moment: datetime) -> None:
        """Wait until the database's clock reads ``moment``."""
        await self._clock.sleep_until(moment - self._offset)


class VirtualClock:
    """A clock that moves only when told to (``durable.testing``).

    ``sleep`` yields to the event loop without moving time: in a simulation time passes
    between attempts, when the simulation advances to the next timer or event, so a retry's
    backoff takes no virtual time. ``sleep_until`` is the exception: a wait for a moment that
    must come before the run can go on (a retried step's rate-limit reservation: the run
    cannot suspend in the middle of a step) moves time to it, as the real clock would; it
    would otherwise never come. ``monotonic`` follows ``now``.
    """

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime(2030, 1, 1, tzinfo=UTC)
        if self._now.tzinfo is None:
            raise ValueError("a virtual clock starts at a timezone-aware datetime")
        self._origin = self._now

    def now(self) -> datetime:
        return self._now

    def monotonic(self) -> float:
        return (self._now - self._origin).total_seconds()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(0)

    async def sleep_until(self, moment: datetime) -> None:
        self.advance_to(moment)
        await asyncio.sleep(0)

    def advance(self, delta: timedelta) -> None:
        """Move time forward by ``delta``."""
        if delta < timedelta(0):
            raise ValueError(f"a virtual clock does not go back (asked to move {delta})")
        self._now += delta

    def advance_to(self, moment: datetime) -> None:
        """Move time forward to ``moment`` (a moment already past leaves it unchanged)."""
        self._now = max(self._now, moment)
