"""The app of the acceptance tests of code that changes under runs in flight, in worker
processes. ``$VARIANT`` picks the code a process runs, and names its version:

- ``v1``: the code the runs start on.
- ``v2``: v1 with a step added behind ``ctx.patched("risk-check")``, before the decision.
- ``v2-rename``: v1 with the step "notify" renamed "send-notice", without a patch (a bad deploy).
- ``v2-rename-patched``: the same rename behind ``ctx.patched("rename-notify")`` (its fix).

Every step body appends the variant that ran it to ``$COUNTER_DIR/<run>:<step>``.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import durable

VARIANT = os.environ.get("VARIANT", "v1")

app = durable.App(
    version=VARIANT,
    lease=timedelta(seconds=2),
    poll_interval=timedelta(milliseconds=200),
    short_wait=timedelta(0),
)


def work(run: str, name: str) -> str:
    with open(Path(os.environ["COUNTER_DIR"]) / f"{run}:{name}", "a") as handle:
        handle.write(f"{VARIANT}\n")
    return name


@app.function(name="approval")
async def approval(ctx: durable.Context, run: str) -> list[str]:
    await ctx.wait_for_event("filed", key=run)  # position 0
    done = [await ctx.step("submit", work, run, "submit")]  # 1
    if VARIANT == "v2" and await ctx.patched("risk-check"):
        done.append(await ctx.step("risk-check", work, run, "risk-check"))
    decision: str = await ctx.wait_for_event("decision", key=run)  # 2
    if VARIANT == "v2-rename" or (
        VARIANT == "v2-rename-patched" and await ctx.patched("rename-notify")
    ):
        done.append(await ctx.step("send-notice", work, run, "send-notice"))
    else:
        done.append(await ctx.step("notify", work, run, "notify"))  # 3
    await ctx.wait_for_event("archive", key=run)  # 4
    done.append(await ctx.step("archive", work, run, "archive"))  # 5
    return [*done, decision]


@app.function(name="pinned_flow", versioning="pinned")
async def pinned_flow(ctx: durable.Context, run: str) -> str:
    await ctx.step("begin", work, run, "begin")
    await ctx.wait_for_event("go", key=run)
    await ctx.step("end", work, run, "end")
    return VARIANT


def numbered(run: str, i: int) -> int:
    work(run, f"step-{i}")
    if i == 4 and VARIANT == "v1" and run.startswith("bug"):
        raise RuntimeError("step 4 has a bug (fixed after v1)")
    return i * 10


@app.function(name="five")
async def five(ctx: durable.Context, run: str) -> list[int]:
    return [await ctx.step(f"step-{i}", numbered, run, i) for i in range(1, 6)]
