"""Executes one claimed attempt of a run: load the journal, replay, run live, then end the
attempt as suspended, completed, failed or paused."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import traceback
from collections.abc import Awaitable
from typing import Any

from engine import _codec, _lineage, _metrics, _tracing
from engine._context import Context
from engine._records import Claim, EndStatus
from engine._registry import FunctionSpec
from engine._run_state import Execution, RunState
from engine._signals import Abandon, Suspend
from engine.errors import DatabaseUnavailable, ErrorInfo, NonDeterminismError

log = logging.getLogger(__name__)


class Runner:
    """One attempt of one run (``claim``), executed as ``execution`` says."""

    def __init__(self, execution: Execution, claim: Claim, *, observed: bool = False) -> None:
        """``observed``: the caller gave ``execution.db_time`` the claim's ``db_now`` as it
        arrived (a worker does); otherwise the runner does, when it begins."""
        self.execution = execution
        self._observed = observed
        self.store = execution.store
        self.spec = execution.functions[claim.function]
        self.claim = claim
        self.db_time = execution.db_time
        self.max_payload_bytes = execution.max_payload_bytes
        self.state: RunState | None = None
        self._root: asyncio.Task[Any] | None = None
        self.extra = {"run_id": str(claim.run_id)}
        self.lost_because = ""
        self.cancel_requested = False
        self.timed_out = False
        # Set once the attempt's last store call (suspend, finish, release) has been made:
        # from then on a lease renewal that no longer finds the run is no sign of a lost claim.
        self.ending = False
        self._handing_back = False
        self._released = False
        self._interrupted = asyncio.Event()  # cancelled, lost or handed back

    def cancel(self) -> None:
        """Deliver a cancellation: the run's tasks (its running step included) receive
        CancelledError, every later Context call raises it, and the run ends as cancelled."""
        if self.cancel_requested:
            return
        self.cancel_requested = True
        log.info("run %s: cancelling", self.claim.run_id, extra=self.extra)
        self._interrupt()

    def _interrupt(self) -> None:
        if self.state is not None:
            self.state.cancelled = True
        self._interrupted.set()
        self._stop_tasks()

    def _stop_tasks(self) -> None:
        if self.state is not None:
            self.state.cancel_tasks()
        if self._root is not None:
            self._root.cancel()

    async def _watch_deadline(self) -> None:
        deadline = self.claim.deadline_at
        assert deadline is not None
        while (left := self.db_time.seconds_until(deadline)) > 0:
            await self.db_time.sleep(left)
        log.info("run %s: execution deadline %s passed", self.claim.run_id, deadline)
        self.timed_out = True
        self._interrupt()

    def lose(self, reason: str) -> None:
        """Stop the run's tasks; this attempt writes nothing more (its lease is gone)."""
        self.lost_because = reason
        if self.state is not None:
            self.state.lost = True
        self._interrupted.set()
        self._stop_tasks()

    def hand_back(self, reason: str) -> None:
        """Stop the attempt and give the run back to the queue (the worker is shutting down).
        The run is released only once none of its step bodies still runs in a thread of this
        process; until then ``execute`` does not return, so the worker keeps its lease."""
        self._handing_back = True
        self.lose(reason)

    @property
    def threads(self) -> int:
        """Step bodies of this attempt still running in threads."""
        return 0 if self.state is None else len(self.state.threads)

    async def execute(self) -> None:
        claim = self.claim
        self._began = time.monotonic()
        if not self._observed:
            self.db_time.observe(claim.db_now)
        labels = {"function": claim.function}
        if claim.attempt == 1:
            _metrics.runs_started.add(1, labels)
            if claim.created_at is not None:
                latency = (claim.db_now - claim.created_at).total_seconds()
                _metrics.start_latency.record(max(0.0, latency), labels)
        # A first claim has no journal (entries are written only by a claim's holder), unless
        # the run is a fork, which starts with a copy of another run's.
        fresh = claim.attempt == 1 and not claim.forked
        journal = [] if fresh else await self.store.load_journal(claim.run_id)
        state = RunState(
            self.execution,
            run_id=claim.run_id,
            function=claim.function,
            attempt=claim.attempt,
            journal=journal,
        )
        state.cancelled = self.cancel_requested
        state.lost = bool(self.lost_because)  # lost or handed back while the journal loaded
        self.state = state
        log.debug(
            "run %s attempt %d: replaying %d journal entries",
            claim.run_id,
            claim.attempt,
            len(journal),
            extra=self.extra,
        )
        if journal and self._ahead():
            # Replay now, before the due time: the first live call (or the end) waits for it,
            # so a timer wakes to its continuation rather than to a replay.
            state.not_before = claim.due_at
        else:
            await self._until_due()
        if state.lost:  # handed back or lost while it waited to be due
            if self._handing_back:
                await self._release()
            return
        if self.cancel_requested:  # told before the attempt began
            await self._end_interrupted(state)
            return
        watchdog = None
        if claim.deadline_at is not None:
            watchdog = asyncio.get_running_loop().create_task(
                self._watch_deadline(), context=_lineage.detached_context()
            )
        try:
            with _tracing.run_span(
                claim.run_id, claim.function, claim.attempt, claim.trace_context
            ) as span:
                state.traced = span.is_recording()
                await self._drive(state)
        finally:
            if watchdog is not None:
                watchdog.cancel()
        if self._handing_back:
            await self._release()

    def _ahead(self) -> bool:
        due = self.claim.due_at
        return due is not None and due > self.claim.db_now

    async def _until_due(self) -> None:
        """A run claimed ahead of its time (a timer about to fall due: ``claim_due``'s
        ``ahead``) begins when it is due, or when it is cancelled or lost before then."""
        due = self.claim.due_at
        if not self._ahead() or self._interrupted.is_set():
            return
        assert due is not None
        sleeping = asyncio.ensure_future(self.db_time.sleep(self.db_time.seconds_until(due)))
        interrupted = asyncio.ensure_future(self._interrupted.wait())
        try:
            await asyncio.wait({sleeping, interrupted}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeping.cancel()
            interrupted.cancel()

    async def _drive(self, state: RunState) -> None:
        loop = asyncio.get_running_loop()
        try:
            args: tuple[Any, ...] = (Context(state),)
            if self.spec.takes_input:
                args += (_codec.load(self.spec.input_type, self.claim.input),)
            self._root = loop.create_task(
                _call(self.spec, args), context=_lineage.root_context(state)
            )
            result = await self._root
        except Suspend:
            if self.cancel_requested or self.timed_out:
                await self._end_interrupted(state)
            else:
                await self._end_suspended(state)
        except Abandon as signal:
            log.warning("%s", signal, extra=self.extra)
            # After a connection failure the run is handed back at once; after any other
            # database error it waits for its lease to expire, so a fault that repeats
            # cannot spin the run through claims.
            if isinstance(state.interrupted, DatabaseUnavailable) and not state.lost:
                await self._release()
        except asyncio.CancelledError as exc:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # this runner itself is being cancelled
            if not state.lost:  # the function cancelled itself: a failure like any other
                await self._end_failed(state, exc)
                return
            log.warning(
                "run %s: attempt %d abandoned (%s)",
                self.claim.run_id,
                self.claim.attempt,
                self.lost_because,
                extra=self.extra,
            )
        except Exception as exc:
            await self._end_failed(state, exc)
        else:
            await self._end_returned(state, result)
        finally:
            state.cancel_tasks()

    async def _end(self, call: Awaitable[bool], outcome: str) -> None:
        """End the attempt with its last store call. False means the claim was lost meanwhile:
        another worker holds the run and resumes it, and this attempt's outcome is dropped."""
        self.ending = True
        written = await call
        _metrics.attempt_duration.record(
            time.monotonic() - self._began,
            {"function": self.claim.function, "outcome": outcome if written else "lost"},
        )
        if written:
            _metrics.run_ended(self.claim.function, outcome)
        else:
            log.warning(
                "run %s: claim %d was lost before the attempt ended (%s not written); the run's "
                "new holder resumes it",
                self.claim.run_id,
                self.claim.attempt,
                outcome,
                extra=self.extra,
            )

    async def _finish(self, status: EndStatus, *, result: Any = None, error: Any = None) -> None:
        claim = self.claim
        await self._end(
            self.store.finish(
                claim.run_id,
                claim.attempt,
                status,
                result=result,
                error=error,
                enough=self.execution.ends_together(),
            ),
            status,
        )

    async def _reach_due(self) -> None:
        """A run replayed ahead that ends before any live call ends no earlier than it is due,
        or when it is cancelled, times out or is lost meanwhile: called before the outcome is
        chosen, so that the outcome sees that."""
        if self.state is not None and self.state.not_before is not None:
            await self._until_due()
            self.state.not_before = None

    async def _end_suspended(self, state: RunState) -> None:
        await self._reach_due()
        if state.lost:  # lost or handed back while it waited to be due: it writes nothing
            return
        if self.cancel_requested or self.timed_out:
            await self._end_interrupted(state)
            return
        if state.nondeterminism is not None:
            await self._pause(state.nondeterminism)
            return
        claim = self.claim
        await self._end(
            self.store.suspend(claim.run_id, claim.attempt, state.suspend_until), "suspended"
        )

    async def _end_interrupted(self, state: RunState) -> None:
        """End a run that was cancelled, or that passed its deadline, while it executed."""
        if state.lost:
            return
        if self.cancel_requested:
            log.info("run %s cancelled", self.claim.run_id, extra=self.extra)
            error = ErrorInfo("RunCancelled", "cancelled while running", "durable")
            status: EndStatus = "cancelled"
        else:
            error = ErrorInfo(
                "RunTimedOut",
                f"the run did not finish before its deadline {self.claim.deadline_at} "
                "(its execution timeout)",
                "durable",
            )
            status = "failed"
        await self._finish(status, error=error.to_json())

    async def _end_failed(self, state: RunState, exc: BaseException) -> None:
        await self._reach_due()
        if state.lost:
            return
        if state.nondeterminism is not None:
            await self._pause(state.nondeterminism)
            return
        if self.cancel_requested or self.timed_out:
            await self._end_interrupted(state)
            return
        error = ErrorInfo.from_exception(exc, traceback.format_exc())
        log.info(
            "run %s failed: %s: %s", self.claim.run_id, error.type, error.message, extra=self.extra
        )
        await self._finish("failed", error=error.to_json())

    async def _end_returned(self, state: RunState, result: Any) -> None:
        await self._reach_due()
        if state.lost:
            return
        if self.cancel_requested or self.timed_out:
            await self._end_interrupted(state)
            return
        if state.nondeterminism is None:
            leftover = state.unconsumed()
            if leftover:
                first = min(leftover, key=lambda e: e.created_at)
                state.nondeterminism = NonDeterminismError(
                    str(self.claim.run_id),
                    first.position,
                    recorded=f"{first.kind} {first.name!r}",
                    requested="nothing (the function returned without reaching it)",
                )
        if state.nondeterminism is not None:
            await self._pause(state.nondeterminism)
            return
        try:
            value = _codec.dump(
                self.spec.return_type,
                result,
                f"run {self.claim.run_id}: function result",
                self.max_payload_bytes,
            )
        except Exception as exc:
            await self._end_failed(state, exc)
            return
        await self._finish("completed", result=value)

    async def _release(self) -> None:
        """Hand the run back at once (after a database failure, or at shutdown), so that it
        does not wait for its lease to expire; if the database is away, the lease expiry does
        it. Not while a step body of the run still runs in a thread here: another worker would
        run the same step beside it."""
        if self._released:
            return
        self._released = True
        state = self.state
        if state is not None and state.threads:
            log.info(
                "run %s: waiting for %d step(s) running in threads before handing it back",
                self.claim.run_id,
                len(state.threads),
                extra=self.extra,
            )
            await state.threads_ended()
        self.ending = True
        with contextlib.suppress(DatabaseUnavailable):
            await self.store.release(self.claim.run_id, self.claim.attempt)

    async def _pause(self, error: NonDeterminismError) -> None:
        level = logging.DEBUG if self.execution.replay_only else logging.ERROR
        log.log(level, "%s", error, extra=self.extra)
        await self._finish("paused", error=ErrorInfo.from_exception(error).to_json())


async def _call(spec: FunctionSpec, args: tuple[Any, ...]) -> Any:
    return await spec.fn(*args)
