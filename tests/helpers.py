"""Helpers shared by the tests."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from typing import Any

import asyncpg

import durable
from engine import Claim

FAST = {
    "lease": timedelta(seconds=2),
    "poll_interval": timedelta(milliseconds=200),
}


def make_app(database_url: str, **options: Any) -> durable.App:
    return durable.App(database_url, **{**FAST, **options})


@contextlib.asynccontextmanager
async def running_worker(app: durable.App, concurrency: int = 8) -> AsyncIterator[None]:
    """Run a worker of ``app`` in the background for the duration of the block."""
    task = asyncio.create_task(app.run_worker(concurrency=concurrency))
    try:
        yield
    finally:
        app.stop_workers()
        await asyncio.wait_for(task, 30)


def claims_seen(app: durable.App) -> dict[uuid.UUID, list[Claim]]:
    """Every claim the app's workers take from the queue from now on, by run (a run an eager
    start claimed is not among them)."""
    store = app._connection.store  # a test that calls this looks inside on purpose
    seen: dict[uuid.UUID, list[Claim]] = {}
    original = store.claim_due

    async def claim_due(*args: Any, **kwargs: Any) -> Any:
        claims, due, now = await original(*args, **kwargs)
        for claim in claims:
            seen.setdefault(claim.run_id, []).append(claim)
        return claims, due, now

    store.claim_due = claim_due  # type: ignore[method-assign]
    return seen


async def until(predicate: Callable[[], Any], timeout: float = 20.0, what: str = "") -> Any:
    """Wait until ``predicate()`` is truthy (it may be async); returns its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        await asyncio.sleep(0.02)


async def status_is(handle: durable.RunHandle[Any], status: str) -> bool:
    return await handle.status() == status


async def attempt_at_least(handle: durable.RunHandle[Any], attempt: int) -> bool:
    return (await handle.info()).attempt >= attempt


@contextlib.asynccontextmanager
async def serving(site: Any) -> AsyncIterator[str]:
    """An ASGI application served by uvicorn on a free port of 127.0.0.1, for the block; yields
    its URL. (httpx's in-process transport reads a whole response before returning it, so a
    stream, or a browser, needs a real server.)"""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(site, log_level="warning", lifespan="off", timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        await until(lambda: server.started, what="uvicorn started")
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        await task
        sock.close()


@contextlib.asynccontextmanager
async def hearing(database_url: str, channel: str) -> AsyncIterator[Heard]:
    """What is notified on ``channel`` while the block runs, heard by a connection of its own."""
    conn = await asyncpg.connect(database_url)
    heard = Heard(conn, channel)
    await conn.add_listener(channel, heard.on_notify)
    try:
        yield heard
    finally:
        await conn.close()


class Heard:
    """The payloads notified on a channel so far (``hearing``)."""

    def __init__(self, conn: asyncpg.Connection[Any], channel: str) -> None:
        self.conn = conn
        self.channel = channel
        self.payloads: list[str] = []
        self._marker = asyncio.Event()

    def on_notify(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        self.payloads.append(payload)
        if payload == "marker":
            self._marker.set()

    async def everything_sent(self) -> list[str]:
        """Every payload sent before now, once all have arrived: notifications arrive in commit
        order, so those sent before a marker notified now are here once the marker is (which
        is left out, and not heard again)."""
        self._marker.clear()
        await self.conn.execute("SELECT pg_notify($1, 'marker')", self.channel)
        await asyncio.wait_for(self._marker.wait(), 20)
        self.payloads.remove("marker")
        return list(self.payloads)
