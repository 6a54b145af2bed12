"""The two stores every contract test runs against, on one virtual clock."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from engine import MemoryStore, PostgresStore, Store, VirtualClock


@dataclass
class Subject:
    store: Store
    clock: VirtualClock


@pytest.fixture(params=["memory", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest) -> str | None:
    """None for the memory store, else the URL of a fresh database."""
    return None if request.param == "memory" else request.getfixturevalue("database_url")


@pytest.fixture
async def subject(backend: str | None) -> AsyncIterator[Subject]:
    clock = VirtualClock()
    store: Store
    if backend is None:
        store = MemoryStore(clock)
    else:
        store = await PostgresStore.connect(backend, max_size=4, clock=clock)
    yield Subject(store, clock)
    await store.close()
