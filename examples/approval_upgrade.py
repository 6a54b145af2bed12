"""An approval flow that gains a step while runs wait on it.

Release 1 asks a reviewer and waits for the decision. Release 2 checks the budget before
asking, behind ``ctx.patched("budget-check")``: a run that was already waiting when release 2
was deployed went past that point without the check, so it takes the old branch on every
replay; a run that reaches the point on release 2 takes the new one. Without the patch, the
waiting runs would pause with a NonDeterminismError when their decision arrived.

    python examples/approval_upgrade.py

It runs both releases on one database: release 1's worker starts doc-1, ``check_runs`` replays
doc-1 on release 2's code (what ``durable check examples.approval_upgrade:release_2`` does before
a deploy), release 1's worker stops and release 2's starts, doc-2 starts, and both finish.
Once no run needs the old branch (``durable versions``), release 3 replaces the ``if`` with
``await ctx.deprecate_patch("budget-check")`` and the check step alone.
"""

from __future__ import annotations

import asyncio

from pydantic import BaseModel

import durable
from durable.testing import check_runs

release_1 = durable.App(version="release-1")
release_2 = durable.App(version="release-2")


class Document(BaseModel):
    doc_id: str
    reviewer: str
    cost: int


async def notify(who: str, text: str) -> None:
    print(f"  -> notify {who}: {text}")


async def check_budget(cost: int) -> bool:
    return cost <= 10_000


@release_1.function(name="approval")
async def approval_1(ctx: durable.Context, doc: Document) -> str:
    await ctx.step("ask", notify, doc.reviewer, f"please review {doc.doc_id}")
    approved = await ctx.wait_for_event("decision", key=doc.doc_id)
    verdict = "approved" if approved else "rejected"
    await ctx.step("inform", notify, "author", f"{doc.doc_id} {verdict}")
    return verdict


@release_2.function(name="approval")
async def approval_2(ctx: durable.Context, doc: Document) -> str:
    if await ctx.patched("budget-check"):
        within = await ctx.step("budget", check_budget, doc.cost)
        if not within:
            return "over budget"
    await ctx.step("ask", notify, doc.reviewer, f"please review {doc.doc_id}")
    approved = await ctx.wait_for_event("decision", key=doc.doc_id)
    verdict = "approved" if approved else "rejected"
    await ctx.step("inform", notify, "author", f"{doc.doc_id} {verdict}")
    return verdict


async def main() -> None:
    async with release_1, release_2:
        worker = asyncio.create_task(release_1.run_worker())
        waiting = await release_1.start(
            approval_1, Document(doc_id="doc-1", reviewer="ana", cost=50_000)
        )
        while await waiting.status() != "suspended":  # noqa: ASYNC110 (a status in the database)
            await asyncio.sleep(0.05)
        print("doc-1 waits for its decision on release 1")

        report = await check_runs(release_2)
        print(f"check before deploying release 2:\n{report}")
        assert report.passed

        release_1.stop_workers()  # the deploy: release 1's worker goes, release 2's comes
        await worker
        worker = asyncio.create_task(release_2.run_worker())
        new = await release_2.start(approval_2, Document(doc_id="doc-2", reviewer="raj", cost=20))
        await release_2.send_event("decision", True, key="doc-1")
        await release_2.send_event("decision", True, key="doc-2")
        print("doc-1 (started on release 1, no budget check):", await waiting.result(timeout=60))
        print("doc-2 (started on release 2, budget checked):", await new.result(timeout=60))
        print("doc-1 ran on:", ", ".join((await waiting.info()).versions))
        release_2.stop_workers()
        await worker


if __name__ == "__main__":
    asyncio.run(main())
