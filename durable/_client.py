"""``Client``: what an app does with runs and events from outside a run (start, send, read,
cancel, resume), and the notifications that wake ``RunHandle.result``. It is also the source
a ``RunHandle`` asks (``durable._handle.RunSource``)."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from durable._connection import Connection
from durable._declarations import Declarations
from durable._handle import NO_TYPE, RunHandle, RunInfo
from durable._settings import json_or_invalid
from engine import (
    JournalEntry,
    NewRun,
    RunRow,
    ScheduleRow,
    WaitRow,
    _limits,
    current_carrier,
    new_run,
    validate_input,
)
from engine.errors import InvalidInput, RunNotFound

log = logging.getLogger("durable._app")

MAX_LISTED = 100_000
_MAX_REASON_BYTES = 4096

Target = Callable[..., Awaitable[Any]] | str


class Client:
    """Runs and events through an app's connection, with its declarations for validation."""

    def __init__(self, declarations: Declarations, connection: Connection) -> None:
        self._declarations = declarations
        self._connection = connection
        self._done_waiters: dict[uuid.UUID, set[Callable[[], None]]] = {}

    # -- starting -------------------------------------------------------------------------------

    async def start(
        self,
        fn: Target,
        input: Any,
        *,
        run_id: uuid.UUID | str | None,
        idempotency_key: str | None,
        connection: asyncpg.Connection[Any] | None,
        priority: int | None,
        delay: timedelta | None,
        start_at: datetime | None,
    ) -> RunHandle[Any]:
        store = self._connection.store
        new = self.new_run(
            fn,
            input,
            run_id=run_id,
            idempotency_key=idempotency_key,
            priority=priority,
            delay=delay,
            start_at=start_at,
        )
        if connection is not None:
            found, created = await store.start_run_on(connection, new)
        else:
            [(found, created)] = await store.start_runs([new])
        if not created:
            log.info("run %s already exists; returning it", found, extra={"run_id": str(found)})
        return RunHandle(self, found, self.return_type_of(new.function))

    async def start_many(
        self,
        fn: Target,
        inputs: Iterable[Any],
        *,
        idempotency_keys: Sequence[str | None] | None,
        priority: int | None,
        connection: asyncpg.Connection[Any] | None,
    ) -> list[RunHandle[Any]]:
        store = self._connection.store
        values = list(inputs)
        keys = list(idempotency_keys) if idempotency_keys is not None else [None] * len(values)
        if len(keys) != len(values):
            raise InvalidInput(f"{len(values)} inputs but {len(keys)} idempotency keys")
        given = [k for k in keys if k is not None]
        if len(set(given)) != len(given):
            raise InvalidInput("idempotency keys must be distinct within one start_many call")
        new = [
            self.new_run(fn, v, idempotency_key=k, priority=priority)
            for v, k in zip(values, keys, strict=True)
        ]
        if connection is not None:
            started = await store.start_runs_on(connection, new)
        else:
            started = await store.start_runs(new)
        return_type = self.return_type_of(new[0].function) if new else NO_TYPE
        return [RunHandle(self, found, return_type) for found, _created in started]

    def new_run(
        self,
        fn: Target,
        input: Any,
        *,
        run_id: uuid.UUID | str | None = None,
        idempotency_key: str | None = None,
        priority: int | None = None,
        delay: timedelta | None = None,
        start_at: datetime | None = None,
    ) -> NewRun:
        """A run of ``fn`` to store, every value checked first (InvalidInput otherwise)."""
        spec = self._declarations.spec_for(fn)
        name = spec.name if spec else _limits.name(fn, "start: the function name")
        if idempotency_key is not None:
            _limits.key(idempotency_key, f"start {name!r}: the idempotency key")
        if priority is not None:
            _limits.priority(priority, f"start {name!r}: the priority")
        if delay is not None:
            delay = _limits.duration(delay, f"start {name!r}: the delay")
        if start_at is not None:
            start_at = _limits.moment(start_at, f"start {name!r}: start_at")
        if delay is not None and start_at is not None:
            raise InvalidInput("give delay or start_at, not both")
        limit = self._connection.settings.max_payload_bytes
        if spec is None:
            data = json_or_invalid(input, f"start {name!r}", limit)
        elif spec.takes_input:
            data = validate_input(spec.input_type, input, f"start {name!r}", limit)
        elif input is not None:
            raise InvalidInput(f"function {name!r} takes no input, got {type(input).__name__}")
        else:
            data = None
        return new_run(
            self._declarations.functions,
            name,
            data,
            run_id=uuid.uuid4() if run_id is None else parse_run_id(run_id),
            idempotency_key=idempotency_key,
            trace_context=current_carrier(),
            priority=priority,
            delay=delay,
            start_at=start_at,
        )

    # -- events ---------------------------------------------------------------------------------

    async def send_event(
        self,
        name: str,
        payload: Any,
        *,
        key: str | None,
        connection: asyncpg.Connection[Any] | None,
    ) -> int:
        _limits.name(name, "send_event: the event name")
        if key is not None:
            _limits.key(key, "send_event: the event key")
        limit = self._connection.settings.max_payload_bytes
        data = json_or_invalid(payload, f"event {name!r}", limit)
        store = self._connection.store
        if connection is not None:
            return await store.send_event_on(connection, name, key or "", data)
        return await store.send_event(name, key or "", data)

    # -- reading and acting on runs -------------------------------------------------------------

    def get_run(self, run_id: uuid.UUID | str) -> RunHandle[Any]:
        return RunHandle(self, parse_run_id(run_id))

    async def list_runs(self, status: str | None, limit: int) -> list[RunInfo]:
        _limits.count(limit, "list_runs: the limit", maximum=MAX_LISTED)
        rows = await self._connection.store.list_runs(status, limit)
        return [RunInfo.from_row(r) for r in rows]

    async def cancel_run(self, run_id: uuid.UUID | str, reason: str) -> str:
        _limits.text(reason, "cancel_run: the reason", _MAX_REASON_BYTES)
        return await self._connection.store.cancel(parse_run_id(run_id), reason)

    async def resume_run(self, run_id: uuid.UUID | str) -> bool:
        store = self._connection.store
        found = parse_run_id(run_id)
        if await store.resume(found):
            return True
        if await store.get_run(found) is None:
            raise RunNotFound(str(found))
        return False

    async def list_schedules(self) -> list[ScheduleRow]:
        rows, _now = await self._connection.store.list_schedules()
        return rows

    # -- what a RunHandle asks (durable._handle.RunSource) ------------------------------------

    async def run_row(self, run_id: uuid.UUID) -> RunRow | None:
        return await self._connection.store.get_run(run_id)

    async def children(self, run_id: uuid.UUID) -> list[RunRow]:
        return await self._connection.store.list_children(run_id)

    async def journal(self, run_id: uuid.UUID) -> list[JournalEntry]:
        return await self._connection.store.load_journal(run_id)

    async def waits(self, run_id: uuid.UUID) -> list[WaitRow]:
        return await self._connection.store.list_waits(run_id)

    def return_type_of(self, function: str) -> Any:
        spec = self._declarations.spec_for(function)
        return spec.return_type if spec else NO_TYPE

    def on_done(self, run_id: uuid.UUID, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` when a notification says ``run_id`` ended (or when the listener
        reconnected, as anything may have ended meanwhile); returns the unsubscribe."""
        self._done_waiters.setdefault(run_id, set()).add(callback)

        def unsubscribe() -> None:
            waiters = self._done_waiters.get(run_id)
            if waiters is not None:
                waiters.discard(callback)
                if not waiters:
                    del self._done_waiters[run_id]

        return unsubscribe

    def dispatch_done(self, payload: str) -> None:
        """The ``durable_done`` notification: ``payload`` is the run id, empty after a
        reconnect."""
        if not payload:
            targets = [cb for cbs in self._done_waiters.values() for cb in cbs]
        else:
            try:
                targets = list(self._done_waiters.get(uuid.UUID(payload), ()))
            except ValueError:
                return
        for callback in targets:
            callback()


def parse_run_id(value: uuid.UUID | str) -> uuid.UUID:
    """A run id, or InvalidInput for text that is not a UUID."""
    try:
        return value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))
    except ValueError:
        raise InvalidInput(f"not a run id (a UUID): {str(value)[:60]!r}") from None
