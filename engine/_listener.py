"""One LISTEN connection per process, kept alive across database restarts; or none, and a poll.

Notifications are only a fast path: after every reconnect each subscriber is called as if a
notification had arrived, so whatever was sent while the connection was down is looked up.
Without a way to LISTEN (an app behind a transaction pooler, given no direct URL), every
subscriber is called so every ``poll_interval`` instead, and nothing waits for a notification
that cannot come.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable, Sequence

from engine.errors import DatabaseUnavailable

log = logging.getLogger(__name__)

CHANNELS = ("durable_work", "durable_done", "durable_cancel")

Callback = Callable[[str], None]
# The store's ``listen``: LISTEN on channels, calling on_notify(channel, payload) and, when the
# connection ends, on_lost(); returns the function that closes it.
Listen = Callable[
    [Sequence[str], Callable[[str, str], None], Callable[[], None]],
    Awaitable[Callable[[], None]],
]


class Listener:
    """LISTEN on ``channels`` (the engine's, by default; the dashboard adds durable_journal,
    which workers need not hear). With ``listen=None``, call every subscriber every
    ``poll_interval`` seconds, as after a reconnect."""

    def __init__(
        self,
        listen: Listen | None,
        channels: Sequence[str] = CHANNELS,
        *,
        poll_interval: float = 2.0,
    ) -> None:
        self._listen = listen
        self._poll_interval = poll_interval
        self._channels = tuple(channels)
        self._subscribers: dict[str, set[Callback]] = {c: set() for c in self._channels}
        self._task: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._rng = random.Random()

    def subscribe(self, channel: str, callback: Callback) -> Callable[[], None]:
        """Call ``callback(payload)`` on every notification of ``channel``; returns an
        unsubscribe function."""
        self._subscribers[channel].add(callback)
        return lambda: self._subscribers[channel].discard(callback)

    @property
    def polling(self) -> bool:
        """Whether subscribers are called every poll interval (there is nowhere to LISTEN)."""
        return self._listen is None

    async def start(self) -> None:
        """Start listening (or polling); returns once the first LISTEN connection is up. A
        LISTEN that cannot work (a malformed URL, a refused login) is raised here, not
        retried."""
        if self._task is None:
            run = self._poll() if self._listen is None else self._run(self._listen)
            self._task = asyncio.get_running_loop().create_task(run)
        connected = asyncio.ensure_future(self._connected.wait())
        try:
            await asyncio.wait({connected, self._task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            connected.cancel()
        if not self._connected.is_set():
            task, self._task = self._task, None
            task.result()  # raises what ended it

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def _dispatch(self, channel: str, payload: str) -> None:
        for callback in list(self._subscribers.get(channel, ())):
            callback(payload)

    def _notify_all(self) -> None:
        for callbacks in self._subscribers.values():
            for callback in list(callbacks):
                callback("")

    async def _poll(self) -> None:
        self._connected.set()
        while True:
            await asyncio.sleep(self._poll_interval)
            self._notify_all()

    async def _run(self, listen: Listen) -> None:
        delay = 0.1
        first = True
        while True:
            lost = asyncio.Event()
            try:
                close = await listen(self._channels, self._dispatch, lost.set)
            except DatabaseUnavailable as exc:
                log.warning("LISTEN connection failed (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay * (0.5 + self._rng.random()))
                delay = min(delay * 2, 5.0)
                continue
            try:
                delay = 0.1
                self._connected.set()
                if not first:
                    self._notify_all()
                first = False
                await lost.wait()
                log.warning("LISTEN connection lost; reconnecting")
            finally:
                close()
            self._notify_all()
