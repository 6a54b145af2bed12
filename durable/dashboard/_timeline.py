"""A run's journal as a timeline: one row per entry, in the order it was written, on one time
axis from the run's creation to its end (or now).

A step is a bar per try of its body, from the try's recorded start for its recorded duration
(a failed try in its own colour), so a step that failed twice and then passed shows three. A
sleep is a span to its wake time; an event the run waited for, a span from the start of the
wait to its arrival (its deadline marked); a wait still open, a span to now with its deadline.
The rest (now, uuid, random, patch markers, children started and joined) are marks."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from durable._handle import RunInfo
from engine import JournalEntry, WaitRow

WIDTH = 1000.0  # the SVG's user units across the time axis
MIN_WIDTH = 1.0  # a bar too short to see still shows


@dataclass(frozen=True)
class Segment:
    """A bar or a mark of one row, in user units (``x``, ``width``; a mark has width 0)."""

    x: float
    width: float
    css: str  # try ok | try failed | sleep | wait | deadline | mark
    title: str
    ms: float | None = None  # a try's recorded duration


@dataclass(frozen=True)
class Row:
    position: str
    kind: str
    label: str
    segments: list[Segment]
    attempts: int = 0  # a step's tries
    link: str | None = None  # a child run's id


@dataclass(frozen=True)
class Timeline:
    start: datetime
    end: datetime
    rows: list[Row] = field(default_factory=list)


@dataclass(frozen=True)
class _Scale:
    """Times to user units: ``start`` at 0, ``span`` seconds across WIDTH."""

    start: datetime
    span: float

    def x(self, moment: datetime) -> float:
        return round((moment - self.start).total_seconds() / self.span * WIDTH, 3)

    def units(self, seconds: float) -> float:
        return round(seconds / self.span * WIDTH, 3)


def timeline(
    info: RunInfo, journal: list[JournalEntry], waits: list[WaitRow], now: datetime
) -> Timeline:
    end = info.finished_at or now
    moments = [info.created_at, end] + [e.created_at for e in journal]
    for entry in journal:
        moments += [at for at, _ms, _error in _tries(entry)]
        if entry.kind == "sleep" and isinstance(entry.value, dict) and "wake_at" in entry.value:
            moments.append(_time(entry.value["wake_at"]))
    start, end = min(moments), max(moments)
    scale = _Scale(start, max((end - start).total_seconds(), 1e-6))
    rows = [_row(entry, scale) for entry in journal]
    for wait in waits:
        label = "child run" if wait.name == "durable.child" else f"waiting for {wait.name}"
        since = scale.x(wait.created_at) if wait.created_at else scale.x(now)
        segments = [Segment(since, max(MIN_WIDTH, scale.x(now) - since), "wait", label)]
        if wait.timeout_at is not None:
            deadline = min(scale.x(wait.timeout_at), WIDTH)
            segments.append(Segment(deadline, 0, "deadline", f"deadline {wait.timeout_at}"))
        rows.append(Row(wait.position, "wait", label, segments))
    return Timeline(start, end, rows)


def _row(entry: JournalEntry, scale: _Scale) -> Row:
    at = scale.x(entry.created_at)
    if entry.kind == "step":
        return _step_row(entry, scale, at)
    if entry.kind == "sleep" and isinstance(entry.value, dict) and "wake_at" in entry.value:
        wake = scale.x(_time(entry.value["wake_at"]))
        title = f"sleep until {entry.value['wake_at']}"
        span = Segment(at, max(MIN_WIDTH, wake - at), "sleep", title)
        return Row(entry.position, "sleep", f"sleep {entry.name}", [span])
    if entry.kind == "event":
        return _event_row(entry, scale, at)
    link = None
    if entry.kind == "start" and isinstance(entry.value, dict):
        link = entry.value.get("run_id")
    label = f"{entry.kind} {entry.name}" if entry.name != entry.kind else entry.kind
    return Row(entry.position, entry.kind, label, [Segment(at, 0, "mark", label)], link=link)


def _step_row(entry: JournalEntry, scale: _Scale, at: float) -> Row:
    tries = _tries(entry)
    segments = []
    for n, (at_time, ms, error) in enumerate(tries, 1):
        title = f"attempt {n}: {ms:.1f} ms" + ("" if error is None else f", {error}")
        segments.append(
            Segment(
                scale.x(at_time),
                max(MIN_WIDTH, scale.units(ms / 1000)),
                "try ok" if error is None else "try failed",
                title,
                ms,
            )
        )
    if not segments:  # journaled before timings were recorded
        segments.append(Segment(at, 0, "mark", f"step {entry.name}"))
    label = f"step {entry.name}" + (f" ({len(tries)} attempts)" if len(tries) > 1 else "")
    return Row(entry.position, "step", label, segments, attempts=len(tries))


def _event_row(entry: JournalEntry, scale: _Scale, at: float) -> Row:
    timing = entry.timing if isinstance(entry.timing, dict) else {}
    value = entry.value if isinstance(entry.value, dict) else {}
    label = f"event {entry.name} " + ("timed out" if value.get("timeout") else "received")
    segments = []
    if entry.started_at is not None:
        since = scale.x(entry.started_at)
        segments.append(Segment(since, max(MIN_WIDTH, at - since), "wait", label))
        if timing.get("deadline"):
            deadline = min(scale.x(_time(timing["deadline"])), WIDTH)
            segments.append(Segment(deadline, 0, "deadline", f"deadline {timing['deadline']}"))
    segments.append(Segment(at, 0, "mark", label))
    return Row(entry.position, "event", label, segments)


def _tries(entry: JournalEntry) -> list[tuple[datetime, float, str | None]]:
    """A step's tries: (start, milliseconds, error or None), the failed ones kept in its
    timing, then the last, whose outcome is the entry's."""
    if entry.kind != "step" or entry.started_at is None or entry.duration_ms is None:
        return []
    timing = entry.timing if isinstance(entry.timing, dict) else {}
    earlier = [
        (_time(t["at"]), float(t["ms"]), str(t.get("error") or "failed"))
        for t in timing.get("tries", [])
    ]
    error = entry.error
    last = None if error is None else f"{error.get('type')}: {error.get('message')}"
    return [*earlier, (entry.started_at, entry.duration_ms, last)]


def _time(text: str | datetime) -> datetime:
    return text if isinstance(text, datetime) else datetime.fromisoformat(text)
