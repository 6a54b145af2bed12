"""User onboarding: a welcome email, a trial of a few days, then a nudge unless they upgraded.

    python examples/onboarding.py           # trial and deadline in seconds, to watch it run

The run sleeps through the trial without holding a worker, and waits for the "upgraded" event
with a deadline; an upgrade sent at any time after the run started counts.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from pydantic import BaseModel

import durable

app = durable.App()


class Signup(BaseModel):
    user_id: str
    email: str
    trial: timedelta = timedelta(days=3)
    upgrade_window: timedelta = timedelta(days=4)


@durable.step(retries=3, backoff=durable.Backoff(initial=timedelta(seconds=1)))
async def send_email(to: str, template: str) -> str:
    print(f"  -> email {template!r} to {to}")
    return f"{template}:{to}"


@app.function(name="onboarding")
async def onboarding(ctx: durable.Context, signup: Signup) -> dict[str, bool]:
    await ctx.step("welcome", send_email, signup.email, "welcome")
    await ctx.sleep(signup.trial)
    upgraded = await ctx.wait_for_event(
        "upgraded", key=signup.user_id, timeout=signup.upgrade_window
    )
    if upgraded is None:
        await ctx.step("nudge", send_email, signup.email, "upgrade")
    return {"upgraded": upgraded is not None}


async def main() -> None:
    async with app:
        worker = asyncio.create_task(app.run_worker(concurrency=10))
        fast = {"trial": timedelta(seconds=1), "upgrade_window": timedelta(seconds=2)}
        ada = await app.start(
            onboarding,
            Signup(user_id="ada", email="ada@example.com", **fast),
            idempotency_key="signup-ada",
        )
        bob = await app.start(
            onboarding,
            Signup(user_id="bob", email="bob@example.com", **fast),
            idempotency_key="signup-bob",
        )
        await app.send_event("upgraded", {"plan": "pro"}, key="ada")
        print("ada:", await ada.result(timeout=60))
        print("bob:", await bob.result(timeout=60))
        app.stop_workers()
        await worker


if __name__ == "__main__":
    asyncio.run(main())
