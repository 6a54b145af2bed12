"""``Context``: what a durable function calls (the machinery is ``engine._run_state``).

Every call takes the next journal position of the calling task (see ``engine._lineage``). A
journaled position returns its recorded outcome without running anything; the first
unjournaled one runs live and appends its outcome before returning. A position whose recorded
kind or name differs from the call raises ``NonDeterminismError`` and pauses the run.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from random import Random
from typing import Any, ParamSpec, TypeVar, overload

from engine import _codec, _limits, _patches, _steps
from engine._children import ChildRun, spec_of, start_child
from engine._registry import policy_of
from engine._run_state import RunState
from engine.errors import ErrorInfo, StepFailed

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")


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
        _limits.name(name, "ctx.step: the step name")
        await state.checkpoint("before", position, "step", name)
        body = state.stubs.get(name, fn)
        policy = policy_of(fn)
        if policy.rate_limit is not None:
            await _steps.take_budget(state, position, 1, policy, args, kwargs)
        tries: list[tuple[datetime, float, str | None]] = []
        with state.live():
            outcome, error = await _steps.execute_step(
                state, position, name, body, policy, args, kwargs, tries
            )
        await state.checkpoint("ran", position, "step", name)
        timing = _steps.timing(tries)
        if error is not None:
            await state.append(position, "step", name, None, error.to_json(), timing)
            await state.checkpoint("journaled", position, "step", name)
            raise StepFailed(name, error)
        value = _codec.dump(
            annotation,
            outcome,
            f"run {state.run_id}, step {name!r} at position {position}",
            state.max_payload_bytes,
        )
        await state.append(position, "step", name, value, None, timing)
        await state.checkpoint("journaled", position, "step", name)
        return _codec.load(annotation, value)

    async def start(
        self,
        fn: Callable[..., Awaitable[T]] | str,
        input: Any = None,
        *,
        priority: int | None = None,
        delay: timedelta | None = None,
    ) -> ChildRun[T]:
        """Start a child run of ``fn`` (a durable function of this app, or its name) without
        waiting for it; ``await child.result()`` waits later.

        The child is linked to this run (``durable runs show``), gets ``fn``'s options
        (queue, concurrency, timeouts), and is cancelled when this run is. Its id is fixed by
        this call's place in the run, so a replay after a crash finds the same child instead
        of starting another::

            children = [await ctx.start(resize, image) for image in images]
            sizes = await asyncio.gather(*(c.result() for c in children))
        """
        if priority is not None:
            _limits.priority(priority, "ctx.start: the priority")
        if delay is not None:
            delay = _limits.duration(delay, "ctx.start: the delay")
        spec = spec_of(self._state, fn)
        return await start_child(self._state, spec, input, priority=priority, delay=delay)

    async def run(
        self,
        fn: Callable[..., Awaitable[T]] | str,
        input: Any = None,
        *,
        priority: int | None = None,
    ) -> T:
        """Start a child run of ``fn`` and wait for its result durably: this run is suspended
        meanwhile and holds no worker slot. Raises RunFailed (RunCancelled) when the child
        failed (was cancelled). Fan out with ``asyncio.gather(*(ctx.run(f, x) for x in xs))``.
        """
        child: ChildRun[T] = await self.start(fn, input, priority=priority)
        return await child.result()

    async def sleep(self, duration: timedelta | float) -> None:
        """Sleep durably for ``duration`` (a timedelta or seconds).

        The wake time is fixed on the database's clock and journaled once; the run releases its
        worker slot while it sleeps and resumes by replay when due. A duration that is not a
        finite number (NaN, infinity) or exceeds 100 years raises InvalidInput; a negative
        one is over at once.
        """
        span = _limits.duration(duration, "ctx.sleep: the duration")
        await self._sleep(f"sleep {span}", duration=span)

    async def sleep_until(self, when: datetime) -> None:
        """Sleep durably until ``when`` (timezone-aware; a naive datetime is taken as UTC). A
        time from the year 9000 on raises InvalidInput."""
        when = _limits.moment(when, "ctx.sleep_until: the time")
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
        waiting on the same name and key receives it. A name, key or timeout out of bounds
        (see ``engine._limits``) raises InvalidInput, the same on replay.
        """
        _limits.name(name, "wait_for_event: the event name")
        event_key = "" if key is None else _limits.key(key, "wait_for_event: the event key")
        span = None if timeout is None else _limits.duration(timeout, "wait_for_event: the timeout")
        state = self._state
        position = state.next_position()
        entry = state.recorded(position, "event", name)
        if entry is not None:
            return None if entry.value.get("timeout") else entry.value.get("payload")
        await state.checkpoint("before", position, "event", name)
        while True:
            state.check_alive()
            result = await state.db(
                state.store.await_event(
                    state.run_id, state.attempt, position, name, event_key, span
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

    async def patched(self, name: str) -> bool:
        """Whether this run takes the new branch of patch ``name``: a change of the function's
        code that runs already in flight must not see::

            if await ctx.patched("charge-with-tax"):
                total = await ctx.step("tax", add_tax, order)
            else:
                total = order.total

        A run that reaches this point live takes the new branch, and the choice is journaled.
        A run whose journal already went past this point without it (it ran there on the code
        before the patch) takes the old branch, on every replay. The marker takes no journal
        position, so the calls after the patch keep theirs, for old runs and new. Once no run
        needs the old branch (``durable check``, ``durable versions``), delete it and write
        ``await ctx.deprecate_patch(name)`` in place of the ``if``."""
        return await _patches.patched(self._state, name)

    async def deprecate_patch(self, name: str) -> None:
        """Mark where patch ``name`` was, once its old branch is deleted: runs that took the
        new branch (or reach this point live) replay cleanly, and a run that would need the old
        branch, which no longer exists, pauses with a ``NonDeterminismError`` naming the patch
        instead of replaying the new code as if it had run it."""
        await _patches.deprecate_patch(self._state, name)

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
