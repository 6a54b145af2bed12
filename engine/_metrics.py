"""The worker's metrics, through the OpenTelemetry metrics API (a no-op until the application,
or ``durable worker --metrics-port``, installs a MeterProvider).

Counters and histograms are recorded where things happen: a run's first claim, its end by
status, each attempt's and each step's duration, the time from a run's creation to its first
claim, a lost lease, a journal conflict. What the database holds (pending runs and the age of
the oldest per queue, running and suspended runs, slots held per concurrency key) is read when
a reader collects, not polled: ``observe_database`` registers gauges whose callbacks run the
queries on the worker's event loop, so a worker nobody scrapes pays nothing for them. Labels
are bounded: functions, queues and statuses are the app's own; concurrency keys are limited to
the KEYS busiest.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from datetime import timedelta
from typing import Any

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

log = logging.getLogger(__name__)

KEYS = 20  # concurrency keys reported, the busiest first
FRESH = 1.0  # seconds a reading of the database serves the gauges of one collection
COLLECT_TIMEOUT = 5.0  # seconds a collection waits for the database before giving up

_meter = metrics.get_meter("durable")
# Seconds, from a millisecond step to an hour-long attempt (the SDK's default buckets are
# meant for milliseconds).
_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300]
_BUCKETS += [900, 3600]

runs_started = _meter.create_counter(
    "durable.runs.started", unit="{run}", description="Runs claimed for the first time"
)
_ended = {
    status: _meter.create_counter(
        f"durable.runs.{status}", unit="{run}", description=f"Runs that ended {status}"
    )
    for status in ("completed", "failed", "cancelled", "paused")
}
attempt_duration = _meter.create_histogram(
    "durable.attempt.duration",
    unit="s",
    explicit_bucket_boundaries_advisory=_BUCKETS,
    description="Attempts of runs, from claim to their last statement, by how they ended",
)
step_duration = _meter.create_histogram(
    "durable.step.duration",
    unit="s",
    description="Step bodies, every try, by outcome",
    explicit_bucket_boundaries_advisory=_BUCKETS,
)
start_latency = _meter.create_histogram(
    "durable.run.start_latency",
    unit="s",
    explicit_bucket_boundaries_advisory=_BUCKETS,
    description="From a run's creation (or its start time) to its first claim",
)
leases_lost = _meter.create_counter(
    "durable.leases.lost", unit="{attempt}", description="Attempts abandoned: lease lost"
)
journal_conflicts = _meter.create_counter(
    "durable.journal.conflicts",
    unit="{entry}",
    description="Journal appends refused: the position was already written",
)


def declare(functions: Iterable[str]) -> None:
    """Start every counter of ``functions`` at zero, so that a series exists (and reads 0)
    before its first event: a query for failures needs no special case for 'never'."""
    for function in functions:
        labels = {"function": function}
        for counter in (runs_started, leases_lost, *_ended.values()):
            counter.add(0, labels)
    journal_conflicts.add(0)


def run_ended(function: str, status: str) -> None:
    counter = _ended.get(status)
    if counter is not None:
        counter.add(1, {"function": function})


# -- what the database holds, read at collection ------------------------------------------------

Snapshot = dict[str, list[tuple[float, dict[str, str]]]]
Reader = Callable[[], Coroutine[Any, Any, Snapshot]]


class DatabaseGauges:
    """Gauges read from the database when a reader collects (see the module's docstring).
    ``read`` returns a Snapshot (gauge name to observations); it runs on ``loop``."""

    def __init__(self) -> None:
        self._sources: list[tuple[asyncio.AbstractEventLoop, Reader]]
        self._sources = []
        self._lock = threading.Lock()
        self._snapshot: Snapshot = {}
        self._taken = -FRESH
        for name, unit, description in _GAUGES:
            _meter.create_observable_gauge(
                name, callbacks=[self._callback(name)], unit=unit, description=description
            )

    def add(self, loop: asyncio.AbstractEventLoop, read: Reader) -> None:
        with self._lock:
            self._sources.append((loop, read))

    def remove(self, read: Reader) -> None:
        with self._lock:
            self._sources = [(lp, r) for lp, r in self._sources if r is not read]

    def _callback(self, name: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(_options: CallbackOptions) -> Iterable[Observation]:
            with self._lock:
                stale = time.monotonic() - self._taken > FRESH
            if stale:  # the first gauge of a collection reads the database for all of them
                snapshot = self._collect()
                with self._lock:
                    self._snapshot, self._taken = snapshot, time.monotonic()
            return [Observation(v, labels) for v, labels in self._snapshot.get(name, [])]

        return observe

    def _collect(self) -> Snapshot:
        with self._lock:
            sources = list(self._sources)
        if not sources:
            return {}
        loop, read = sources[0]  # one worker of the process reads for all: same database
        try:
            if _on(loop):  # a collection made from the loop itself cannot wait on it
                return self._snapshot
            return asyncio.run_coroutine_threadsafe(read(), loop).result(COLLECT_TIMEOUT)
        except Exception as exc:
            log.warning("metrics: reading the database failed (%s); gauges left out", exc)
            return {}


def _on(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


_GAUGES = [
    ("durable.queue.pending", "{run}", "Pending runs per queue (the autoscaling signal)"),
    ("durable.queue.oldest_pending_age", "s", "Age of the oldest pending run per queue"),
    ("durable.queue.running", "{run}", "Running runs per queue"),
    ("durable.runs.suspended", "{run}", "Runs suspended (sleeping or waiting)"),
    ("durable.concurrency.slots_held", "{slot}", "Slots held per concurrency key (busiest)"),
]

database_gauges = DatabaseGauges()


def snapshot_of(
    depths: Sequence[dict[str, Any]], suspended: int, keys: Sequence[dict[str, Any]]
) -> Snapshot:
    """The gauges' observations from the store's queue_depths, suspended count and busy keys."""
    pending, oldest, running = [], [], []
    for depth in depths:
        queue = {"queue": depth["queue"] or "undeclared"}
        pending.append((float(depth["pending"]), queue))
        running.append((float(depth["running"]), queue))
        age: timedelta | None = (
            None if depth["oldest_pending"] is None else depth["now"] - depth["oldest_pending"]
        )
        oldest.append((0.0 if age is None else age.total_seconds(), queue))
    return {
        "durable.queue.pending": pending,
        "durable.queue.oldest_pending_age": oldest,
        "durable.queue.running": running,
        "durable.runs.suspended": [(float(suspended), {})],
        "durable.concurrency.slots_held": [
            (float(k["holding"]), {"key": k["key"]}) for k in keys[:KEYS]
        ],
    }
