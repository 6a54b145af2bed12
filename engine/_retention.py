"""``Cleaner``: retention inside the workers. Every worker makes a pass now and then; the
database lets one at a time through (``PostgresStore.clean_up``), so a fleet needs no cron job
and no leader. What a pass does is in functions.sql, "Retention"."""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

from engine.errors import DatabaseError, DatabaseUnavailable

log = logging.getLogger(__name__)

LOCK_NOT_AVAILABLE = "55P03"
STARVED = 3  # passes in a row without the tables' lock before it is a warning


@dataclass(frozen=True)
class SegmentRow:
    """A segment of the partitioned tables (retention: functions.sql, "Retention"): its
    class (``retention``; None: kept for ever), its window, when it falls due, and, while it
    exists, its size, its runs and events, and what would outlive it (``kept``: runs by
    reason; ``events_kept``). A dropped one has ``removed``: what its drop did."""

    id: int
    retention: timedelta | None
    opened_at: datetime
    closed_at: datetime | None
    dropped_at: datetime | None
    due_at: datetime | None
    bytes: int | None
    runs: int | None
    events: int | None
    kept: dict[str, int] | None
    events_kept: int | None
    removed: dict[str, Any] | None


@dataclass(frozen=True)
class Cleanup:
    """What one retention pass did: segments opened, and a report per segment dropped
    (``segment``, ``into``, ``runs_removed``, ``runs_kept``, ``events_kept``, ``bytes``)."""

    opened: int
    dropped: list[dict[str, Any]]


class Cleans(Protocol):
    async def clean_up(self) -> Cleanup | None: ...


class Cleaner:
    """Makes a retention pass every ``interval``, jittered by a fifth either way so that the
    workers of a fleet started together do not all ask at once."""

    def __init__(
        self, store: Cleans, interval: timedelta, rng: random.Random | None = None
    ) -> None:
        self.store = store
        self.interval = interval.total_seconds()
        self.rng = rng or random.Random()
        self.failed = 0  # passes in a row that could not be made

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval * self.rng.uniform(0.8, 1.2))
            await self.once()

    async def once(self) -> Cleanup | None:
        """One pass; None when another process made it or it could not be made now (logged)."""
        try:
            done = await self.store.clean_up()
        except DatabaseError as exc:
            self.failed += 1
            if exc.sqlstate != LOCK_NOT_AVAILABLE:
                log.error("retention: the pass failed (%s); trying again later", exc)
            elif self.failed >= STARVED:
                log.warning(
                    "retention: the tables have been too busy to lock for %d passes in a row "
                    "(a long transaction on durable.runs, journal or events?); nothing is "
                    "removed meanwhile",
                    self.failed,
                )
            else:
                log.info("retention: the tables were too busy to lock; trying again later")
            return None
        except DatabaseUnavailable as exc:
            self.failed += 1
            log.warning("retention: %s; trying again later", exc)
            return None
        self.failed = 0
        if done is not None:
            for report in done.dropped:
                log.info(
                    "retention: dropped segment %s (%s runs, %s bytes of partitions); carried "
                    "%s runs and %s events forward into segment %s",
                    report["segment"],
                    report["runs_removed"],
                    report["bytes"],
                    report["runs_kept"],
                    report["events_kept"],
                    report["into"],
                )
        return done
