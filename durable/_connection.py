"""``Connection``: an app's way to its database: the URL (or the embedded server, kept alive),
the pool, the schema brought up to date, the declared rate limits written, and one LISTEN
connection for the notifications clients and workers wait on (and one more per watch of
runs: the dashboard's)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING

from durable._settings import Settings
from engine import Listener, PostgresStore, RunRow, _urls
from engine.errors import (
    ConfigurationError,
    DatabaseUnavailable,
    DurableError,
    EmbeddedPostgresError,
)

if TYPE_CHECKING:
    from durable._embedded import Server

log = logging.getLogger("durable._app")
WATCH_RENEWAL = timedelta(seconds=20)  # well within durable.notify_journal's minute
RESULT_POLL = 1.0  # seconds a result waiter waits for an announcement before reading again
RESULT_GRACE = 0.05  # the same, just after this process began to await ends (read_awaited)


class Connection:
    """Opened by ``open`` (``async with app``), closed by ``close``. ``on_lost`` is called
    when the embedded server died and could not be restarted."""

    def __init__(self, settings: Settings, on_lost: Callable[[], None]) -> None:
        self.settings = settings
        self._on_lost = on_lost
        self._store: PostgresStore | None = None
        self._listener: Listener | None = None
        self._watchers: set[Callable[[], Awaitable[None]]] = set()  # App.watch_runs, stops
        # This process in durable.result_waiters (read_awaited): its id, when it was last recorded
        # there and since when without a lapse (loop time; None: not recorded).
        self._result_waiter = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4()}"
        self._result_waiter_seen: float | None = None
        self._result_waiter_since = 0.0
        # Watches the embedded server, when the app uses it (see _embedded.keep).
        self._keeper: asyncio.Task[None] | None = None
        self.embedded_lost: EmbeddedPostgresError | None = None

    @property
    def is_open(self) -> bool:
        return self._store is not None

    @property
    def store(self) -> PostgresStore:
        if self._store is None:
            raise ConfigurationError(
                "the app is not connected: use `async with app:` or `await app.connect()`"
            )
        return self._store

    @property
    def listener(self) -> Listener:
        if self._listener is None:
            raise ConfigurationError(
                "the app is not connected: use `async with app:` or `await app.connect()`"
            )
        return self._listener

    @property
    def dsn(self) -> str | None:
        """The URL in use once open (the embedded server's when none was given)."""
        return self._store.dsn if self._store else self.settings.database_url

    async def open(
        self,
        rate_limits: Mapping[str, tuple[int, timedelta]],
        subscriptions: Mapping[str, Callable[[str], None]],
        retentions: Sequence[timedelta | None] = (),
    ) -> None:
        """Connect (starting the embedded server if no URL is set), apply the migrations,
        write ``rate_limits``, open the segments of ``retentions`` (the app's retention classes:
        a start then never has to) and start listening, with ``subscriptions`` (channel → callback)
        subscribed before the first notification can arrive."""
        if self._store is not None:
            return
        pooled, listen_dsn = resolve_listening(self.settings)  # before a server is started
        dsn = await self._resolve_url()
        try:
            store = await PostgresStore.connect(
                dsn,
                max_size=self.settings.pool_size,
                connect_timeout=self.settings.connect_timeout,
                pooled=pooled,
                listen_dsn=listen_dsn,
            )
        except BaseException:
            await self._stop_keeper()
            raise
        try:
            await store.migrate()
            await declare_rate_limits(store, rate_limits)
            await store.open_segments(retentions)
            listener = self._listener_of(store)
            for channel, callback in subscriptions.items():
                listener.subscribe(channel, callback)
            await self._start(listener, store)
        except BaseException:
            await store.close()
            await self._stop_keeper()
            raise
        self._store, self._listener = store, listener

    async def watch(
        self, channels: Sequence[str], on_notify: Callable[[str], None]
    ) -> Callable[[], Awaitable[None]]:
        """LISTEN on ``channels`` on a connection of its own, until the returned coroutine
        function is called or this connection closes. Meanwhile this process is recorded in
        durable.watchers (renewed every WATCH_RENEWAL), which makes journal appends announce
        themselves on durable_journal: nobody pays for that while nobody watches."""
        store = self.store
        watcher = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4()}"
        await store.touch_watcher(watcher)
        listener = self._listener_of(store, channels)
        for channel in channels:
            listener.subscribe(channel, on_notify)
        await self._start(listener, store)

        async def renew() -> None:
            while True:
                await asyncio.sleep(WATCH_RENEWAL.total_seconds())
                with contextlib.suppress(DatabaseUnavailable):
                    await store.touch_watcher(watcher)

        renewal = asyncio.create_task(renew(), name="durable-watch-renewal")

        async def stop() -> None:
            self._watchers.discard(stop)
            renewal.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewal
            await listener.close()
            with contextlib.suppress(DurableError):
                await store.end_watcher(watcher)

        self._watchers.add(stop)
        return stop

    async def read_awaited(self, run_id: uuid.UUID) -> tuple[RunRow | None, float]:
        """Read run ``run_id`` for a caller that will wait for its end unless the read shows it,
        recording this process in durable.result_waiters by the same statement (again once
        WATCH_RENEWAL has passed), which makes runs' ends announce themselves on durable_done.
        Returns the row and how long the caller may wait for the announcement before it reads
        again: RESULT_POLL, or RESULT_GRACE while the record is less than RESULT_POLL old (an
        end committed then may have looked for waiters before it was there); RESULT_POLL when
        nothing listens here (a pooler, no listen URL)."""
        store = self.store
        if self._listener is None or self._listener.polling:
            return await store.get_run(run_id), RESULT_POLL
        loop = asyncio.get_running_loop()
        now = loop.time()
        seen = self._result_waiter_seen
        if seen is None or now - seen >= WATCH_RENEWAL.total_seconds():
            row = await store.get_run(run_id, waiter=self._result_waiter)
            if seen is None or now - seen >= 2 * WATCH_RENEWAL.total_seconds():
                self._result_waiter_since = loop.time()  # the record may have lapsed meanwhile
            self._result_waiter_seen = now
        else:
            row = await store.get_run(run_id)
        fresh = loop.time() - self._result_waiter_since < RESULT_POLL
        return row, RESULT_GRACE if fresh else RESULT_POLL

    async def _start(self, listener: Listener, store: PostgresStore) -> None:
        """Start ``listener`` within connect_timeout, as the pool was opened: a LISTEN URL of
        its own may be out of reach while the database URL is not."""
        timeout = self.settings.connect_timeout
        try:
            await asyncio.wait_for(listener.start(), timeout)
        except TimeoutError:
            await listener.close()
            raise DatabaseUnavailable(
                f"no LISTEN connection to {_urls.redact(store.listen_dsn or '')} within {timeout}s"
            ) from None

    def _listener_of(self, store: PostgresStore, channels: Sequence[str] | None = None) -> Listener:
        """LISTEN where the store can, else poll every poll_interval (a pooler, no listen_url);
        on ``channels``, or the engine's."""
        listen = None if store.listen_dsn is None else store.listen
        poll = self.settings.poll_interval.total_seconds()
        if channels is None:
            return Listener(listen, poll_interval=poll)
        return Listener(listen, channels, poll_interval=poll)

    async def close(self) -> None:
        await self._stop_keeper()  # first: no restart of the server may race the shutdown
        for stop in list(self._watchers):
            await stop()
        if self._listener is not None:
            await self._listener.close()
            self._listener = None
        if self._store is not None:
            if self._result_waiter_seen is not None:
                self._result_waiter_seen = None
                with contextlib.suppress(DurableError):
                    await self._store.end_result_waiter(self._result_waiter)
            await self._store.close()
            self._store = None

    async def _resolve_url(self) -> str:
        url, server = await resolve_url(self.settings)
        if server is not None:
            # It is ours: should it die (a kill -9, an OOM kill), say so once and restart it.
            from durable import _embedded

            self._keeper = asyncio.create_task(
                _embedded.keep(server), name="durable-embedded-keeper"
            )
            self._keeper.add_done_callback(self._keeper_done)
        return url

    def _keeper_done(self, task: asyncio.Task[None]) -> None:
        error = None if task.cancelled() else task.exception()
        if isinstance(error, EmbeddedPostgresError):
            self.embedded_lost = error
            log.error("%s", error)
            self._on_lost()

    async def _stop_keeper(self) -> None:
        keeper, self._keeper = self._keeper, None
        if keeper is not None:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError, EmbeddedPostgresError):
                await keeper


async def declare_rate_limits(
    store: PostgresStore, rate_limits: Mapping[str, tuple[int, timedelta]]
) -> None:
    for name, (limit, period) in rate_limits.items():
        await store.define_rate_limit(name, limit, period)


async def resolve_url(settings: Settings) -> tuple[str, Server | None]:
    """The URL of an app's database: its ``database_url``, else ``$DURABLE_DATABASE_URL``, else
    the embedded server's (started if need be: it is returned too)."""
    if settings.database_url == "":
        raise ConfigurationError(
            "database_url is empty: pass a postgresql:// URL, or None for "
            "$DURABLE_DATABASE_URL or the embedded PostgreSQL"
        )
    url = settings.database_url or os.environ.get("DURABLE_DATABASE_URL")
    if url:
        return _urls.check(url), None
    from durable import _embedded

    server = await asyncio.to_thread(_embedded.acquire)
    _embedded.exit_on_sigterm()
    log.info("using embedded PostgreSQL in %s", server.data_dir)
    return server.dsn, server


_YES, _NO = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


def resolve_listening(settings: Settings) -> tuple[bool, str | None]:
    """Whether an app's database URL goes through a transaction pooler, and the direct URL to
    LISTEN on: ``listen_url``, else ``$DURABLE_LISTEN_URL``; ``pooled``, else
    ``$DURABLE_POOLED``, else whether a listen URL was given (a LISTEN URL of its own is
    what an app behind a pooler needs, and nothing else does)."""
    listen_url = settings.listen_url or os.environ.get("DURABLE_LISTEN_URL") or None
    if listen_url is not None:
        _urls.check(listen_url)
    pooled = settings.pooled
    if pooled is None:
        flag = os.environ.get("DURABLE_POOLED", "").strip().lower()
        if flag not in _YES + _NO:
            raise ConfigurationError(
                f"DURABLE_POOLED must be 1 or 0 (true or false), got {flag[:20]!r}"
            )
        pooled = flag in _YES or listen_url is not None
    return pooled, listen_url


async def reading_store(settings: Settings) -> PostgresStore:
    """A small pool on an app's database that changes nothing there: no migrations, no
    declarations written (``durable check`` reads runs and journals only)."""
    url, _server = await resolve_url(settings)
    pooled, _listen = resolve_listening(settings)
    return await PostgresStore.connect(
        url, max_size=2, connect_timeout=settings.connect_timeout, pooled=pooled
    )
