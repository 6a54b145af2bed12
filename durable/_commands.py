"""The CLI's commands on runs, events, schedules and versions (``durable runs ...``, ``durable
events send``, ``durable schedules list``, ``durable versions``, ``durable migrate``): each takes
a connected app and the parsed arguments, prints its answer, and returns the exit status.
``durable check`` and ``durable dashboard`` connect their own way (check reads only)."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import sys
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

from durable._app import App
from durable._handle import KEEP_INPUT, RunHandle, RunInfo
from engine import RunFilter
from engine._urls import redact
from engine.errors import DurableError

UNFINISHED = ("pending", "running", "suspended", "paused")


def load_app(target: str) -> App:
    """Import ``module:attribute`` and return the App it names."""
    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        raise DurableError(f"expected module:attribute, got {target!r}")
    sys.path.insert(0, "")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise DurableError(f"cannot import {module_name!r}: {exc}") from exc
    app = getattr(module, attribute, None)
    if not isinstance(app, App):
        raise DurableError(f"{target} is not a durable.App (got {type(app).__name__})")
    return app


async def check(args: argparse.Namespace, connect_timeout: float) -> int:
    """``durable check``: replay the unfinished runs on the app's code; 1 if any would fail."""
    # Read only: no App.connect, which would migrate the database to this code's schema.
    from durable.testing import check_runs

    logging.basicConfig(level=logging.ERROR, format="durable: %(message)s")
    app = load_app(args.app)
    app.configure(
        database_url=args.database_url,
        connect_timeout=args.connect_timeout or connect_timeout,
    )
    report = await check_runs(app, include_completed=args.include_completed)
    print(report)
    return 0 if report.passed else 1


async def dashboard(args: argparse.Namespace, connect_timeout: float) -> int:
    """``durable dashboard``: serve it until interrupted."""
    from durable.dashboard import serve
    from durable.dashboard._serve import check_bind

    logging.basicConfig(level=logging.WARNING, format="durable: %(message)s")
    check_bind(args.host, args.token)  # before any connection
    app = App(
        database_url=args.database_url,
        connect_timeout=args.connect_timeout or connect_timeout,
    )
    async with app:
        await serve(app, host=args.host, port=args.port, token=args.token, read_only=args.read_only)
    return 0


def db(action: str) -> int:
    """``durable db start|stop|status|url``: the embedded server."""
    from durable import _embedded

    if action == "start":
        server = _embedded.pin()
        print(f"embedded PostgreSQL running (pid {server.pid}) in {server.data_dir}")
        print(server.dsn)
    elif action == "stop":
        stopped = _embedded.unpin()
        print("embedded PostgreSQL stopped" if stopped else "embedded PostgreSQL was not running")
    elif action == "url":
        found, data_dir, _users, _pinned = _embedded.status()
        if found is None:
            print(
                f"not running (data dir {data_dir}); `durable db start` starts it", file=sys.stderr
            )
            return 1
        print(found.dsn)
    else:
        found, data_dir, users, pinned = _embedded.status()
        state = f"running (pid {found.pid})" if found else "stopped"
        print(f"embedded PostgreSQL: {state}")
        print(f"  data dir: {data_dir}")
        print(f"  pinned by `durable db start`: {'yes' if pinned else 'no'}")
        print(f"  processes using it: {', '.join(map(str, users)) or 'none'}")
    return 0


async def queues(app: App, args: argparse.Namespace) -> int:
    """``durable queues``: what each queue holds (the view durable.queue_depths)."""
    depths = (await app.capacity()).queues
    if not depths:
        print("no run pending or running")
        return 0
    print(f"{'queue':<20} {'pending':>8} {'scheduled':>10} {'running':>8}  oldest pending")
    for depth in depths:
        age = depth.oldest_pending_age
        oldest = "" if age is None else f"{age.total_seconds():.1f} s"
        name = depth.queue or "(undeclared)"
        print(
            f"{name:<20} {depth.pending:>8,} {depth.scheduled:>10,} {depth.running:>8,}  {oldest}"
        )
    return 0


async def migrate(app: App, args: argparse.Namespace) -> int:
    print(f"schema up to date in {redact(app.database_url or '')}")
    return 0


async def runs(app: App, args: argparse.Namespace) -> int:
    if args.runs_command == "list":
        where = RunFilter(function=args.function, tags=dict(args.tag) or None)
        for info in await app.list_runs(where, status=args.status, limit=args.limit):
            print(_run_line(info))
        return 0
    if args.runs_command == "retry" and args.run_id is None:
        return await _retry_many(app, args)
    if args.runs_command == "retry" and (args.status or args.function or args.since):
        raise DurableError("give a RUN_ID or --status (with --function, --since), not both")
    handle = app.get_run(args.run_id)  # InvalidInput when the text is not a UUID
    run_id = handle.run_id
    if args.runs_command == "resume":
        if await app.resume_run(run_id):  # RunNotFound for an unknown id
            print(f"run {run_id} resumed")
            return 0
        info = await handle.info()
        print(f"run {run_id} is not paused (it is {info.status})", file=sys.stderr)
        return 1
    if args.runs_command == "export":
        return await _export(handle, args.output)
    if args.runs_command == "cancel":
        return await _cancel(app, run_id, args.reason)
    if args.runs_command == "fork":
        return await _fork(handle, args)
    if args.runs_command == "retry":
        retried = await app.retry_run(run_id)
        print(f"run {run_id} retried as run {retried.run_id}")
        return 0
    return await _show(app, handle)


async def _fork(handle: RunHandle[Any], args: argparse.Namespace) -> int:
    new_input = (
        KEEP_INPUT
        if args.input is None
        else _json_argument(await asyncio.to_thread(_read_payload, args.input), "--input")
    )
    forked = await handle.fork(
        from_step=args.from_step, from_position=args.from_position, input=new_input
    )
    print(f"run {handle.run_id} forked as run {forked.run_id}")
    return 0


async def _retry_many(app: App, args: argparse.Namespace) -> int:
    """``durable runs retry --status S``: the count, then (unless --dry-run) each retry. A run
    already retried (or forked) is left out, so running the command again retries only what
    failed since, and the retries that failed in turn."""
    if args.status is None:
        raise DurableError("give a RUN_ID, or --status to retry every run of a status")
    selected = [
        info.run_id
        async for info in app.select_runs(
            [args.status], function=args.function, within=args.since, forked=False
        )
    ]
    scope = f" of {args.function!r}" if args.function else ""
    window = f" created in the last {_age_text(args.since)}" if args.since else ""
    print(f"{len(selected):,} {args.status} runs{scope}{window} not retried yet")
    if args.dry_run or not selected:
        return 0
    for run_id in selected:
        retried = await app.retry_run(run_id)
        print(f"run {run_id} retried as run {retried.run_id}")
    return 0


def _age_text(age: timedelta) -> str:
    seconds = int(age.total_seconds())
    for unit, size in (("d", 86_400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


async def versions(app: App, args: argparse.Namespace) -> int:
    """``durable versions``: per function, its runs by the version they started on."""
    current = (
        {name: spec.version for name, spec in load_app(args.app).functions.items()}
        if args.app
        else {}
    )
    counts = await app.versions()
    if not counts:
        print("no runs")
        return 0
    table: dict[str, dict[str | None, dict[str, int]]] = {}
    for row in counts:
        table.setdefault(row.function, {}).setdefault(row.version, {})[row.status] = row.runs
    retire: list[str] = []
    for function, by_version in table.items():
        print(function)
        for version, statuses in by_version.items():
            in_flight = {s: n for s, n in statuses.items() if s in UNFINISHED}
            ended = sum(n for s, n in statuses.items() if s not in UNFINISHED)
            label = "not started" if version is None else version
            mark = (
                "  (this code)" if version is not None and current.get(function) == version else ""
            )
            flying = ", ".join(f"{n:,} {s}" for s, n in in_flight.items()) or "none"
            print(f"  {label:<14}{mark:<13} in flight: {flying}; finished: {ended:,}")
            if version is not None and not in_flight and current.get(function) != version:
                retire.append(f"{function} {version}")
    if retire:
        print("no unfinished run started on: " + ", ".join(retire) + " (safe to retire)")
    return 0


_CANCEL_OUTCOMES = {
    "cancelled": "cancelled",
    "requested": "is running: its worker is cancelling it",
    "finished": "had already finished; nothing to cancel",
}


async def _cancel(app: App, run_id: uuid.UUID, reason: str) -> int:
    outcome = await app.cancel_run(run_id, reason)
    if outcome == "not_found":
        print(f"no run with id {run_id}", file=sys.stderr)
        return 1
    print(f"run {run_id} {_CANCEL_OUTCOMES[outcome]}")
    return 0


async def _show(app: App, handle: RunHandle[Any]) -> int:
    run_id = handle.run_id
    info = await handle.info()
    print(_run_line(info))
    _print_flow(info)
    if info.versions:
        attempts = ", ".join(dict.fromkeys(info.versions))
        pinned = " (pinned: only workers of its first version claim it)" if info.pinned else ""
        print(f"  versions: {attempts}{pinned}")
    if info.forked_from is not None:
        point = f"position {info.fork_position}" if info.fork_position else "its end"
        print(f"  forked from: run {info.forked_from}, its journal up to {point}")
    print(f"  input:   {json.dumps(info.input)}")
    if info.status == "completed":
        print(f"  result:  {json.dumps(info.result)}")
    if info.error is not None:
        print(f"  error:   {info.error.type}: {info.error.message}")
    if info.status == "paused":
        print(
            f"  paused: a worker of another version of the code tries it again when it starts;"
            f" or `durable runs resume {run_id}`"
        )
    print("  journal:")
    for entry in await handle.journal():
        outcome = (
            f"failed {entry.error.get('type')}: {entry.error.get('message')}"
            if entry.error
            else json.dumps(entry.value)
        )
        print(
            f"    {entry.created_at:%Y-%m-%d %H:%M:%S.%f}  #{entry.position:<6} "
            f"{entry.kind:<6} {entry.name:<20} {outcome}  (attempt {entry.attempt})"
        )
    for wait in await handle.waits():
        if wait.name == "durable.child":
            print(f"    waiting at #{wait.position}: child run {wait.key}")
            continue
        deadline = wait.timeout_at.isoformat() if wait.timeout_at else "no timeout"
        print(
            f"    waiting at #{wait.position}: event {wait.name!r} key {wait.key!r} "
            f"until {deadline}"
        )
    children = await handle.children()
    if children:
        print(f"  children ({len(children)}):")
        for child in children:
            print(f"    {_run_line(child)}")
    return 0


async def schedules(app: App, args: argparse.Namespace) -> int:
    rows = await app.list_schedules()
    if not rows:
        print("no schedules")
    for row in rows:
        last = (
            f"last {row.last_tick:%Y-%m-%d %H:%M:%S} run {row.last_run_id}"
            if row.last_tick
            else "never fired"
        )
        print(
            f"{row.name}  {row.cron!r} {row.timezone}  {row.function}  "
            f"next {row.next_tick:%Y-%m-%d %H:%M:%S%z}  {last}"
        )
    return 0


def _print_flow(info: RunInfo) -> None:
    """The run's links and limits, those it has."""
    lines = [
        ("parent", info.parent_id),
        ("priority", info.priority or None),
        ("concurrency key", info.concurrency_key),
        ("deadline", info.deadline_at and info.deadline_at.isoformat()),
        ("start expires", info.expires_at and info.expires_at.isoformat()),
        ("cancel requested", "its worker is stopping it" if info.cancel_requested else None),
    ]
    for label, value in lines:
        if value is not None:
            print(f"  {label}: {value}")


async def _export(handle: RunHandle[Any], output: str | None) -> int:
    from durable.testing import RecordedRun

    text = (await RecordedRun.from_handle(handle)).to_json()
    if output is None:
        print(text)
    else:
        await asyncio.to_thread(Path(output).write_text, text + "\n", encoding="utf-8")
        print(f"run {handle.run_id} written to {output}", file=sys.stderr)
    return 0


def _run_line(info: RunInfo) -> str:
    return (
        f"{info.run_id}  {info.status:<9}  {info.function}  attempt {info.attempt}  "
        f"created {info.created_at:%Y-%m-%d %H:%M:%S}"
        + "".join(f"  {name}={value}" for name, value in info.tags.items())
    )


async def events(app: App, args: argparse.Namespace) -> int:
    payload = _json_argument(await asyncio.to_thread(_read_payload, args.payload), "--payload")
    event_id = await app.send_event(args.name, payload, key=args.key)
    print(f"event {event_id} sent: {args.name} key={args.key!r}")
    return 0


def _read_payload(text: str) -> str:
    """The text of ``--payload`` or ``--input``: as given, from ``@FILE``, or from standard
    input (``-``)."""
    try:
        if text == "-":
            return sys.stdin.buffer.read().decode("utf-8", errors="surrogateescape")
        if text.startswith("@"):
            return Path(text[1:]).read_bytes().decode("utf-8", errors="surrogateescape")
    except OSError as exc:
        raise DurableError(f"{text}: cannot read it: {exc.strerror or exc}") from exc
    return text


def _json_argument(text: str, option: str) -> Any:
    """Parsed JSON, refusing NaN and Infinity (not JSON, though Python's parser takes them)."""

    def refuse(constant: str) -> Any:
        raise DurableError(f"{option} is not valid JSON: {constant} is not a JSON value")

    try:
        return json.loads(text, parse_constant=refuse)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise DurableError(f"{option} is not valid JSON: {exc}") from exc
