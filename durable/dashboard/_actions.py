"""The dashboard's actions, each through the App method the CLI uses: cancel, resume, retry,
fork from a journal position, send an event, and bulk cancel or retry of the runs a filter
selects (after a confirmation that shows how many). Each is a POST with the CSRF token."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlencode

from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from durable._app import App
from durable.dashboard._pages import FILTER_FIELDS, run_filter
from durable.dashboard._render import page
from durable.dashboard._state import csrf_ok, dashboard_of
from engine import RunFilter
from engine.errors import DurableError, InvalidInput

BULK_LIMIT = 10_000  # runs one bulk action acts on at most
RETRYABLE = ("failed", "cancelled")
UNFINISHED = ("pending", "running", "suspended", "paused")


async def _form(request: Request) -> tuple[App, FormData] | Response:
    """The app and the form of an action, or the response refusing it."""
    dashboard = dashboard_of(request)
    if dashboard.read_only:
        return page(request, "refused.html", status_code=403, message="this dashboard is read-only")
    form = await request.form()
    if not csrf_ok(request, form.get("csrf")):
        return page(
            request,
            "refused.html",
            status_code=403,
            message="the form's CSRF token does not match: reload the page and try again",
        )
    return await dashboard.ready(), form


def _back(request: Request, run_id: str, done: str) -> Response:
    base = request.scope.get("root_path", "")
    return RedirectResponse(f"{base}/runs/{run_id}?{urlencode({'done': done})}", status_code=303)


async def run_action(request: Request) -> Response:
    given = await _form(request)
    if isinstance(given, Response):
        return given
    app, form = given
    run_id, action = str(form.get("run_id", "")), form.get("action")
    try:
        if action == "cancel":
            outcome = await app.cancel_run(run_id, "cancelled from the dashboard")
            return _back(request, run_id, f"cancel: {outcome}")
        if action == "resume":
            resumed = await app.resume_run(run_id)
            return _back(request, run_id, "resumed" if resumed else "not paused")
        if action == "retry":
            retried = await app.retry_run(run_id)
            return _back(request, str(retried.run_id), f"retry of run {run_id}")
        if action == "fork":
            position = str(form.get("position", ""))
            forked = await app.get_run(run_id).fork(from_position=position)
            return _back(request, str(forked.run_id), f"fork of run {run_id} from {position}")
    except DurableError as exc:
        return page(request, "refused.html", status_code=400, message=str(exc))
    return page(request, "refused.html", status_code=400, message=f"unknown action {action!r}")


async def send_event(request: Request) -> Response:
    given = await _form(request)
    if isinstance(given, Response):
        return given
    app, form = given
    name, key = str(form.get("name", "")), str(form.get("key", ""))
    text = str(form.get("payload", "")).strip() or "null"
    try:
        try:
            payload = json.loads(text, parse_constant=_refuse_constant)
        except ValueError as exc:
            raise InvalidInput(f"the payload is not JSON: {exc}") from None
        event_id = await app.send_event(name, payload, key=key)
    except DurableError as exc:
        return page(request, "refused.html", status_code=400, message=str(exc))
    run_id = str(form.get("run_id", ""))
    done = f"event {event_id} sent: {name} key={key!r}"
    if run_id:
        return _back(request, run_id, done)
    base = request.scope.get("root_path", "")
    return RedirectResponse(f"{base}/capacity?{urlencode({'done': done})}", status_code=303)


def _refuse_constant(constant: str) -> Any:
    raise ValueError(f"{constant} is not a JSON value")


async def bulk_action(request: Request) -> Response:
    """Cancel or retry every run the filter selects: first a confirmation with the count,
    then (``confirm``) the action, run by run."""
    given = await _form(request)
    if isinstance(given, Response):
        return given
    app, form = given
    action = form.get("action")
    if action not in ("cancel", "retry"):
        return page(request, "refused.html", status_code=400, message="unknown bulk action")
    try:
        where = run_filter(form)
        selected = await _select(app, where, RETRYABLE if action == "retry" else UNFINISHED)
    except DurableError as exc:
        return page(request, "refused.html", status_code=400, message=str(exc))
    values = {k: str(form.get(k, "")) for k in FILTER_FIELDS}
    if form.get("confirm") != "yes":
        return page(request, "confirm.html", action=action, count=len(selected), values=values)
    done = []
    for run_id in selected:
        try:
            if action == "retry":
                done.append((run_id, str((await app.retry_run(run_id)).run_id)))
            else:
                done.append((run_id, await app.cancel_run(run_id, "cancelled from the dashboard")))
        except DurableError as exc:  # the run changed since: say so, go on
            done.append((run_id, f"skipped: {exc}"))
    return page(request, "bulk_done.html", action=action, done=done, values=values)


async def _select(app: App, where: RunFilter, statuses: tuple[str, ...]) -> list[str]:
    """The ids of the runs ``where`` selects whose status is one of ``statuses``."""
    selected: list[str] = []
    for status in statuses if where.status is None else (where.status,):
        if status not in statuses:
            continue
        after = None
        while len(selected) < BULK_LIMIT:
            runs = await app.list_runs(where, status=status, limit=1000, after=after)
            selected += [str(r.run_id) for r in runs]
            if len(runs) < 1000:
                break
            after = runs[-1]
    return selected[:BULK_LIMIT]
