"""The app the acceptance tests run in separate worker processes.

Step bodies leave side-effect records in $COUNTER_DIR (one line per execution) and wait for gate
files in $GATE_DIR, so a test can kill a worker at a known point.
"""

from __future__ import annotations

import asyncio
import os
import time
from datetime import timedelta
from pathlib import Path

import durable

app = durable.App(
    lease=timedelta(seconds=float(os.environ.get("TEST_LEASE_SECONDS", "2"))),
    poll_interval=timedelta(milliseconds=200),
    short_wait=timedelta(0),
)

VARIANT = os.environ.get("VARIANT", "v1")


def record(name: str, value: object = "") -> None:
    with open(Path(os.environ["COUNTER_DIR"]) / name, "a") as handle:
        handle.write(f"{value}\n")


async def gate(name: str) -> None:
    path = Path(os.environ["GATE_DIR"]) / name
    while not path.exists():  # noqa: ASYNC110 (another process creates the file)
        await asyncio.sleep(0.02)


async def numbered(tag: str, i: int) -> int:
    record(f"{tag}-step-{i}", os.getpid())
    if i == 4:
        await gate(f"{tag}-go")
    return i * 10


@app.function(name="five_steps")
async def five_steps(ctx: durable.Context, tag: str) -> list[int]:
    return [await ctx.step(f"step-{i}", numbered, tag, i) for i in range(1, 6)]


async def stamp(tag: str) -> float:
    now = time.time()
    record(f"{tag}-after", now)
    return now


@app.function(name="napper")
async def napper(ctx: durable.Context, tag: str) -> float:
    await ctx.sleep(timedelta(seconds=2))
    return await ctx.step("after", stamp, tag)


async def work(tag: str) -> int:
    record(f"{tag}-work", os.getpid())
    await gate(f"{tag}-go")
    record(f"{tag}-work-done", os.getpid())
    return os.getpid()


@app.function(name="zombie")
async def zombie(ctx: durable.Context, tag: str) -> int:
    return await ctx.step("work", work, tag)


@app.function(name="drifting")
async def drifting(ctx: durable.Context, key: str) -> str:
    await ctx.step("charge" if VARIANT == "v1" else "charge-card", lambda: "charged")
    await ctx.wait_for_event("shipped", key=key)
    return VARIANT


async def loaded(tag: str, i: int, n: int, held: bool) -> int:
    load = tag.split("/")[0]
    # One line per execution, appended in one write (atomic for a short line with O_APPEND).
    record(f"{load}-executions", f"{tag} {i} {os.getpid()}")
    await asyncio.sleep(0.002)  # a window in which a kill lands between running and journaling
    if held:
        await gate(f"{load}-go")
    return i * n


@app.function(name="ten_steps")
async def ten_steps(ctx: durable.Context, job: dict[str, int | str | bool]) -> list[int]:
    """Ten steps, each recording its execution in `<load>-executions` (the load is the tag up to
    its first "/"). A job with "held" true waits in its last step, once that execution is
    recorded, for the gate `<load>-go`: its load cannot finish before the test opens it."""
    tag, n, held = str(job["tag"]), int(job["n"]), bool(job.get("held", False))
    return [await ctx.step(f"step-{i}", loaded, tag, i, n, held and i == 9) for i in range(10)]


# Zombie writes (tests/acceptance/test_fencing.py): each held_* function below reaches one write
# that durable.held_segment fences right after `hold`, which every attempt passes, replay included.


async def hold(tag: str) -> None:
    """Record that this process reached this point, then wait for its own gate, `{tag}-<pid>`:
    a test lets one worker through while another is held here. Called from a function's body,
    not from a step, so that the next thing a released worker does is the write that follows."""
    record(f"{tag}-held", os.getpid())
    await gate(f"{tag}-{os.getpid()}")


async def whose(tag: str, what: str) -> int:
    record(f"{tag}-{what}", os.getpid())
    return os.getpid()


@app.function(name="held_sleeper")
async def held_sleeper(ctx: durable.Context, tag: str) -> int:
    await hold(tag)
    await ctx.sleep(timedelta(milliseconds=500))
    return await ctx.step("after", whose, tag, "after")


@app.function(name="held_waiter")
async def held_waiter(ctx: durable.Context, tag: str) -> int:
    await hold(tag)
    await ctx.wait_for_event("parcel", key=tag)
    return await ctx.step("after", whose, tag, "after")


@app.function(name="kid")
async def kid(ctx: durable.Context, tag: str) -> int:
    return await ctx.step("kid", whose, tag, "kid")


@app.function(name="held_starter")
async def held_starter(ctx: durable.Context, tag: str) -> int:
    await hold(tag)
    await ctx.start(kid, tag)
    return await ctx.step("after", whose, tag, "after")


@app.function(name="held_joiner")
async def held_joiner(ctx: durable.Context, tag: str) -> list[int]:
    child = await ctx.start(kid, tag)
    await hold(tag)
    return [await child.result(), await ctx.step("after", whose, tag, "after")]
