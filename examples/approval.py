"""A document approval: ask a reviewer, wait for the decision with a deadline, escalate on
silence.

    python examples/approval.py
    # from another shell, while a run waits:
    durable events send decision --key doc-1 --payload '{"approved": true, "by": "ana"}'
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from pydantic import BaseModel

import durable

app = durable.App()


class Document(BaseModel):
    doc_id: str
    reviewer: str
    deadline: timedelta = timedelta(days=2)


class Decision(BaseModel):
    approved: bool
    by: str


async def notify(who: str, text: str) -> None:
    print(f"  -> notify {who}: {text}")


@app.function(name="approval")
async def approval(ctx: durable.Context, doc: Document) -> str:
    await ctx.step("ask", notify, doc.reviewer, f"please review {doc.doc_id}")
    payload = await ctx.wait_for_event("decision", key=doc.doc_id, timeout=doc.deadline)
    if payload is None:
        await ctx.step("escalate", notify, "manager", f"{doc.doc_id} had no decision in time")
        return "escalated"
    decision = Decision.model_validate(payload)
    verdict = "approved" if decision.approved else "rejected"
    await ctx.step("inform", notify, "author", f"{doc.doc_id} {verdict} by {decision.by}")
    return verdict


async def main() -> None:
    async with app:
        worker = asyncio.create_task(app.run_worker())
        quick = timedelta(seconds=2)
        decided = await app.start(
            approval, Document(doc_id="doc-1", reviewer="ana", deadline=quick)
        )
        silent = await app.start(approval, Document(doc_id="doc-2", reviewer="raj", deadline=quick))
        await app.send_event("decision", {"approved": True, "by": "ana"}, key="doc-1")
        print("doc-1:", await decided.result(timeout=60))
        print("doc-2:", await silent.result(timeout=60))
        app.stop_workers()
        await worker


if __name__ == "__main__":
    asyncio.run(main())
