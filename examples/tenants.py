"""Multi-tenant report generation: per-tenant fairness and one shared API rate limit.

    python examples/tenants.py

Tenant "acme" queues 24 reports before "globex" and "initech" queue 4 each. Each tenant may
run at most two reports at once (a concurrency key), and every report makes model calls under
one rate limit shared by all tenants and all workers (8 calls per second). Keys are served in
turn, so the small tenants finish long before acme's backlog does, and the limit holds however
many workers run: both are enforced in Postgres, not in one process's memory.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from pydantic import BaseModel

import durable

app = durable.App(short_wait=timedelta(seconds=1))
app.rate_limit("model-api", limit=8, period=timedelta(seconds=1))


class Report(BaseModel):
    tenant: str
    number: int


@durable.step(rate_limit="model-api", retries=2)
async def summarise(tenant: str, section: str) -> str:
    await asyncio.sleep(0.01)  # the model call
    return f"{tenant}: summary of {section}"


@app.function(
    name="tenant_report",
    concurrency=durable.Concurrency(key=lambda report: report.tenant, limit=2),
)
async def tenant_report(ctx: durable.Context, report: Report) -> str:
    parts = [
        await ctx.step(f"summarise {section}", summarise, report.tenant, section)
        for section in ("sales", "costs")
    ]
    return f"report {report.number} for {report.tenant}: {len(parts)} sections"


async def main() -> dict[str, float]:
    """Queue the reports, run two workers, and return how long after the first start each
    tenant's last report ended, in seconds."""
    reports = [Report(tenant="acme", number=i) for i in range(24)]
    reports += [Report(tenant=t, number=i) for t in ("globex", "initech") for i in range(4)]
    async with app:
        handles = await app.start_many(tenant_report, reports)
        workers = [asyncio.create_task(app.run_worker(concurrency=8)) for _ in range(2)]
        for handle in handles:
            await handle.result(timeout=120)
        app.stop_workers()
        await asyncio.gather(*workers)
        infos = [await handle.info() for handle in handles]
    began = min(info.created_at for info in infos)
    finished: dict[str, float] = {}
    for report, info in zip(reports, infos, strict=True):
        assert info.finished_at is not None
        done = (info.finished_at - began).total_seconds()
        finished[report.tenant] = max(finished.get(report.tenant, 0.0), done)
    for tenant, seconds in sorted(finished.items(), key=lambda item: item[1]):
        print(f"{tenant:8} last report done after {seconds:5.2f}s")
    print(f"{len(reports)} reports, {2 * len(reports)} model calls at 8 per second")
    return finished


if __name__ == "__main__":
    asyncio.run(main())
