"""The dashboard's pages: the runs (filtered, counted, a page at a time), a run with its
timeline (and the fragment and event stream that keep it live), a whole value, capacity."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse

from durable._handle import RunInfo
from durable.dashboard._render import page, shown
from durable.dashboard._state import dashboard_of
from durable.dashboard._timeline import WIDTH, timeline
from engine import RunFilter, RunStatus
from engine.errors import DurableError, InvalidInput, RunNotFound

PAGE = 50
COUNT_CAP = 10_000
STATUSES: tuple[RunStatus, ...] = (
    "pending",
    "running",
    "suspended",
    "paused",
    "completed",
    "failed",
    "cancelled",
)
FILTER_FIELDS = ("status", "function", "queue", "version", "tag", "since", "until", "q")


def run_filter(values: Any) -> RunFilter:
    """A RunFilter from the runs page's query (or a bulk form): InvalidInput for a bad value."""

    def given(name: str) -> str | None:
        value = values.get(name)
        return value.strip() or None if isinstance(value, str) else None

    tags: dict[str, str] = {}
    for text in (given("tag") or "").split(","):
        if text.strip():
            name, sep, value = text.strip().partition("=")
            if not sep or not name:
                raise InvalidInput(f"tag {text.strip()!r} is not NAME=VALUE")
            tags[name] = value
    status = given("status")
    if status is not None and status not in STATUSES:
        raise InvalidInput(f"{status!r} is not a run status")
    return RunFilter(
        status=status,
        function=given("function"),
        queue=given("queue"),
        version=given("version"),
        tags=tags or None,
        since=_moment(given("since"), "since"),
        until=_moment(given("until"), "until"),
        search=given("q"),
    )


def _moment(text: str | None, what: str) -> datetime | None:
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidInput(f"{what}: {text!r} is not a date and time") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def filter_query(request: Request, **changes: str | None) -> str:
    """The runs page's query string with ``changes`` (None removes a field)."""
    values = {k: v for k in FILTER_FIELDS if (v := request.query_params.get(k))}
    for key, value in changes.items():
        if value is None:
            values.pop(key, None)
        else:
            values[key] = value
    return urlencode(values)


async def runs_page(request: Request) -> Response:
    dashboard = dashboard_of(request)
    app = await dashboard.ready()
    error = None
    try:
        where = run_filter(request.query_params)
        after = _after(request.query_params.get("after"))
        runs = await app.list_runs(where, limit=PAGE + 1, after=after)
        counts = await app.count_runs(where, cap=COUNT_CAP)
    except DurableError as exc:
        where, runs, counts, error = RunFilter(), [], {}, str(exc)
    more = len(runs) > PAGE
    runs = runs[:PAGE]
    next_query = None
    if more:
        last = runs[-1]
        next_query = filter_query(request, after=f"{last.created_at.isoformat()}|{last.run_id}")
    return page(
        request,
        "runs.html",
        status_code=400 if error else 200,
        runs=runs,
        counts=[(s, counts.get(s, 0)) for s in STATUSES],
        cap=COUNT_CAP,
        where=where,
        values={k: request.query_params.get(k, "") for k in FILTER_FIELDS},
        status_query={s: filter_query(request, status=s, after=None) for s in STATUSES},
        all_query=filter_query(request, status=None, after=None),
        next_query=next_query,
        error=error,
        statuses=STATUSES,
    )


def _after(text: str | None) -> RunInfo | None:
    """The run a page starts after, from ``created_at|run_id``."""
    if not text:
        return None
    created, _, run = text.partition("|")
    try:
        at, run_id = datetime.fromisoformat(created), uuid.UUID(run)
    except ValueError:
        raise InvalidInput(f"after: {text!r} is not a page position") from None
    # Only the keyset of the run is read: its created_at and id.
    return RunInfo(
        run_id=run_id,
        function="",
        status="pending",
        attempt=0,
        idempotency_key=None,
        input=None,
        result=None,
        error=None,
        created_at=at,
        started_at=None,
        finished_at=None,
        available_at=None,
    )


async def _run_context(request: Request) -> dict[str, Any]:
    app = await dashboard_of(request).ready()
    try:
        handle = app.get_run(request.path_params["run_id"])
        info = await handle.info()
    except (InvalidInput, RunNotFound) as exc:
        raise _NotFound(str(exc)) from exc
    journal = await handle.journal()
    waits = await handle.waits()
    children = await handle.children()
    now = datetime.now(UTC)
    return {
        "info": info,
        "journal": journal,
        "waits": waits,
        "children": children,
        "timeline": timeline(info, journal, waits, now),
        "width": WIDTH,
        "unfinished": info.status in ("pending", "running", "suspended", "paused"),
    }


class _NotFound(Exception):
    pass


async def run_page(request: Request) -> Response:
    try:
        context = await _run_context(request)
    except _NotFound as exc:
        return page(request, "missing.html", status_code=404, message=str(exc))
    return page(request, "run.html", done=request.query_params.get("done"), **context)


async def run_fragment(request: Request) -> Response:
    """The live part of a run's page, fetched again whenever the run changes."""
    try:
        context = await _run_context(request)
    except _NotFound as exc:
        return PlainTextResponse(str(exc), status_code=404)
    return page(request, "run_live.html", **context)


async def run_live(request: Request) -> Response:
    dashboard = dashboard_of(request)
    await dashboard.ready()
    try:
        run_id = uuid.UUID(request.path_params["run_id"])
    except ValueError:
        return PlainTextResponse("not a run id", status_code=404)
    return StreamingResponse(
        dashboard.hub.stream(run_id),
        media_type="text/event-stream",
        headers={"x-accel-buffering": "no"},
    )


_VALUES = ("input", "result", "error")


async def run_value(request: Request) -> Response:
    """A value whole (input, result, error, or a journal entry's value by position)."""
    app = await dashboard_of(request).ready()
    what = request.path_params["what"]
    try:
        handle = app.get_run(request.path_params["run_id"])
        info = await handle.info()
    except (InvalidInput, RunNotFound) as exc:
        return PlainTextResponse(str(exc), status_code=404)
    if what in _VALUES:
        value: Any = getattr(info, what)
        if what == "error" and value is not None:
            value = {"type": value.type, "message": value.message, "traceback": value.traceback}
    else:
        entry = next((e for e in await handle.journal() if e.position == what), None)
        if entry is None:
            return PlainTextResponse(f"no journal entry at position {what}", status_code=404)
        value = {
            "value": entry.value,
            "error": entry.error,
            "started_at": entry.started_at,
            "duration_ms": entry.duration_ms,
            "timing": entry.timing,
        }
    return PlainTextResponse(shown(value), media_type="text/plain; charset=utf-8")


async def capacity_page(request: Request) -> Response:
    app = await dashboard_of(request).ready()
    return page(request, "capacity.html", capacity=await app.capacity())
