"""The ``durable`` command line.

::

    durable worker module:app [--concurrency N] [--queue Q ...] [--metrics-port 9464]
                              [--loop auto|asyncio|uvloop]
                                                   execute runs of the app's functions
    durable migrate                                apply the schema migrations
    durable runs list [--status S] [--function F] [--tag NAME=VALUE] [--limit N]
                                                   recent runs, newest first
    durable runs show RUN_ID                       a run, its parent and children, its journal
    durable runs cancel RUN_ID [--reason TEXT]     cancel a run and its children
    durable runs resume RUN_ID                     resume a run paused by non-determinism
    durable runs fork RUN_ID (--from-step S | --from-position P) [--input JSON|@FILE|-]
                                                   a new run reusing the journal up to a point
    durable runs retry RUN_ID                      a failed run again, from its failure point
    durable runs retry --status S [--function F] [--since 2h] [--dry-run]
                                                   every such run again (prints the count first)
    durable runs export RUN_ID [-o FILE]           a run and its journal as JSON (for replay)
    durable events send NAME [--key K] [--payload JSON|@FILE|-]
    durable schedules list                         cron schedules and their next ticks
    durable check module:app [--include-completed N]
                                                   replay unfinished runs on the code as it is
    durable versions [module:app]                  runs in flight by version of the code
    durable queues                                 queue depths: the autoscaling signal
    durable retention run|status                   drop what retention removes now; each
                                                   partition, its size and what keeps it
    durable dashboard [--host 127.0.0.1] [--port 8484] [--token T] [--read-only]
                                                   the web dashboard
    durable db start|stop|status|url               the embedded PostgreSQL

Commands that need the database use --database-url, else $DURABLE_DATABASE_URL, else the
embedded server. A command gives up on an unreachable database after --connect-timeout
seconds (10); a worker keeps trying unless it is given one. Every error is one line on
standard error: exit status 2 for a usage or configuration error, 1 when the operation failed
(no such run, a run that is not paused) or ``durable check`` found runs that would fail.

Over 400 lines: the parser of every command, with its help text, is here in one place; what the
commands do is in ``durable._commands``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from datetime import timedelta
from typing import Any, NoReturn

from durable import _commands, _retention
from durable._app import MAX_LISTED, App
from durable._commands import load_app
from engine.errors import DurableError, RunNotFound

log = logging.getLogger("durable.worker")

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
COMMAND_CONNECT_TIMEOUT = 10.0


class _Parser(argparse.ArgumentParser):
    """argparse, with every usage error on one line."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


def one_line(text: str) -> str:
    """``text`` as one printable line: its lines joined, other unprintable characters (a lone
    surrogate from bytes that are not UTF-8, a control character) escaped."""
    joined = " ".join(part.strip() for part in text.splitlines() if part.strip())
    return "".join(
        c if c.isprintable() else c.encode("unicode_escape", "backslashreplace").decode()
        for c in joined
    )


def _whole(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: an integer from ``low`` to ``high``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is not from {low} to {high}")
        return value

    return parse


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value <= 86_400:
        raise argparse.ArgumentTypeError(f"{text} is not from 0 to 86400 seconds")
    return value


def _tag(text: str) -> tuple[str, str]:
    """An argparse type: a tag as NAME=VALUE."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"{text!r} is not a tag as NAME=VALUE")
    return name, value


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400}


def _age(text: str) -> timedelta:
    """An argparse type: a duration such as 90s, 30m, 2h or 7d."""
    number, unit = text[:-1], text[-1:]
    if unit not in _UNITS or not number.isdigit() or not 0 < int(number) <= 100_000:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 90s, 30m, 2h or 7d")
    return timedelta(seconds=int(number) * _UNITS[unit])


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="durable", description="Durable execution on Postgres.")
    parser.add_argument(
        "--database-url",
        help="PostgreSQL URL (default: $DURABLE_DATABASE_URL, else the embedded server)",
    )
    parser.add_argument(
        "--connect-timeout",
        type=_seconds,
        metavar="SECONDS",
        help="give up on an unreachable database after this long (default: 10 for commands; "
        "a worker keeps trying)",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    worker = commands.add_parser("worker", help="execute runs of an app's functions")
    worker.add_argument("app", help="the app to serve, as module:attribute")
    worker.add_argument(
        "--concurrency",
        type=_whole(1, 100_000),
        default=10,
        help="runs executing at once (default 10)",
    )
    worker.add_argument(
        "--queue",
        action="append",
        dest="queues",
        metavar="QUEUE",
        help="serve this queue (repeat for more; default: the default queue)",
    )
    worker.add_argument(
        "--shutdown-grace",
        type=_seconds,
        default=10.0,
        metavar="SECONDS",
        help="on SIGTERM or SIGINT, how long runs in flight may finish before they are handed "
        "back (default 10)",
    )
    worker.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS, default="INFO")
    worker.add_argument(
        "--metrics-port",
        type=_whole(1, 65_535),
        metavar="PORT",
        help="serve Prometheus metrics on this port (needs: pip install 'durable[metrics]')",
    )
    worker.add_argument(
        "--metrics-host", default="127.0.0.1", help="the address of the metrics endpoint"
    )
    worker.add_argument(
        "--loop",
        choices=["auto", "asyncio", "uvloop"],
        default="auto",
        help="the event loop: uvloop's when installed (pip install 'durable[uvloop]'), else "
        "asyncio's (default: auto)",
    )

    commands.add_parser("migrate", help="apply the schema migrations")

    runs = commands.add_parser("runs", help="inspect and manage runs")
    runs_commands = runs.add_subparsers(dest="runs_command", required=True)
    listing = runs_commands.add_parser("list", help="recent runs, newest first")
    listing.add_argument(
        "--status",
        choices=["pending", "running", "suspended", "paused", "completed", "failed", "cancelled"],
    )
    listing.add_argument("--limit", type=_whole(1, MAX_LISTED), default=50)
    listing.add_argument("--function", help="only runs of this function")
    listing.add_argument(
        "--tag",
        action="append",
        type=_tag,
        default=[],
        metavar="NAME=VALUE",
        help="only runs carrying this tag (repeat for runs carrying all of them)",
    )
    show = runs_commands.add_parser("show", help="a run and its journal as a timeline")
    show.add_argument("run_id")
    cancel = runs_commands.add_parser("cancel", help="cancel a run and its child runs")
    cancel.add_argument("run_id")
    cancel.add_argument("--reason", default="cancelled by an operator")
    resume = runs_commands.add_parser("resume", help="resume a paused run")
    resume.add_argument("run_id")
    fork = runs_commands.add_parser(
        "fork", help="a new run reusing a run's journal up to a point, the rest live"
    )
    fork.add_argument("run_id")
    point = fork.add_mutually_exclusive_group(required=True)
    point.add_argument("--from-step", metavar="STEP", help="run this step and all after it")
    point.add_argument(
        "--from-position", metavar="POSITION", help="run from this journal position on"
    )
    fork.add_argument(
        "--input", help="new input as JSON (@FILE reads a file, - standard input; default: kept)"
    )
    retry = runs_commands.add_parser(
        "retry",
        help="a failed, cancelled or timed-out run again from its failure point (as a new run)",
    )
    retry.add_argument("run_id", nargs="?", help="the run (or select runs with --status)")
    retry.add_argument(
        "--status",
        choices=["failed", "cancelled"],
        help="retry every run of this status (timed-out runs are failed ones)",
    )
    retry.add_argument("--function", help="with --status: only runs of this function")
    retry.add_argument(
        "--since",
        type=_age,
        metavar="AGE",
        help="with --status: only runs created within this long (30m, 2h, 7d)",
    )
    retry.add_argument(
        "--dry-run", action="store_true", help="with --status: print the count, retry nothing"
    )
    export = runs_commands.add_parser(
        "export", help="a run and its journal as JSON, for durable.testing.replay"
    )
    export.add_argument("run_id")
    export.add_argument("-o", "--output", help="write to this file (default: standard output)")

    events = commands.add_parser("events", help="send events")
    events_commands = events.add_subparsers(dest="events_command", required=True)
    send = events_commands.add_parser("send", help="send an event")
    send.add_argument("name")
    send.add_argument("--key")
    send.add_argument(
        "--payload",
        default="null",
        help="JSON payload; @FILE reads it from a file, - from standard input",
    )

    schedules = commands.add_parser("schedules", help="inspect cron schedules")
    schedules_commands = schedules.add_subparsers(dest="schedules_command", required=True)
    schedules_commands.add_parser("list", help="every schedule, its next tick and last run")

    check = commands.add_parser(
        "check",
        help="replay every unfinished run on the code as it is now; exit 1 if any would fail",
    )
    check.add_argument("app", help="the app whose code to check, as module:attribute")
    check.add_argument(
        "--include-completed",
        type=_whole(0, 1_000_000),
        default=0,
        metavar="N",
        help="replay the N runs that completed last too (their results must not change)",
    )
    commands.add_parser(
        "queues", help="each queue's due, scheduled and running runs and its oldest due run"
    )
    retention = commands.add_parser("retention", help="the partitions retention drops")
    retention_commands = retention.add_subparsers(dest="retention_command", required=True)
    retention_commands.add_parser(
        "run", help="a retention pass now, as the workers make every cleanup_interval"
    )
    retention_commands.add_parser(
        "status", help="each segment, its size, when it is due and what it would keep"
    )
    versions = commands.add_parser(
        "versions", help="runs by function and version of the code, and versions to retire"
    )
    versions.add_argument(
        "app", nargs="?", help="mark this app's versions (module:attribute) as the current code"
    )

    dashboard = commands.add_parser(
        "dashboard", help="serve the web dashboard (needs: pip install 'durable[dashboard]')"
    )
    dashboard.add_argument("--host", default="127.0.0.1", help="the address to listen on")
    dashboard.add_argument("--port", type=_whole(1, 65_535), default=8484)
    dashboard.add_argument(
        "--token",
        default=os.environ.get("DURABLE_DASHBOARD_TOKEN"),
        help="required of every request ($DURABLE_DASHBOARD_TOKEN); needed beyond 127.0.0.1",
    )
    dashboard.add_argument("--read-only", action="store_true", help="offer no action")

    db = commands.add_parser("db", help="the embedded PostgreSQL server")
    db.add_argument("action", choices=["start", "stop", "status", "url"])
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "worker":
            return _worker(args)
        if args.command == "db":
            return _commands.db(args.action)
        if args.command == "check":
            return asyncio.run(_commands.check(args, COMMAND_CONNECT_TIMEOUT))
        if args.command == "dashboard":
            return asyncio.run(_commands.dashboard(args, COMMAND_CONNECT_TIMEOUT))
        return asyncio.run(_with_app(args))
    except RunNotFound as exc:
        return _fail(exc, 1)
    except DurableError as exc:
        return _fail(exc, 2)
    except KeyboardInterrupt:
        return 130


def _fail(error: Exception, status: int) -> int:
    """Report ``error`` as one line on standard error; returns the exit status."""
    print(f"durable: {one_line(str(error))}", file=sys.stderr)
    return status


def _worker(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    app = load_app(args.app)
    app.configure(database_url=args.database_url, connect_timeout=args.connect_timeout)
    if args.metrics_port is not None:
        from durable._metrics_server import serve_prometheus

        serve_prometheus(args.metrics_host, args.metrics_port)

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        received: list[int] = []
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, _on_stop_signal, app, signum, received)
        try:
            await app.run_worker(
                concurrency=args.concurrency,
                queues=args.queues or ("default",),
                shutdown_grace=timedelta(seconds=args.shutdown_grace),
            )
        finally:
            await app.close()

    run, name = event_loop(args.loop)
    log.info("event loop: %s", name)
    run(serve())
    return 0


def event_loop(wanted: str) -> tuple[Callable[[Coroutine[Any, Any, None]], None], str]:
    """How ``durable worker`` runs its event loop, and its name: ``wanted`` is auto (uvloop's
    when it is installed, else asyncio's), asyncio or uvloop (a DurableError when missing).
    uvloop took a fifth to a third off the worker's CPU per step in W2 (benchmarks/RESULTS.md)."""
    if wanted != "asyncio":
        try:
            import uvloop
        except ImportError:
            if wanted == "uvloop":
                raise DurableError(
                    "--loop uvloop: uvloop is not installed (pip install 'durable[uvloop]')"
                ) from None
        else:
            return uvloop.run, "uvloop"
    return asyncio.run, "asyncio"


def _on_stop_signal(app: App, signum: int, received: list[int]) -> None:
    """The first SIGTERM or SIGINT stops the worker gracefully; a second one exits at once."""
    name = signal.Signals(signum).name
    received.append(signum)
    if len(received) == 1:
        log.info(
            "%s: stopping: no new runs are claimed, runs in flight may finish within the grace "
            "period, then are handed back (send it again to exit at once)",
            name,
        )
        app.stop_workers()
        return
    log.warning(
        "%s again: exiting at once; runs still executing here are resumed by another worker "
        "once their leases expire",
        name,
    )
    os._exit(128 + signum)


async def _with_app(args: argparse.Namespace) -> int:
    # A command's answer is its output or its one-line error; the retries behind it are not.
    logging.basicConfig(level=logging.ERROR, format="durable: %(message)s")
    timeout = args.connect_timeout or COMMAND_CONNECT_TIMEOUT
    async with App(args.database_url, connect_timeout=timeout) as app:
        handlers: dict[str, Callable[[App, argparse.Namespace], Awaitable[int]]] = {
            "migrate": _commands.migrate,
            "runs": _commands.runs,
            "events": _commands.events,
            "schedules": _commands.schedules,
            "versions": _commands.versions,
            "queues": _commands.queues,
            "retention": _retention.retention,
        }
        return await handlers[args.command](app, args)
