"""Scheduled and delayed starts: a cron schedule, a reminder sent later, a report at a set time.

    python examples/schedules.py
    durable schedules list          # from another shell: the schedule and its next tick

Every worker of the app keeps the schedule, and each tick starts exactly one run however many
workers run. After a time with no worker at all, the latest missed tick runs once (not a storm).
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import durable

app = durable.App()


@app.function(name="sync_inventory")
async def sync_inventory(ctx: durable.Context, warehouse: str) -> str:
    moment = await ctx.now()
    return f"{warehouse} synced at {moment:%H:%M:%S}"


# Every two seconds here; "0 3 * * *" with timezone="Europe/Berlin" would be 3 a.m. Berlin time.
app.schedule(sync_inventory, cron="*/2 * * * * *", input="berlin-1", name="inventory-sync")


@app.function(name="send_reminder")
async def send_reminder(ctx: durable.Context, user: str) -> str:
    return f"reminded {user} at {await ctx.now():%H:%M:%S}"


async def main() -> list[datetime]:
    async with app:
        worker = asyncio.create_task(app.run_worker())
        asked = datetime.now(UTC)
        reminder = await app.start(send_reminder, "ada", delay=timedelta(seconds=1))
        report = await app.start(send_reminder, "grace", start_at=asked + timedelta(seconds=2))
        print(await reminder.result(timeout=30))
        print(await report.result(timeout=30))
        while len(ticks := await app.list_runs(status="completed", limit=100)) < 5:  # noqa: ASYNC110
            await asyncio.sleep(0.2)
        [schedule] = await app.list_schedules()
        print(f"schedule {schedule.name} ({schedule.cron}): next tick {schedule.next_tick}")
        app.stop_workers()
        await worker
    synced = sorted((tick_of(t), str(t.result)) for t in ticks if t.function == "sync_inventory")
    for tick, line in synced:
        print(f"tick {tick:%H:%M:%S}: {line}")
    return [tick for tick, _line in synced]


def tick_of(run: durable.RunInfo) -> datetime:
    """The tick a scheduled run was started for: its idempotency key is
    ``schedule:<name>:<tick>``, the same for every worker that fires the tick."""
    assert run.idempotency_key is not None
    return datetime.fromisoformat(run.idempotency_key.split(":", 2)[2])


if __name__ == "__main__":
    asyncio.run(main())
