"""OpenTelemetry spans for run attempts and executed steps, through opentelemetry-api only.

The starter's trace context is stored with the run, and every attempt's span is parented on
it, so one trace follows a run across crashes, sleeps and resumes.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from opentelemetry import propagate, trace

_tracer = trace.get_tracer("durable")


def current_carrier() -> dict[str, str] | None:
    """The caller's trace context as a dict to store with a run (None outside any trace)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier or None


@contextmanager
def run_span(
    run_id: uuid.UUID, function: str, attempt: int, carrier: dict[str, str] | None
) -> Iterator[trace.Span]:
    parent = propagate.extract(carrier or {})
    with _tracer.start_as_current_span(
        f"durable.run {function}",
        context=parent,
        kind=trace.SpanKind.CONSUMER,
        attributes={
            "durable.run_id": str(run_id),
            "durable.function": function,
            "durable.attempt": attempt,
        },
    ) as span:
        yield span


@contextmanager
def step_span(
    run_id: uuid.UUID, function: str, step: str, position: str, attempt: int
) -> Iterator[trace.Span]:
    with _tracer.start_as_current_span(
        f"durable.step {step}",
        attributes={
            "durable.run_id": str(run_id),
            "durable.function": function,
            "durable.step": step,
            "durable.position": position,
            "durable.step_attempt": attempt,
        },
    ) as span:
        yield span
