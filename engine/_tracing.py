"""OpenTelemetry spans for run attempts and executed steps, through opentelemetry-api only.

The starter's trace context is stored with the run, and every attempt's span is parented on
it, so one trace follows a run across crashes, sleeps and resumes.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator

from opentelemetry import context, propagate, trace

_tracer = trace.get_tracer("durable")


def current_carrier() -> dict[str, str] | None:
    """The caller's trace context as a dict to store with a run (None outside any trace)."""
    if not context.get_current():  # nothing set, nothing to carry: no propagator call per start
        return None
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier or None


def _recording() -> bool:
    """Whether the process has set a tracer provider (an SDK): without one, every span is a
    no-op that only carries its parent's context along."""
    provider = trace.get_tracer_provider()
    return not isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider)


@contextlib.contextmanager
def run_span(
    run_id: uuid.UUID, function: str, attempt: int, carrier: dict[str, str] | None
) -> Iterator[trace.Span]:
    if not carrier and not _recording():  # no span to record, no context to carry
        yield trace.INVALID_SPAN
        return
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


def step_span(
    run_id: uuid.UUID, function: str, step: str, position: str, attempt: int
) -> contextlib.AbstractContextManager[trace.Span]:
    """A step's span, opened only in an attempt whose run span records (``RunState.traced``):
    without a tracer provider a no-op span would only carry the run's context, already
    current."""
    return _tracer.start_as_current_span(
        f"durable.step {step}",
        attributes={
            "durable.run_id": str(run_id),
            "durable.function": function,
            "durable.step": step,
            "durable.position": position,
            "durable.step_attempt": attempt,
        },
    )
