"""The flow-control examples, run as a user runs them (their ``main``), on the test database."""

from __future__ import annotations

import itertools

import pytest

from examples import checkout, fan_out, queues, schedules, tenants, timeouts

pytestmark = pytest.mark.postgres


@pytest.fixture(autouse=True)
def _example_database(database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DURABLE_DATABASE_URL", database_url)


async def test_small_tenants_finish_long_before_the_big_backlog() -> None:
    finished = await tenants.main()
    assert max(finished["globex"], finished["initech"]) < finished["acme"] / 2


async def test_a_fan_out_completes_and_a_cancelled_album_cancels_its_children() -> None:
    assert await fan_out.main() == {"summer": ["completed"], "studio": ["cancelled"]}


async def test_the_schedule_ticks_every_two_seconds_and_delayed_starts_run() -> None:
    ticks = await schedules.main()  # the ticks themselves, not when their runs happened to run
    assert len(ticks) >= 3
    for earlier, later in itertools.pairwise(ticks):
        assert (later - earlier).total_seconds() == 2


async def test_urgent_mail_jumps_the_backlog() -> None:
    sent = await queues.main()
    assert sent == ["password reset", *(f"newsletter {i}" for i in range(10))]


async def test_each_timeout_and_the_cancellation_end_their_runs_as_documented() -> None:
    assert await timeouts.main() == {
        "stock": "sku-1: unknown (step 'lookup' timed out after 0.2s)",
        "payment": "RunFailed: RunTimedOut",
        "sale": "RunFailed: RunExpired",
        "export": "RunCancelled: RunCancelled",
    }


async def test_a_rolled_back_checkout_starts_no_fulfilment() -> None:
    assert await checkout.main() == {"orders": 1, "runs": 1}
