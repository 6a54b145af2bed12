"""Live pages: one LISTEN (``App.watch_runs``) per dashboard while a page is open on a run,
fanned out to the server-sent event streams of those pages. The browser keeps no polling loop:
a page is told that its run changed and fetches it again. With no page open the dashboard
stops watching (after IDLE), so journal appends stop announcing themselves."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from durable._app import App

KEEPALIVE = 15.0  # seconds between comments that keep proxies from closing an idle stream
IDLE = 30.0  # seconds without an open page before the dashboard stops watching


class Hub:
    def __init__(self) -> None:
        self._app: App | None = None
        self._pages: dict[uuid.UUID, set[asyncio.Event]] = {}
        self._stop: Callable[[], Awaitable[None]] | None = None
        self._lock = asyncio.Lock()
        self._idle: asyncio.Task[None] | None = None

    def attach(self, app: App) -> None:
        self._app = app

    async def close(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        await self._unwatch()

    async def _unwatch(self) -> None:
        async with self._lock:
            if self._stop is not None:
                await self._stop()
                self._stop = None

    async def _watching(self) -> None:
        async with self._lock:
            if self._stop is None:
                assert self._app is not None, "the hub is attached to an app first"
                self._stop = await self._app.watch_runs(self._changed)

    async def _stop_when_idle(self) -> None:
        await asyncio.sleep(IDLE)
        self._idle = None
        if not self._pages:
            await self._unwatch()

    def _changed(self, ids: str) -> None:
        if not ids:  # any run may have changed
            targets = [e for events in self._pages.values() for e in events]
        else:
            targets = []
            for text in ids.split(","):
                with contextlib.suppress(ValueError):
                    targets += self._pages.get(uuid.UUID(text), ())
        for event in targets:
            event.set()

    async def stream(self, run_id: uuid.UUID) -> AsyncIterator[str]:
        """Server-sent events for a page on ``run_id``: "change" whenever the run changed."""
        changed = asyncio.Event()
        self._pages.setdefault(run_id, set()).add(changed)
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        try:
            await self._watching()
            # The page fetches the run when the stream opens: nothing before it is missed.
            yield "retry: 2000\n\n"
            while True:
                try:
                    await asyncio.wait_for(changed.wait(), KEEPALIVE)
                except TimeoutError:
                    yield ": keepalive\n\n"
                    continue
                changed.clear()
                yield f"event: change\ndata: {run_id}\n\n"
        finally:
            pages = self._pages.get(run_id)
            if pages is not None:
                pages.discard(changed)
                if not pages:
                    del self._pages[run_id]
            if not self._pages and self._idle is None:
                self._idle = asyncio.create_task(self._stop_when_idle())
