"""A worker process's Prometheus endpoint (``durable worker --metrics-port``) after a known
load: every metric, by function or queue, with the value that load must give. The exposition
text is parsed with prometheus_client's own parser."""

from __future__ import annotations

import asyncio
import functools
import socket
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.acceptance import metrics_app
from tests.acceptance.conftest import Workers
from tests.helpers import status_is, until

pytestmark = pytest.mark.postgres

APP = "tests.acceptance.metrics_app:app"
SCOPE = ("otel_scope_name", "otel_scope_schema_url", "otel_scope_version")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _scrape(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample by name and labels (without the OpenTelemetry scope's)."""
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = frozenset((k, v) for k, v in sample.labels.items() if k not in SCOPE)
            samples[sample.name, labels] = sample.value
    return samples


def _value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples[name, frozenset(labels.items())]


async def test_a_scrape_reports_every_metric_of_a_known_load(
    workers: Workers, database_url: str
) -> None:
    port = _free_port()
    worker = workers.start(app=APP, args=("--metrics-port", str(port)))
    # Started by code that declares the functions: each run records its function's queue.
    app = metrics_app.app
    app.configure(database_url=database_url)
    async with app:
        oks = [await app.start("ok", i) for i in range(3)]
        broken = [await app.start("broken", i) for i in range(2)]
        paused = await app.start("pauser")
        slow = await app.start("slow")
        waiters = [await app.start("waiter", f"w{i}") for i in range(2)]
        holder = await app.start("holder")
        reports = [await app.start("report", i) for i in range(4)]
        for handle in oks:
            await handle.result(timeout=60)
        for handle in broken:
            await until(functools.partial(status_is, handle, "failed"), timeout=60)
        for handle in [*waiters, holder, paused]:
            await until(functools.partial(status_is, handle, "suspended"), timeout=60)
        await app.send_event("go")  # the pauser resumes by replay, and its step differs
        await until(functools.partial(status_is, paused, "paused"), timeout=60)
        await until(functools.partial(status_is, slow, "running"), timeout=60)
        assert await app.cancel_run(slow.run_id) == "requested"
        await until(functools.partial(status_is, slow, "cancelled"), timeout=60)
        async with httpx.AsyncClient(timeout=30) as client:
            response = await until(
                lambda: _reachable(client, f"http://127.0.0.1:{port}/metrics"),
                timeout=30,
                what="the metrics endpoint",
            )
        assert [await h.status() for h in reports] == ["pending"] * 4
    assert worker.poll() is None, workers.log_of(worker)
    samples = _scrape(response.text)

    started = {"ok": 3, "broken": 2, "pauser": 1, "slow": 1, "waiter": 2, "holder": 1}
    for function, count in started.items():
        assert _value(samples, "durable_runs_started_total", function=function) == count
    ended = {
        "completed": {"ok": 3},
        "failed": {"broken": 2},
        "paused": {"pauser": 1},
        "cancelled": {"slow": 1},
    }
    for status, by_function in ended.items():
        for function in started:
            expected = by_function.get(function, 0)
            name = f"durable_runs_{status}_total"
            assert _value(samples, name, function=function) == expected, (status, function)
    # A function the worker does not serve (its queue) has no series of this worker's.
    assert ("durable_runs_started_total", frozenset({("function", "report")})) not in samples
    # One try per step: three that passed, two that failed (no retries).
    steps = "durable_step_duration_seconds_count"
    assert _value(samples, steps, function="ok", outcome="ok") == 3
    assert _value(samples, steps, function="broken", outcome="failed") == 2
    latency = "durable_run_start_latency_seconds_count"
    assert sum(_value(samples, latency, function=f) for f in started) == sum(started.values())
    attempts = "durable_attempt_duration_seconds_count"
    assert _value(samples, attempts, function="ok", outcome="completed") == 3
    assert _value(samples, attempts, function="pauser", outcome="suspended") == 1
    assert _value(samples, attempts, function="pauser", outcome="paused") == 1
    # What the database holds, read at the scrape.
    assert _value(samples, "durable_queue_pending", queue="reports") == 4
    assert _value(samples, "durable_queue_oldest_pending_age_seconds", queue="reports") > 0
    assert _value(samples, "durable_runs_suspended") == 3  # two waiters and the holder
    assert _value(samples, "durable_concurrency_slots_held", key="holder") == 1
    for function in started:
        assert _value(samples, "durable_leases_lost_total", function=function) == 0
    assert _value(samples, "durable_journal_conflicts_total") == 0


async def _reachable(client: httpx.AsyncClient, url: str) -> httpx.Response | None:
    try:
        response = await client.get(url)
    except httpx.TransportError:
        await asyncio.sleep(0)
        return None
    return response if response.status_code == 200 else None


def test_a_metrics_port_without_the_extra_or_taken_is_one_line(
    workers: Workers,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = workers.cli("worker", APP, "--metrics-port", str(port))
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr
