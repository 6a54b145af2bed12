"""The store every contract test runs against: PostgreSQL, on a virtual clock.

The rules are the SQL functions' (engine/sql/functions.sql), and only theirs: these tests
exercise them through ``PostgresStore`` with the database's clock moved by a ``VirtualClock``
(``durable.clock()`` honours the ``durable.fake_now`` setting the store sets on every call), so
leases lapse and timers fall due without sleeping. Each test gets an empty database from the
pool ``durable.testing`` keeps for its simulations (emptied in a few milliseconds, where a
database per test would cost a CREATE and a DROP).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from durable.testing import _databases
from engine import PostgresStore, VirtualClock


@dataclass
class Subject:
    store: PostgresStore
    clock: VirtualClock


@pytest.fixture
async def subject(server_url: str) -> AsyncIterator[Subject]:
    clock = VirtualClock()
    database = await _databases.lease(server_url)
    try:
        store = await PostgresStore.connect(database.url, max_size=4, clock=clock)
        try:
            if not database.fresh:
                await store.empty()
            yield Subject(store, clock)
        finally:
            await store.close()
    finally:
        database.release()
