"""Transactional start: the order row and its fulfilment run commit together, or neither does.

    python examples/checkout.py

``app.start(..., connection=conn)`` stores the run in your transaction on your own asyncpg
connection: no fulfilment for an order that rolled back, and no order without its fulfilment,
with no outbox table to poll.
"""

from __future__ import annotations

import asyncio

import asyncpg

import durable

app = durable.App()


@app.function(name="fulfil")
async def fulfil(ctx: durable.Context, order_id: int) -> str:
    return await ctx.step("pick and pack", lambda: f"order {order_id} packed")


async def place(conn: asyncpg.Connection, order_id: int, *, fail: bool) -> None:
    async with conn.transaction():
        await conn.execute("INSERT INTO shop_orders (id) VALUES ($1)", order_id)
        await app.start(fulfil, order_id, connection=conn, idempotency_key=f"order-{order_id}")
        if fail:
            raise RuntimeError(f"payment declined for order {order_id}")


async def main() -> dict[str, int]:
    async with app:
        assert app.database_url is not None
        conn = await asyncpg.connect(app.database_url)
        try:
            await conn.execute("CREATE TABLE IF NOT EXISTS shop_orders (id integer PRIMARY KEY)")
            await conn.execute("TRUNCATE shop_orders")
            await place(conn, 1, fail=False)
            try:
                await place(conn, 2, fail=True)
            except RuntimeError as exc:
                print(f"rolled back: {exc}")
            orders = await conn.fetchval("SELECT count(*) FROM shop_orders")
        finally:
            await conn.close()
        worker = asyncio.create_task(app.run_worker())
        runs = [r for r in await app.list_runs() if r.function == "fulfil"]
        for run in runs:
            print(await app.get_run(run.run_id).result(timeout=30))
        app.stop_workers()
        await worker
    print(f"{orders} order stored, {len(runs)} fulfilment run started")
    return {"orders": orders, "runs": len(runs)}


if __name__ == "__main__":
    asyncio.run(main())
