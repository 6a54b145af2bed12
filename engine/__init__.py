"""The durable runtime: store and SQL, journal, replay, claiming, leases, timers, the worker.

Users import ``durable``; this package never imports it.
"""

from __future__ import annotations

from engine._children import ChildRun
from engine._clock import Clock, DatabaseTime, SystemClock, VirtualClock
from engine._codec import dump, load, prepare, return_type, validate_input
from engine._context import Context
from engine._listener import Listener
from engine._records import (
    FINAL_STATUSES,
    ChildOutcome,
    Claim,
    JournalEntry,
    NewRun,
    RunFilter,
    RunRow,
    RunStatus,
    ScheduleRow,
    Store,
    WaitRow,
)
from engine._registry import (
    POLICY_ATTRIBUTE,
    Backoff,
    CodeVersions,
    Concurrency,
    FunctionSpec,
    RunOptions,
    StepPolicy,
    new_run,
)
from engine._replay import JournalStore, ReplayResult, replay_journal
from engine._retention import Cleaner, Cleanup, SegmentRow
from engine._run_state import Checkpoint, Decision, Execution, Moment, Probe, RunState
from engine._runner import Runner
from engine._schedules import CatchUp, Schedule, Scheduler
from engine._store import PostgresStore
from engine._tracing import current_carrier
from engine._worker import Worker, WorkerOptions

__all__ = [
    "FINAL_STATUSES",
    "POLICY_ATTRIBUTE",
    "Backoff",
    "CatchUp",
    "Checkpoint",
    "ChildOutcome",
    "ChildRun",
    "Claim",
    "Cleaner",
    "Cleanup",
    "Clock",
    "CodeVersions",
    "Concurrency",
    "Context",
    "DatabaseTime",
    "Decision",
    "Execution",
    "FunctionSpec",
    "JournalEntry",
    "JournalStore",
    "Listener",
    "Moment",
    "NewRun",
    "PostgresStore",
    "Probe",
    "ReplayResult",
    "RunFilter",
    "RunOptions",
    "RunRow",
    "RunState",
    "RunStatus",
    "Runner",
    "Schedule",
    "ScheduleRow",
    "Scheduler",
    "SegmentRow",
    "StepPolicy",
    "Store",
    "SystemClock",
    "VirtualClock",
    "WaitRow",
    "Worker",
    "WorkerOptions",
    "current_carrier",
    "dump",
    "load",
    "new_run",
    "prepare",
    "replay_journal",
    "return_type",
    "validate_input",
]
