"""``Client``: what an app does with runs and events from outside a run (start, send, read,
cancel, resume), and the notifications that wake ``RunHandle.result``. It is also the source
a ``RunHandle`` asks (``durable._handle.RunSource``)."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, get_args

import asyncpg

from durable._connection import Connection
from durable._declarations import Declarations
from durable._handle import KEEP_INPUT, NO_TYPE, RunHandle, RunInfo
from durable._settings import json_or_invalid
from engine import (
    JournalEntry,
    NewRun,
    RunRow,
    RunStatus,
    ScheduleRow,
    WaitRow,
    Worker,
    _limits,
    current_carrier,
    new_run,
    validate_input,
)
from engine.errors import DatabaseUnavailable, InvalidInput, RunNotFound

log = logging.getLogger("durable._app")

_MAX_REASON_BYTES = 4096

Target = Callable[..., Awaitable[Any]] | str


@dataclass(frozen=True)
class VersionCount:
    """How many runs of ``function`` that started on ``version`` (None: not started yet) are
    ``status``, and when the latest of them changed (``durable versions``)."""

    function: str
    version: str | None
    status: RunStatus
    runs: int
    latest: datetime


class Client:
    """Runs and events through an app's connection, with its declarations for validation."""

    def __init__(
        self,
        declarations: Declarations,
        connection: Connection,
        worker_for: Callable[[str], Worker | None] = lambda _function: None,
        attempt_here: Callable[[uuid.UUID], asyncio.Task[None] | None] = lambda _run_id: None,
    ) -> None:
        self._declarations = declarations
        self._connection = connection
        self._worker_for = worker_for
        self.attempt_here = attempt_here  # RunSource.attempt_here
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
        tags: Mapping[str, str] | None = None,
    ) -> RunHandle[Any]:
        new = self.new_run(
            fn,
            input,
            run_id=run_id,
            idempotency_key=idempotency_key,
            priority=priority,
            delay=delay,
            start_at=start_at,
            tags=tags,
        )
        if connection is not None:
            found, created = await self._connection.store.start_run_on(connection, new)
        else:
            found, created = await self._start_eagerly_or_queue(new)
        if not created:
            log.info("run %s already exists; returning it", found, extra={"run_id": str(found)})
        return RunHandle(self, found, self.return_type_of(new.function))

    async def _start_eagerly_or_queue(self, new: NewRun) -> tuple[uuid.UUID, bool]:
        """Start ``new`` claimed by this process's worker if it has a slot free, else queued."""
        started = None
        if (worker := self._worker_for(new.function)) is not None:
            try:
                started = await worker.start_here(new)
            except DatabaseUnavailable:  # it may be in: the queued start must look for it
                new = new.named()
        if started is None:
            [started] = await self._connection.store.start_runs([new])
        return started

    async def start_many(
        self,
        fn: Target,
        inputs: Iterable[Any],
        *,
        idempotency_keys: Sequence[str | None] | None,
        priority: int | None,
        connection: asyncpg.Connection[Any] | None,
        tags: Mapping[str, str] | None = None,
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
            self.new_run(fn, v, idempotency_key=k, priority=priority, tags=tags)
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
        tags: Mapping[str, str] | None = None,
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
        if tags is not None:
            tags = _limits.tags(tags, f"start {name!r}: tags")
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
            run_id=None if run_id is None else parse_run_id(run_id),
            idempotency_key=idempotency_key,
            trace_context=current_carrier(),
            priority=priority,
            delay=delay,
            start_at=start_at,
            tags=tags,
            retention=self._declarations.retention,
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
        retention = self._declarations.retention
        if connection is not None:
            return await store.send_event_on(connection, name, key or "", data, retention)
        return await store.send_event(name, key or "", data, retention)

    # -- reading and acting on runs -------------------------------------------------------------

    def get_run(self, run_id: uuid.UUID | str) -> RunHandle[Any]:
        return RunHandle(self, parse_run_id(run_id))

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

    async def fork_run(
        self,
        run_id: uuid.UUID | str,
        *,
        from_step: str | None = None,
        from_position: str | None = None,
        input: Any = KEEP_INPUT,
    ) -> RunHandle[Any]:
        """A new run reusing run ``run_id``'s journal up to a point (see ``RunHandle.fork``)."""
        source = parse_run_id(run_id)
        store = self._connection.store
        row = await store.get_run(source)
        if row is None:
            raise RunNotFound(str(source))
        journal = await store.load_journal(source)
        keep, position = fork_point(source, journal, from_step, from_position)
        replace = input is not KEEP_INPUT
        data = self._fork_input(row.function, input) if replace else None
        new = uuid.uuid4()
        if not await store.fork(source, new, keep, position, input=data, replace_input=replace):
            raise RunNotFound(str(source))
        log.info(
            "run %s forked from run %s at %s", new, source, position or "the end of its journal"
        )
        return RunHandle(self, new, self.return_type_of(row.function))

    async def retry_run(self, run_id: uuid.UUID | str) -> RunHandle[Any]:
        """A fork of a failed, cancelled or timed-out run from its failure point: every entry
        before the first failed one is kept (with no failed entry, the whole journal), so the
        steps that succeeded are not run again. InvalidInput for a run that has not ended so."""
        source = parse_run_id(run_id)
        row = await self._connection.store.get_run(source)
        if row is None:
            raise RunNotFound(str(source))
        if row.status not in ("failed", "cancelled"):
            raise InvalidInput(
                f"run {source} is {row.status}: only a failed, cancelled or timed-out run is "
                f"retried (fork a run to run part of it again)"
            )
        journal = await self._connection.store.load_journal(source)
        failed = next((e for e in journal if e.error is not None), None)
        return await self.fork_run(source, from_position=failed.position if failed else None)

    def _fork_input(self, function: str, input: Any) -> Any:
        spec = self._declarations.spec_for(function)
        limit = self._connection.settings.max_payload_bytes
        what = f"fork of {function!r}"
        if spec is not None and spec.takes_input:
            return validate_input(spec.input_type, input, what, limit)
        return json_or_invalid(input, what, limit)

    async def select_runs(
        self,
        statuses: Sequence[str],
        *,
        function: str | None = None,
        within: timedelta | None = None,
        forked: bool | None = None,
        page: int = 1000,
    ) -> AsyncIterator[RunInfo]:
        """Every run of ``statuses`` (of ``function``, created within ``within`` of now, forked
        or retried already or not), page by page in id order."""
        for status in statuses:
            if status not in get_args(RunStatus):
                raise InvalidInput(
                    f"select_runs: {status!r} is not a run status "
                    f"({', '.join(get_args(RunStatus))})"
                )
        after: uuid.UUID | None = None
        while True:
            rows = await self._connection.store.select_runs(
                statuses, function=function, within=within, forked=forked, limit=page, after=after
            )
            for row in rows:
                yield RunInfo.from_row(row)
            if len(rows) < page:
                return
            after = rows[-1].id

    async def list_versions(self) -> list[VersionCount]:
        rows = await self._connection.store.list_versions()
        return [VersionCount(**row) for row in rows]

    async def list_schedules(self) -> list[ScheduleRow]:
        rows, _now = await self._connection.store.list_schedules()
        return rows

    # -- what a RunHandle asks (durable._handle.RunSource) ------------------------------------

    async def run_row(self, run_id: uuid.UUID) -> RunRow | None:
        return await self._connection.store.get_run(run_id)

    async def read_awaited(self, run_id: uuid.UUID) -> tuple[RunRow | None, float]:
        return await self._connection.read_awaited(run_id)

    async def children(self, run_id: uuid.UUID) -> list[RunRow]:
        return await self._connection.store.list_children(run_id)

    async def journal(self, run_id: uuid.UUID) -> list[JournalEntry]:
        return await self._connection.store.read_journal(run_id)

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


def fork_point(
    run_id: uuid.UUID,
    journal: Sequence[JournalEntry],
    from_step: str | None,
    from_position: str | None,
) -> tuple[list[str], str | None]:
    """The positions a fork keeps (every entry written before the point, in journal order)
    and the point's position (None: after the whole journal)."""
    if from_step is not None and from_position is not None:
        raise InvalidInput("give from_step or from_position, not both")
    at: int | None = None
    if from_step is not None:
        at = next(
            (i for i, e in enumerate(journal) if e.kind == "step" and e.name == from_step), None
        )
        if at is None:
            raise InvalidInput(f"run {run_id} has no step {from_step!r} in its journal")
    elif from_position is not None:
        at = next((i for i, e in enumerate(journal) if e.position == from_position), None)
        if at is None:
            raise InvalidInput(f"run {run_id} has no journal entry at position {from_position!r}")
    kept = journal if at is None else journal[:at]
    return [e.position for e in kept], None if at is None else journal[at].position


def parse_run_id(value: uuid.UUID | str) -> uuid.UUID:
    """A run id, or InvalidInput for text that is not a UUID."""
    try:
        return value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))
    except ValueError:
        raise InvalidInput(f"not a run id (a UUID): {str(value)[:60]!r}") from None
