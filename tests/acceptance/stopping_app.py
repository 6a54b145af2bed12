"""The app the shutdown tests run in worker processes: a sync step that holds its thread until
a gate file appears, recording in $COUNTER_DIR when each execution starts and ends."""

from __future__ import annotations

import os
import time
from datetime import timedelta
from pathlib import Path

import durable
from tests.acceptance.workflows import record

app = durable.App(
    lease=timedelta(seconds=float(os.environ.get("TEST_LEASE_SECONDS", "2"))),
    poll_interval=timedelta(milliseconds=200),
)


def hold_the_thread(tag: str) -> int:
    """A sync step (it runs in a thread, which nothing can interrupt): it waits for its gate."""
    record(f"{tag}-step", f"start {os.getpid()}")
    gate = Path(os.environ["GATE_DIR"]) / f"{tag}-go"
    while not gate.exists():
        time.sleep(0.02)
    record(f"{tag}-step", f"end {os.getpid()}")
    return os.getpid()


@app.function(name="sync_step")
async def sync_step(ctx: durable.Context, tag: str) -> int:
    return await ctx.step("hold", hold_the_thread, tag)
