"""Priorities and worker queues: urgent mail jumps the backlog, heavy work stays on its workers.

    python examples/queues.py
    # in production, one worker per kind of machine:
    durable worker examples.queues:app                    # the default queue (mail)
    durable worker examples.queues:app --queue reports    # the heavy reports

Among runnable runs the highest priority is claimed first, equal ones in arrival order. A
worker serves only the queues it is given, so a report never lands on a mail worker.
"""

from __future__ import annotations

import asyncio
import os

import durable

app = durable.App()
sent: list[str] = []


@app.function(name="send_mail")
async def send_mail(ctx: durable.Context, subject: str) -> None:
    await ctx.step("send", lambda: sent.append(subject))


@app.function(name="quarter_report", queue="reports")
async def quarter_report(ctx: durable.Context, quarter: str) -> str:
    return await ctx.step("build", lambda: f"{quarter} report built by process {os.getpid()}")


async def main() -> list[str]:
    async with app:
        mail_runs = [await app.start(send_mail, f"newsletter {i}") for i in range(10)]
        mail_runs.append(await app.start(send_mail, "password reset", priority=10))  # last
        report = await app.start(quarter_report, "Q3")
        mail = asyncio.create_task(app.run_worker(concurrency=1))
        reports = asyncio.create_task(app.run_worker(queues=["reports"]))
        print(await report.result(timeout=30))
        for run in mail_runs:
            await run.result(timeout=30)
        app.stop_workers()
        await asyncio.gather(mail, reports)
    print("mail in the order sent:", ", ".join(sent))
    return sent


if __name__ == "__main__":
    asyncio.run(main())
