"""Every error durable raises, in one hierarchy.

::

    DurableError
    ├── ConfigurationError            bad URL, unknown function, unusable embedded Postgres
    │   └── EmbeddedPostgresError     the embedded server could not be found or started
    ├── DatabaseUnavailable           the database could not be reached (now, or in time)
    ├── DatabaseError                 the database refused a statement (``sqlstate`` says why)
    ├── InvalidInput                  a run's input or an event payload failed validation
    │   └── PayloadTooLarge           a value's JSON exceeds the app's ``max_payload_bytes``
    ├── SerializationError            a value could not be stored as JSON
    ├── NonDeterminismError           code asked for something else than the journal holds
    ├── JournalConflict               a journal position was written twice (an engine fault)
    ├── StepFailed                    a step ran out of retries (raised inside the function)
    ├── RunFailed                     a run ended in failure (raised by ``RunHandle.result``)
    │   └── RunCancelled              the run was cancelled
    ├── RunNotFound                   no run has that id
    └── ResultTimeout                 ``RunHandle.result(timeout=...)`` elapsed; a TimeoutError

Driver errors never reach callers as they are: the store turns them into these (the
``DatabaseUnavailable``, ``SerializationError`` or ``DatabaseError`` each stands for,
``engine._driver``), with the asyncpg error kept as ``__cause__``. The signals the engine uses to
unwind a run when it suspends or loses its lease are not errors: they derive from
``BaseException`` (see ``engine._signals``) so that ``except Exception`` cannot swallow them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ErrorInfo:
    """A recorded failure: the exception's type name, its message, and where it was raised."""

    type: str
    message: str
    module: str = ""
    traceback: str = ""

    def to_json(self) -> dict[str, str]:
        return {
            "type": self.type,
            "message": self.message,
            "module": self.module,
            "traceback": self.traceback,
        }

    @classmethod
    def from_json(cls, data: Any) -> ErrorInfo:
        if not isinstance(data, dict):
            return cls(type="Error", message=str(data))
        return cls(
            type=str(data.get("type", "Error")),
            message=str(data.get("message", "")),
            module=str(data.get("module", "")),
            traceback=str(data.get("traceback", "")),
        )

    @classmethod
    def from_exception(cls, exc: BaseException, traceback: str = "") -> ErrorInfo:
        kind = type(exc)
        return cls(
            type=kind.__qualname__,
            message=str(exc),
            module=kind.__module__,
            traceback=traceback,
        )


class DurableError(Exception):
    """Root of every error raised by durable."""


class ConfigurationError(DurableError):
    """The App, a function registration or the environment is set up wrongly."""


class EmbeddedPostgresError(ConfigurationError):
    """The embedded PostgreSQL server could not be located, started or reached."""


class DatabaseUnavailable(DurableError):
    """The database could not be reached: a connection refused or dropped, a server restarting
    (a call may succeed later), or no connection within the time allowed."""


class DatabaseError(DurableError):
    """The database refused a statement for a reason other than a value it cannot store: an
    engine fault, or a database that is not durable's. ``sqlstate`` is PostgreSQL's code."""

    def __init__(self, message: str, sqlstate: str | None = None) -> None:
        self.sqlstate = sqlstate
        super().__init__(message if sqlstate is None else f"{message} (SQLSTATE {sqlstate})")


class InvalidInput(DurableError):
    """A run's input, or an event's payload, failed validation. Nothing was stored."""


class SerializationError(DurableError):
    """A value (step result, run result, input) could not be converted to JSON."""


class PayloadTooLarge(InvalidInput):
    """A value (input, event payload, step or run result) is larger, as JSON, than the app's
    ``max_payload_bytes``. Store large data elsewhere and pass a reference."""


class JournalConflict(DurableError):
    """A write to a journal position that already holds an entry. Never expected: the engine
    writes each position once per claim, and a fenced claim cannot write at all."""


class NonDeterminismError(DurableError):
    """The function asked for a different journal entry than the one recorded.

    Raised at the first journaled position where the code and the journal disagree. The run is
    paused: the first worker of another version of its function to start tries it again (a
    deploy that fixes the code, with ``ctx.patched``, resumes it); ``durable runs resume RUN_ID``
    tries it again at once.
    """

    def __init__(
        self,
        run_id: str,
        position: str,
        recorded: str,
        requested: str,
    ) -> None:
        self.run_id = run_id
        self.position = position
        self.recorded = recorded
        self.requested = requested
        super().__init__(
            f"run {run_id}: non-deterministic code at journal position {position}: "
            f"recorded {recorded}, code requested {requested}. The run is paused until a worker "
            f"of another version of the code starts (deploy a fix behind ctx.patched) or "
            f"`durable runs resume {run_id}`."
        )


class StepFailed(DurableError):
    """A step's retries ran out. Carries the original error's type and message.

    Raised inside the durable function, identically when the failure is replayed from the
    journal, so ``try/except StepFailed`` around a step (a compensation) behaves the same before
    and after a crash.
    """

    def __init__(self, step: str, error: ErrorInfo) -> None:
        self.step = step
        self.error = error
        super().__init__(f"step {step!r} failed: {error.type}: {error.message}")


class RunFailed(DurableError):
    """A run ended in failure; ``error`` holds the type and message of what escaped it."""

    def __init__(self, run_id: str, error: ErrorInfo) -> None:
        self.run_id = run_id
        self.error = error
        super().__init__(f"run {run_id} failed: {error.type}: {error.message}")


class RunCancelled(RunFailed):
    """A run was cancelled (``RunHandle.cancel``, ``durable runs cancel``, its parent's
    cancellation, or a concurrency strategy); ``error.message`` says why."""

    def __init__(self, run_id: str, error: ErrorInfo) -> None:
        self.run_id = run_id
        self.error = error
        DurableError.__init__(self, f"run {run_id} was cancelled: {error.message}")


class RunNotFound(DurableError):
    """No run has the given id."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        super().__init__(f"no run with id {run_id}")


class ResultTimeout(DurableError, TimeoutError):
    """The run did not finish within the timeout given to ``RunHandle.result``."""
