"""The durable runtime: store and SQL, journal, replay, claiming, leases, timers, the worker.

Users import ``durable``; this package never imports it.
"""

from __future__ import annotations

from engine._clock import Clock, DatabaseTime, SystemClock
from engine._codec import dump, load, return_type, validate_input
from engine._context import Context
from engine._listener import Listener
from engine._registry import POLICY_ATTRIBUTE, Backoff, FunctionSpec, StepPolicy
from engine._store import TRANSIENT_ERRORS, JournalEntry, RunRow, RunStatus, Store, WaitRow
from engine._tracing import current_carrier
from engine._worker import Worker, WorkerOptions

__all__ = [
    "POLICY_ATTRIBUTE",
    "TRANSIENT_ERRORS",
    "Backoff",
    "Clock",
    "Context",
    "DatabaseTime",
    "FunctionSpec",
    "JournalEntry",
    "Listener",
    "RunRow",
    "RunStatus",
    "StepPolicy",
    "Store",
    "SystemClock",
    "WaitRow",
    "Worker",
    "WorkerOptions",
    "current_carrier",
    "dump",
    "load",
    "return_type",
    "validate_input",
]
