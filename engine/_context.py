"""``Context``: what a durable function calls, and the replay machinery behind it.

Every call takes the next journal position of the calling task (see ``engine._lineage``). A
journaled position returns its recorded outcome without running anything; the first
unjournaled one runs live and appends its outcome before returning. A position whose recorded
kind or name differs from the call raises ``NonDeterminismError`` and pauses the run.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import random
import traceback
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from random import Random
from typing import Any, Literal, ParamSpec, Protocol, TypeVar, overload

import asyncpg

from engine import _codec, _lineage, _tracing
from engine._clock import DatabaseTime
from engine._records import JournalEntry, Store
from engine._registry import StepPolicy, policy_of
from engine._signals import abandon, suspend
from engine._store import TRANSIENT_ERRORS
from engine.errors import (
    ErrorInfo,
    JournalConflict,
    NonDeterminismError,
    SerializationError,
    StepFailed,
)

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

# Loop iterations a run must stay idle before it is considered blocked as a whole: enough for
# a result to travel up through nested gathers and for the next call to be made.
_SETTLE_TICKS = 20


Moment = Literal["before", "ran", "journaled"]
Decision = Literal["continue", "crash", "halt"]


@dataclass(frozen=True)
class Checkpoint:
    """A journal boundary a run passes: ``before`` live work at ``position`` starts, after a
    step's body ``ran`` (its result not yet journaled), and once the entry is ``journaled``."""

    run_id: uuid.UUID
    attempt: int
    moment: Moment
    position: str
    kind: str
    name: str


class Probe(Protocol):
    """Watches checkpoints (``durable.testing``): ``"crash"`` kills the attempt there as a
    SIGKILL would, ``"halt"`` blocks that branch for good (replay stops at live work)."""

    async def __call__(self, point: Checkpoint) -> Decision: ...


@dataclass(eq=False)
class _Blocked:
    future: asyncio.Future[None]
    wake_at: datetime | None


class RunState:
    """One attempt at a run: its journal, its live work, and whether it must stop."""

    def __init__(
        self,
        *,
        store: Store,
        run_id: uuid.UUID,
        function: str,
        attempt: int,
        journal: list[JournalEntry],
        db_time: DatabaseTime,
        short_wait: float,
        rng: random.Random,
        probe: Probe | None = None,
        max_payload_bytes: int | None = None,
        stubs: Mapping[str, Callable[..., Any]] | None = None,
        seed: str | None = None,
    ) -> None:
        self.store = store
        self.probe = probe
        self.max_payload_bytes = max_payload_bytes
        self.stubs = stubs or {}
        self.seed = seed
        self.run_id = run_id
        self.function = function
        self.attempt = attempt
        self.journal = {entry.position: entry for entry in journal}
        self.consumed: set[str] = set()
        self.db_time = db_time
        self.short_wait = short_wait
        self.rng = rng
        self.tasks: set[asyncio.Task[Any]] = set()
        self.in_flight = 0
        self.generation = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.blocked: list[_Blocked] = []
        self.suspending = False
        self.suspend_until: datetime | None = None
        self.lost = False
        self.nondeterminism: NonDeterminismError | None = None
        self.interrupted: BaseException | None = None
        self._settler: asyncio.Task[None] | None = None

    # -- task bookkeeping ----------------------------------------------------------------------

    def track(self, task: asyncio.Task[Any]) -> None:
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def cancel_tasks(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        if self._settler is not None:
            self._settler.cancel()

    # -- positions and replay -----------------------------------------------------------------

    def next_position(self) -> str:
        node = _lineage.current()
        if node is None or node.owner is not self:
            raise RuntimeError(
                "a Context method was called outside its run (from another run, a thread, or "
                "a task created with an explicit context)"
            )
        self.generation += 1
        return node.next_position()

    def recorded(self, position: str, kind: str, name: str) -> JournalEntry | None:
        """The journaled entry at ``position``, checked against the call; None when live."""
        self.check_alive()
        entry = self.journal.get(position)
        if entry is None:
            return None
        if entry.kind != kind or entry.name != name:
            error = NonDeterminismError(
                str(self.run_id),
                position,
                recorded=f"{entry.kind} {entry.name!r}",
                requested=f"{kind} {name!r}",
            )
            self.nondeterminism = self.nondeterminism or error
            raise error
        self.consumed.add(position)
        return entry

    def check_alive(self) -> None:
        if self.lost:
            raise abandon(f"run {self.run_id}: claim {self.attempt} lost")
        if self.nondeterminism is not None:
            raise self.nondeterminism
        if self.suspending:
            raise suspend()

    def unconsumed(self) -> list[JournalEntry]:
        return [e for p, e in self.journal.items() if p not in self.consumed]

    async def db(self, call: Coroutine[Any, Any, T]) -> T:
        """Await a store call as live work. A database failure cannot be caught by the user's
        ``except Exception``: it abandons this attempt, which is resumed by replay."""
        if self.lost:  # a crashed or fenced attempt writes nothing more
            call.close()
            self.check_alive()
        with self.live():
            try:
                return await call
            except asyncpg.DataError as exc:  # the value, not the database: retrying won't help
                raise SerializationError(
                    f"run {self.run_id}: the database refused a value ({exc})"
                ) from exc
            except (*TRANSIENT_ERRORS, asyncpg.PostgresError, JournalConflict) as exc:
                self.interrupted = exc
                raise abandon(f"run {self.run_id}: database call failed ({exc!r})") from exc

    async def append(
        self, position: str, kind: str, name: str, value: Any, error: Any = None
    ) -> None:
        ok = await self.db(
            self.store.append(self.run_id, self.attempt, position, kind, name, value, error)
        )
        self.fence(ok)
        self.remember(position, kind, name, value, error)

    async def checkpoint(self, moment: Moment, position: str, kind: str, name: str) -> None:
        """Let the probe (tests only) see this boundary, and crash or halt here."""
        if self.probe is None:
            return
        with self.live():  # a probe that waits is live work: the run must not settle meanwhile
            decision = await self.probe(
                Checkpoint(self.run_id, self.attempt, moment, position, kind, name)
            )
        if decision == "crash":
            self.lost = True
            self.cancel_tasks()
            raise abandon(f"run {self.run_id}: crash injected {moment} position {position}")
        if decision == "halt":
            while True:
                await self.block(None)

    def rng_for(self, position: str) -> random.Random:
        """Where a journaled helper draws at ``position``: per position when seeded (a test's
        simulation, so that a crash cannot shift later draws), else the run's generator."""
        if self.seed is None:
            return self.rng
        return random.Random(f"{self.seed}/{position}")

    def fence(self, ok: bool) -> None:
        if not ok:
            self.lost = True
            raise abandon(f"run {self.run_id}: claim {self.attempt} lost; write fenced")

    def remember(self, position: str, kind: str, name: str, value: Any, error: Any) -> None:
        self.journal[position] = JournalEntry(
            position, kind, name, value, error, self.attempt, self.db_time.now()
        )
        self.consumed.add(position)

    # -- live work and blocking ---------------------------------------------------------------

    @contextmanager
    def live(self) -> Iterator[None]:
        """Marks live work in flight: the run is not idle (and cannot suspend) meanwhile."""
        self.in_flight += 1
        self.generation += 1
        self.idle.clear()
        try:
            with _lineage.detached():
                yield
        finally:
            self.in_flight -= 1
            self.generation += 1
            if self.in_flight == 0:
                self.idle.set()

    async def block(self, wake_at: datetime | None) -> None:
        """Wait for ``wake_at`` (None: for an event). Returns when woken in memory; raises the
        Suspend signal when the whole run is blocked and the wait is not short."""
        blocked = _Blocked(asyncio.get_running_loop().create_future(), wake_at)
        self.blocked.append(blocked)
        if self._settler is None:
            self._settler = asyncio.get_running_loop().create_task(
                self._settle(), context=_lineage.detached_context()
            )
        try:
            await blocked.future
        finally:  # a branch cancelled while blocked (asyncio.wait_for) no longer blocks the run
            if blocked in self.blocked:
                self.blocked.remove(blocked)

    async def _settle(self) -> None:
        try:
            while self.blocked:
                if self.in_flight:
                    await self.idle.wait()
                    continue
                seen = self.generation
                for _ in range(_SETTLE_TICKS):
                    await asyncio.sleep(0)
                if self.in_flight or seen != self.generation or not self.blocked:
                    continue
                deadlines = [b.wake_at for b in self.blocked if b.wake_at is not None]
                earliest = min(deadlines, default=None)
                if earliest is not None and self.db_time.seconds_until(earliest) <= self.short_wait:
                    await self.db_time.sleep(self.db_time.seconds_until(earliest))
                    self._wake(earliest)
                    continue
                self.suspending = True
                self.suspend_until = earliest
                for b in self.blocked:
                    if not b.future.done():
                        b.future.set_exception(suspend())
                self.blocked.clear()
        finally:
            self._settler = None

    def _wake(self, due: datetime) -> None:
        self.generation += 1
        still = []
        for b in self.blocked:
            if b.wake_at is not None and b.wake_at <= due:
                if not b.future.done():
                    b.future.set_result(None)
            else:
                still.append(b)
        self.blocked = still


class Context:
    """The handle a durable function uses for everything that must survive a crash.

    Every method is awaited and journaled: on replay it returns what it returned the first
    time, without doing the work again::

        @app.function()
        async def onboarding(ctx: durable.Context, signup: Signup) -> dict:
            await ctx.step("welcome", send_email, signup.email, "welcome")
            await ctx.sleep(timedelta(days=3))
            upgraded = await ctx.wait_for_event("upgraded", key=signup.user_id,
                                                timeout=timedelta(days=4))
            return {"upgraded": upgraded is not None}

    Only call it from the function's own task or tasks it creates (``asyncio.gather``,
    ``asyncio.create_task``, ``TaskGroup``); keep everything non-deterministic (time, randomness,
    I/O) inside steps or the journaled helpers ``now``, ``uuid`` and ``random``.
    """

    def __init__(self, state: RunState) -> None:
        self._state = state

    @property
    def run_id(self) -> uuid.UUID:
        """The id of the run being executed."""
        return self._state.run_id

    @property
    def attempt(self) -> int:
        """How many times this run has been claimed by a worker, this time included (1-based)."""
        return self._state.attempt

    @overload
    async def step(
        self, name: str, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs
    ) -> T: ...

    @overload
    async def step(
        self, name: str, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs
    ) -> T: ...

    async def step(self, name: str, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` once, durably, and return its result.

        ``fn`` may be async or sync (a sync one runs in a thread). Its result is stored as JSON
        validated by its return annotation, so a replay returns the same type (a pydantic model
        comes back as that model). Failures are retried per the ``@durable.step`` policy; when
        retries run out the failure is journaled and ``StepFailed`` is raised, on replay too.
        """
        state = self._state
        position = state.next_position()
        annotation = _codec.return_type(fn)
        entry = state.recorded(position, "step", name)
        if entry is not None:
            if entry.error is not None:
                raise StepFailed(name, ErrorInfo.from_json(entry.error))
            return _codec.load(annotation, entry.value)
        await state.checkpoint("before", position, "step", name)
        body = state.stubs.get(name, fn)
        with state.live():
            outcome, error = await _execute_step(
                state, position, name, body, policy_of(fn), args, kwargs
            )
        await state.checkpoint("ran", position, "step", name)
        if error is not None:
            await state.append(position, "step", name, None, error.to_json())
            await state.checkpoint("journaled", position, "step", name)
            raise StepFailed(name, error)
        value = _codec.dump(
            annotation,
            outcome,
            f"run {state.run_id}, step {name!r} at position {position}",
            state.max_payload_bytes,
        )
        await state.append(position, "step", name, value)
        await state.checkpoint("journaled", position, "step", name)
        return _codec.load(annotation, value)

    async def sleep(self, duration: timedelta | float) -> None:
        """Sleep durably for ``duration`` (a timedelta or seconds).

        The wake time is fixed on the database's clock and journaled once; the run releases its
        worker slot while it sleeps and resumes by replay when due.
        """
        if not isinstance(duration, timedelta):
            duration = timedelta(seconds=float(duration))
        await self._sleep(f"sleep {duration}", duration=duration)

    async def sleep_until(self, when: datetime) -> None:
        """Sleep durably until ``when`` (timezone-aware; a naive datetime is taken as UTC)."""
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        await self._sleep(f"sleep until {when.isoformat()}", wake_at=when)

    async def _sleep(
        self, name: str, *, duration: timedelta | None = None, wake_at: datetime | None = None
    ) -> None:
        state = self._state
        position = state.next_position()
        entry = state.recorded(position, "sleep", "sleep")
        if entry is not None:
            wake = datetime.fromisoformat(entry.value["wake_at"])
        else:
            await state.checkpoint("before", position, "sleep", "sleep")
            fixed = await state.db(
                state.store.append_sleep(
                    state.run_id,
                    state.attempt,
                    position,
                    "sleep",
                    wake_at=wake_at,
                    duration=duration,
                )
            )
            state.fence(fixed is not None)
            assert fixed is not None
            wake = fixed
            state.remember(position, "sleep", "sleep", {"wake_at": wake.isoformat()}, None)
            await state.checkpoint("journaled", position, "sleep", "sleep")
        log.debug(
            "run %s: %s wakes at %s", state.run_id, name, wake, extra={"run_id": str(state.run_id)}
        )
        while state.db_time.seconds_until(wake) > 0:
            await state.block(wake)

    async def wait_for_event(
        self,
        name: str,
        *,
        key: str | None = None,
        timeout: timedelta | float | None = None,
    ) -> Any:
        """Wait durably for the next event ``name`` (with ``key``) and return its payload.

        Returns ``None`` when ``timeout`` passes first; the deadline is fixed when the wait is
        first reached and survives restarts. An event sent after the run started counts even if
        it arrived before the wait was reached. Each event satisfies a wait once; every run
        waiting on the same name and key receives it.
        """
        state = self._state
        position = state.next_position()
        event_key = key or ""
        entry = state.recorded(position, "event", name)
        if entry is not None:
            return None if entry.value.get("timeout") else entry.value.get("payload")
        if timeout is not None and not isinstance(timeout, timedelta):
            timeout = timedelta(seconds=float(timeout))
        await state.checkpoint("before", position, "event", name)
        while True:
            state.check_alive()
            result = await state.db(
                state.store.await_event(
                    state.run_id, state.attempt, position, name, event_key, timeout
                )
            )
            state.fence(result.outcome != "fenced")
            if result.outcome == "event":
                value = {"key": event_key, "payload": result.payload}
                state.remember(position, "event", name, value, None)
                await state.checkpoint("journaled", position, "event", name)
                return result.payload
            if result.outcome == "timeout":
                state.remember(position, "event", name, {"key": event_key, "timeout": True}, None)
                await state.checkpoint("journaled", position, "event", name)
                return None
            await state.block(result.timeout_at)

    async def now(self) -> datetime:
        """The current time (UTC, on the database's clock like every timer), journaled: a
        replay returns the recorded time."""
        value = await self._helper("now", lambda _rng: self._state.db_time.now().isoformat())
        return datetime.fromisoformat(value)

    async def uuid(self) -> uuid.UUID:
        """A random UUID (version 4), journaled."""
        value = await self._helper(
            "uuid", lambda rng: str(uuid.UUID(int=rng.getrandbits(128), version=4))
        )
        return uuid.UUID(value)

    async def random(self) -> float:
        """A random float in [0, 1), journaled."""
        return float(await self._helper("random", lambda rng: rng.random()))

    async def _helper(self, kind: str, make: Callable[[Random], Any]) -> Any:
        state = self._state
        position = state.next_position()
        entry = state.recorded(position, kind, kind)
        if entry is not None:
            return entry.value
        await state.checkpoint("before", position, kind, kind)
        value = make(state.rng_for(position))
        await state.append(position, kind, kind, value)
        await state.checkpoint("journaled", position, kind, kind)
        return value


async def _execute_step(
    state: RunState,
    position: str,
    name: str,
    fn: Callable[..., Any],
    policy: StepPolicy,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> tuple[Any, ErrorInfo | None]:
    """Run a step body with its retry policy; returns (result, None) or (None, failure)."""
    timeout = policy.timeout.total_seconds() if policy.timeout else None
    attempt = 0
    while True:
        attempt += 1
        state.check_alive()
        with _tracing.step_span(state.run_id, state.function, name, position, attempt):
            try:
                async with asyncio.timeout(timeout):
                    if inspect.iscoroutinefunction(fn):
                        return await fn(*args, **kwargs), None
                    result = await asyncio.to_thread(fn, *args, **kwargs)
                    if inspect.isawaitable(result):
                        result = await result
                    return result, None
            except Exception as exc:
                if isinstance(exc, TimeoutError) and timeout is not None:
                    exc = TimeoutError(f"step {name!r} timed out after {timeout}s")
                failure = ErrorInfo.from_exception(exc, traceback.format_exc())
        if attempt > policy.retries:
            return None, failure
        delay = policy.backoff.delay(attempt, state.rng)
        log.info(
            "run %s: step %r attempt %d failed (%s: %s); retrying in %.2fs",
            state.run_id,
            name,
            attempt,
            failure.type,
            failure.message,
            delay,
            extra={"run_id": str(state.run_id)},
        )
        await state.db_time.sleep(delay)
