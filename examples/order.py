"""An order: charge the card, ship, and refund (a compensation) when shipping fails.

    python examples/order.py

The shipping step is retried with backoff; when its retries run out the failure is journaled
and raised as StepFailed, so the refund runs exactly once, also after a crash and replay.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from pydantic import BaseModel

import durable

app = durable.App()


class Order(BaseModel):
    order_id: str
    card: str
    cents: int
    address: str


class Receipt(BaseModel):
    charge_id: str
    cents: int


async def charge(card: str, cents: int) -> Receipt:
    print(f"  -> charge {cents} cents to {card}")
    return Receipt(charge_id=f"ch_{card[-4:]}", cents=cents)


@durable.step(retries=2, backoff=durable.Backoff(initial=timedelta(milliseconds=200)))
async def ship(order_id: str, address: str) -> str:
    print(f"  -> ship {order_id} to {address}")
    if not address.strip():
        raise ValueError(f"order {order_id} has no shipping address")
    return f"tracking-{order_id}"


async def refund(receipt: Receipt) -> str:
    print(f"  -> refund {receipt.charge_id} ({receipt.cents} cents)")
    return f"re_{receipt.charge_id}"


@app.function(name="order")
async def place_order(ctx: durable.Context, order: Order) -> dict[str, str]:
    receipt = await ctx.step("charge", charge, order.card, order.cents)
    try:
        tracking = await ctx.step("ship", ship, order.order_id, order.address)
    except durable.StepFailed as failure:
        refund_id = await ctx.step("refund", refund, receipt)
        return {"status": "refunded", "refund": refund_id, "reason": failure.error.message}
    return {"status": "shipped", "tracking": tracking}


async def main() -> None:
    async with app:
        worker = asyncio.create_task(app.run_worker())
        good = await app.start(
            place_order,
            Order(order_id="o-1", card="4242424242424242", cents=1999, address="1 Main St"),
        )
        bad = await app.start(
            place_order, Order(order_id="o-2", card="4000000000000002", cents=500, address=" ")
        )
        print("o-1:", await good.result(timeout=60))
        print("o-2:", await bad.result(timeout=60))
        app.stop_workers()
        await worker


if __name__ == "__main__":
    asyncio.run(main())
