"""durable: durable execution for Python on Postgres.

A durable function is a plain ``async def`` that calls ``ctx.step``, ``ctx.sleep`` and
``ctx.wait_for_event``. Every outcome is journaled in Postgres; after a crash, a deploy or a
week-long sleep, the function is replayed from its journal and continues where it stopped.

::

    import durable

    app = durable.App()

    @durable.step(retries=3)
    async def send_email(to: str, template: str) -> str: ...

    @app.function()
    async def onboarding(ctx: durable.Context, signup: Signup) -> dict:
        await ctx.step("welcome", send_email, signup.email, "welcome")
        await ctx.sleep(timedelta(days=3))
        ...
"""

from __future__ import annotations

from durable._app import App
from durable._client import VersionCount
from durable._handle import RunHandle, RunInfo
from durable._reads import Capacity
from durable._step import step
from engine import (
    Backoff,
    ChildRun,
    Concurrency,
    Context,
    JournalEntry,
    RunFilter,
    RunStatus,
    StepPolicy,
)
from engine.errors import (
    ConfigurationError,
    DatabaseError,
    DatabaseUnavailable,
    DurableError,
    EmbeddedPostgresError,
    ErrorInfo,
    InvalidInput,
    JournalConflict,
    NonDeterminismError,
    PayloadTooLarge,
    ResultTimeout,
    RunCancelled,
    RunFailed,
    RunNotFound,
    SerializationError,
    StepFailed,
)

__all__ = [
    "App",
    "Backoff",
    "Capacity",
    "ChildRun",
    "Concurrency",
    "ConfigurationError",
    "Context",
    "DatabaseError",
    "DatabaseUnavailable",
    "DurableError",
    "EmbeddedPostgresError",
    "ErrorInfo",
    "InvalidInput",
    "JournalConflict",
    "JournalEntry",
    "NonDeterminismError",
    "PayloadTooLarge",
    "ResultTimeout",
    "RunCancelled",
    "RunFailed",
    "RunFilter",
    "RunHandle",
    "RunInfo",
    "RunNotFound",
    "RunStatus",
    "SerializationError",
    "StepFailed",
    "StepPolicy",
    "VersionCount",
    "step",
]
