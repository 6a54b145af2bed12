"""The worker loop: claim due runs, execute them, keep their leases, recover from outages.

A worker claims at most ``concurrency`` runs at a time. A suspended run holds no slot. Work is
found by LISTEN/NOTIFY first; the worker also wakes for the earliest known timer and polls every
``poll_interval`` as a safety net.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta

from engine import _limits, _lineage, _metrics
from engine._clock import Clock, DatabaseTime, SystemClock
from engine._listener import Listener
from engine._records import Claim, NewRun, Store
from engine._registry import CodeVersions, FunctionSpec
from engine._run_state import Execution
from engine._runner import Runner
from engine.errors import ConfigurationError, DatabaseUnavailable

log = logging.getLogger(__name__)

_MIN_WAIT = 0.005
# A timer due within this (or short_wait, if shorter) is claimed that much ahead and waits in
# its worker, so it is not late by a claim's round trip and a journal load; the run holds its
# slot for that long.
_CLAIM_AHEAD = timedelta(milliseconds=50)


@dataclass(frozen=True)
class WorkerOptions:
    """How a worker runs. Durations are timedeltas; a value out of range raises
    ConfigurationError."""

    concurrency: int = 10
    lease: timedelta = timedelta(seconds=30)
    poll_interval: timedelta = timedelta(seconds=2)
    short_wait: timedelta = timedelta(milliseconds=250)
    shutdown_grace: timedelta = timedelta(seconds=10)
    max_payload_bytes: int | None = None
    worker_id: str = field(default_factory=lambda: f"worker-{uuid.uuid4()}")

    def __post_init__(self) -> None:
        _limits.count(self.concurrency, "worker: concurrency", ConfigurationError)
        for what, positive in [
            ("lease", True),
            ("poll_interval", True),
            ("short_wait", False),
            ("shutdown_grace", False),
        ]:
            _limits.duration(
                getattr(self, what),
                f"worker: {what}",
                error=ConfigurationError,
                negative=False,
                zero=not positive,
            )
        _limits.name(self.worker_id, "worker: the worker id", ConfigurationError)


class Worker:
    def __init__(
        self,
        store: Store,
        functions: Mapping[str, FunctionSpec],
        listener: Listener,
        options: WorkerOptions,
        *,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        registry: Mapping[str, FunctionSpec] | None = None,
    ) -> None:
        self.store = store
        self.functions = dict(functions)
        self.code = CodeVersions.of(self.functions)
        self._code_of = {name: self.code.of_one(name) for name in self.functions}
        _metrics.declare(self.functions)
        # Every function of the app, served here or not: what a run may start as a child.
        self.registry = dict(registry or functions)
        self.listener = listener
        self.options = options
        self.clock = clock or SystemClock()
        self.db_time = DatabaseTime(self.clock)
        self.execution = Execution(
            store,
            self.registry,
            self.db_time,
            short_wait=options.short_wait.total_seconds(),
            rng=rng or random.SystemRandom(),
            max_payload_bytes=options.max_payload_bytes,
            ends_together=lambda: self._claim_limit if self._full else None,
        )
        self.active: dict[uuid.UUID, tuple[Runner, asyncio.Task[None]]] = {}
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None  # set while run() claims
        self._reserved = 0  # slots held for eager starts in flight
        self._claiming = 0  # slots a claim in flight may fill
        # The last claim left no slot free, so due runs may be waiting for one: a run that
        # ends then wakes the loop to claim again (else only a notification or a timer does),
        # and a claim's worth of ends go to the database at once (Execution.ends_together)
        # rather than spaced.
        self._full = False
        self._ahead = min(_CLAIM_AHEAD, options.short_wait)
        # A claim takes at most half the slots (rounded up): under a full queue one half's
        # claim or ends are then in the database while the other half runs. With every slot
        # in one claim the worker claimed, ran and ended its runs by turns, and both the
        # database and the process waited for each other half the time.
        self._claim_limit = -(-options.concurrency // 2)

    def stop(self) -> None:
        """Ask the worker to stop claiming and shut down gracefully."""
        self._stopping.set()
        self._wake.set()

    @property
    def free_slots(self) -> int:
        return self.options.concurrency - len(self.active) - self._reserved - self._claiming

    def can_start(self, function: str) -> bool:
        """Whether ``start_here`` may claim a run of ``function`` now: this worker serves it,
        claims, and has a slot free, on the caller's event loop."""
        return (
            function in self.functions
            and self.free_slots > 0
            and not self._stopping.is_set()
            and self._loop is asyncio.get_running_loop()
        )

    def attempt_here(self, run_id: uuid.UUID) -> asyncio.Task[None] | None:
        """The task of the attempt of ``run_id`` this worker runs now, if it runs one on the
        caller's event loop: it ends when the attempt does (its end written, the run
        suspended, handed back or lost)."""
        if self._loop is not asyncio.get_running_loop():
            return None
        found = self.active.get(run_id)
        return None if found is None else found[1]

    async def start_here(self, run: NewRun) -> tuple[uuid.UUID, bool] | None:
        """Start ``run`` (built by ``engine.new_run``) and, when nothing stands between it and
        a worker, claim it in the same round trip and run it here at once: an eager start,
        with no notification and no claim. Returns the run's id and whether it was created;
        None when this worker cannot take a run of its function now (``can_start``), and the
        caller starts it the usual way. A lost connection is raised (DatabaseUnavailable)
        and the caller starts the run the usual way, which finds it if it was created."""
        if not self.can_start(run.function):
            return None
        code = self._code_of[run.function]
        self._reserved += 1
        try:
            found, created, claim = await self.store.start_claimed(
                run,
                self.options.worker_id,
                self.options.lease,
                code.names,
                code.versions,
                code.pinned,
            )
        finally:
            self._reserved -= 1
        if claim is not None:
            self.db_time.observe(claim.db_now)
            if self._loop is None:  # stopped meanwhile: back to the queue, for any worker
                await self.store.release(claim.run_id, claim.attempt)
            else:
                self._start(claim)
        return found, created

    async def run(self) -> None:
        if not self.functions:
            log.warning("worker %s has no functions registered", self.options.worker_id)
        loop = asyncio.get_running_loop()
        _lineage.install(loop)
        unsubscribe = self.listener.subscribe("durable_work", lambda _p: self._wake.set())
        stop_cancels = self.listener.subscribe("durable_cancel", self._on_cancel)
        renewer = loop.create_task(self._renew_leases(), context=_lineage.detached_context())
        self._loop = loop
        log.info(
            "worker %s serving %d functions with concurrency %d",
            self.options.worker_id,
            len(self.functions),
            self.options.concurrency,
        )
        try:
            await self._retry_paused()
            while not self._stopping.is_set():
                timeout = await self._claim_due()
                await self._wait(timeout)
        finally:
            self._loop = None
            unsubscribe()
            stop_cancels()
            try:
                await self._shut_down()  # leases are renewed until every run is handed back
            finally:
                renewer.cancel()

    async def _retry_paused(self) -> None:
        """Try again the runs a non-determinism paused on other versions of the code this
        worker runs: a deploy that fixes the code resumes them, once per version."""
        try:
            count = await self.store.retry_paused(self.code.names, self.code.versions)
        except DatabaseUnavailable as exc:
            log.warning("retrying paused runs failed (%s); they stay paused", exc)
            return
        if count:
            log.info(
                "worker %s: trying %d paused run(s) again on this code",
                self.options.worker_id,
                count,
            )

    async def _claim_due(self) -> float:
        """Claim what is due; returns how long to wait before looking again."""
        code = self.code
        poll = self.options.poll_interval.total_seconds()
        due, db_now = None, None
        # What woke the loop is answered now; with no slot free it is answered when one frees
        # (a run's end wakes a full worker), and a wake left set would make _wait spin.
        self._wake.clear()
        try:
            while (
                not self._stopping.is_set()
                and (free := min(self.free_slots, self._claim_limit)) > 0
            ):
                self._wake.clear()
                self._claiming = free
                try:
                    claims, due, db_now = await self.store.claim_due(
                        code.names,
                        free,
                        self.options.worker_id,
                        self.options.lease,
                        code.versions,
                        code.pinned,
                        self._ahead,
                    )
                finally:
                    self._claiming = 0
                # Read as the claim arrives: a runner that began later would take the
                # database's time to be that much earlier, and wake its timer that much late.
                self.db_time.observe(db_now)
                for claim in claims:
                    self._start(claim)
                if len(claims) < free:
                    break
        except DatabaseUnavailable as exc:
            log.warning("claiming failed (%s); retrying", exc)
            return min(poll, 1.0)
        finally:
            self._full = self.free_slots <= 0
        if self._full or due is None or db_now is None:
            return poll
        # A due run that the claim skipped is locked by another worker for a moment; a short
        # floor keeps this loop from spinning on it (a notification still wakes it at once).
        return max(_MIN_WAIT, min(poll, (due - db_now - self._ahead).total_seconds()))

    async def _wait(self, timeout: float) -> None:
        if timeout <= 0:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout)

    def _start(self, claim: Claim) -> None:
        runner = Runner(self.execution, claim, observed=True)
        task = asyncio.get_running_loop().create_task(
            self._execute(runner), context=_lineage.detached_context()
        )
        self.active[claim.run_id] = (runner, task)

    async def _execute(self, runner: Runner) -> None:
        run_id = runner.claim.run_id
        try:
            await runner.execute()
        except asyncio.CancelledError:
            raise
        except DatabaseUnavailable as exc:
            log.warning(
                "run %s: database unreachable during attempt %d (%s); the lease will expire "
                "and the run will be resumed",
                run_id,
                runner.claim.attempt,
                exc,
                extra={"run_id": str(run_id)},
            )
        except Exception:
            log.exception("run %s: engine error", run_id, extra={"run_id": str(run_id)})
        finally:
            self.active.pop(run_id, None)
            if self._full:
                self._wake.set()

    async def _renew_leases(self) -> None:
        interval = self.options.lease.total_seconds() / 3
        last_ok = self.clock.monotonic()
        while True:
            await asyncio.sleep(interval)
            if await self.renew_once():
                last_ok = self.clock.monotonic()
            elif self.clock.monotonic() - last_ok > self.options.lease.total_seconds():
                self._lose(list(self.active), "leases not renewed for a whole lease")

    async def renew_once(self) -> bool:
        """Extend the lease of every run this worker executes; a run whose claim has gone
        (another worker took it after this one stalled) is abandoned, one asked to cancel is
        cancelled. False when the database could not be reached."""
        held = [(run_id, r.claim.attempt) for run_id, (r, _t) in self.active.items()]
        try:
            kept = await self.store.renew_leases(held, self.options.worker_id, self.options.lease)
        except DatabaseUnavailable as exc:
            log.warning("lease renewal failed (%s)", exc)
            return False
        # A run this worker has just ended (its finish or suspend committed before the renewal
        # read it) is not renewed either; only one that is still executing has lost its claim.
        self._lose([run_id for run_id, _a in held if run_id not in kept], "lease lost")
        for run_id in (r for r, cancel in kept.items() if cancel):
            self._cancel(run_id)
        return True

    def _on_cancel(self, payload: str) -> None:
        with contextlib.suppress(ValueError):
            self._cancel(uuid.UUID(payload))

    def _cancel(self, run_id: uuid.UUID) -> None:
        entry = self.active.get(run_id)
        if entry is not None:
            entry[0].cancel()

    def _lose(self, run_ids: list[uuid.UUID], reason: str) -> None:
        for run_id in run_ids:
            entry = self.active.get(run_id)
            if entry is not None and not entry[0].ending:
                if reason == "lease lost":
                    _metrics.leases_lost.add(1, {"function": entry[0].claim.function})
                log.warning(
                    "run %s: %s; abandoning this attempt",
                    run_id,
                    reason,
                    extra={"run_id": str(run_id)},
                )
                entry[0].lose(reason)

    async def _shut_down(self) -> None:
        """Let the runs in flight finish within the grace period, then hand the others back.
        A run whose step body still runs in a thread keeps its lease until the body returns
        (a thread cannot be interrupted), so no other worker runs that step beside it."""
        if not self.active:
            return
        tasks = [t for _r, t in self.active.values()]
        _done, pending = await asyncio.wait(
            tasks, timeout=self.options.shutdown_grace.total_seconds()
        )
        if not pending:
            return
        runners = [r for r, t in self.active.values() if t in pending]
        for runner in runners:
            runner.hand_back("worker shutting down; the run is handed back")
        threads = sum(r.threads for r in runners)
        if threads:
            log.warning(
                "worker %s: %d step(s) still running in threads; their runs keep their leases "
                "until those steps return, then are handed back",
                self.options.worker_id,
                threads,
            )
        await asyncio.gather(*pending, return_exceptions=True)
        log.info("worker %s handed back %d runs at shutdown", self.options.worker_id, len(runners))
