"""Tests of the onboarding, order and approval-upgrade examples with durable.testing: the way
to test yours.

    python -m pytest examples/test_examples.py

Every test runs on a virtual clock, so the three-day trial takes no time, on PostgreSQL: each
simulation in a database of its own, on the embedded server (or on the server of
$DURABLE_TEST_DATABASE_URL when it is set). Nothing to set up.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import durable
from durable.testing import (
    RecordedRun,
    Send,
    Simulation,
    UpgradeCheckFailed,
    crash_at_every_point,
    failing,
    replay,
    upgrade_at_every_point,
)
from durable.testing.strategies import crash_schedules, event_orders, timer_lateness
from examples.approval_upgrade import Document, check_budget, notify, release_1, release_2
from examples.onboarding import Signup, onboarding
from examples.onboarding import app as onboarding_app
from examples.order import Order, Receipt, place_order
from examples.order import app as order_app

ADA = Signup(user_id="ada", email="ada@example.com")
ORDER = Order(order_id="o-1", card="4242424242424242", cents=1999, address="1 Main St")
QUIET = {"welcome": lambda to, template: f"{template}:{to}", "nudge": lambda to, t: f"{t}:{to}"}
EXAMPLES = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


async def test_a_user_who_never_upgrades_is_nudged_after_trial_and_window() -> None:
    outcome = await Simulation(onboarding_app, stubs=QUIET).run(onboarding, ADA)
    assert outcome.result == {"upgraded": False}
    assert outcome.elapsed == ADA.trial + ADA.upgrade_window
    assert [e.name for e in outcome.journal] == ["welcome", "sleep", "upgraded", "nudge"]


async def test_an_upgrade_sent_before_the_wait_still_counts() -> None:
    early = Send("upgraded", {"plan": "pro"}, key="ada", at=timedelta(hours=1))
    outcome = await Simulation(onboarding_app, stubs=QUIET).run(onboarding, ADA, events=[early])
    assert outcome.result == {"upgraded": True}
    assert outcome.elapsed == ADA.trial


async def test_onboarding_survives_a_crash_at_every_point() -> None:
    upgrade = Send("upgraded", {"plan": "pro"}, key="ada", at=timedelta(days=5))
    report = await crash_at_every_point(
        onboarding_app, onboarding, ADA, events=[upgrade], stubs=QUIET
    )
    assert report.baseline.result == {"upgraded": True}
    assert len(report.points) >= 8


@EXAMPLES
@given(
    crashes=crash_schedules(max_checkpoint=12),
    events=event_orders(
        "upgraded", key="ada", payloads=st.just({"plan": "pro"}), within=timedelta(days=9)
    ),
    lateness=timer_lateness(max_late=timedelta(hours=2)),
)
async def test_onboarding_upgrades_exactly_when_an_upgrade_arrives_in_time(
    crashes: list[int], events: list[Send], lateness: list[timedelta]
) -> None:
    outcome = await Simulation(onboarding_app, stubs=QUIET).run(
        onboarding, ADA, events=events, crashes=crashes, lateness=lateness
    )
    assert outcome.status == "completed", outcome.explain()
    # The window opens when the trial's timer fires, which may be late; an upgrade sent within
    # trial + window is always in time, and without any upgrade the user is nudged.
    if any(send.at <= ADA.trial + ADA.upgrade_window for send in events):
        assert outcome.result == {"upgraded": True}, outcome.explain()
    if not events:
        assert outcome.result == {"upgraded": False}, outcome.explain()
    welcome_crashes = [c for c in outcome.crashes if c.position == "0" and c.moment == "ran"]
    assert outcome.executions["0"] == 1 + len(welcome_crashes), outcome.explain()


async def test_a_shipped_order_survives_a_crash_at_every_point() -> None:
    report = await crash_at_every_point(
        order_app, place_order, ORDER, stubs={"charge": _charge, "ship": _ship}
    )
    assert report.baseline.result == {"status": "shipped", "tracking": "tracking-o-1"}


async def test_a_refunded_order_survives_a_crash_at_every_point() -> None:
    stubs: dict[str, Callable[..., Any]] = {
        "charge": _charge,
        "ship": failing(ValueError("no such street")),
        "refund": _refund,
    }
    report = await crash_at_every_point(order_app, place_order, ORDER, stubs=stubs)
    assert report.baseline.result == {
        "status": "refunded",
        "refund": "re_ch_1",
        "reason": "no such street",
    }
    assert report.baseline.executions == {"0": 1, "1": 1, "2": 1}


async def test_shipping_retries_on_the_virtual_clock_then_succeeds() -> None:
    flaky = failing(ConnectionError("carrier down"), times=2, then=_ship)
    outcome = await Simulation(order_app, stubs={"charge": _charge, "ship": flaky}).run(
        place_order, ORDER
    )
    assert outcome.result == {"status": "shipped", "tracking": "tracking-o-1"}


async def test_a_recorded_order_replays_against_the_current_code() -> None:
    outcome = await Simulation(order_app, stubs={"charge": _charge, "ship": _ship}).run(
        place_order, ORDER
    )
    recorded = RecordedRun(
        outcome.run_id, "order", ORDER.model_dump(), "completed", outcome.result, outcome.journal
    )
    report = await replay(order_app, RecordedRun.from_json(recorded.to_json()))
    assert (report.replayed, report.status, report.live_at) == (2, "completed", [])


def _charge(card: str, cents: int) -> Receipt:
    return Receipt(charge_id="ch_1", cents=cents)


def _ship(order_id: str, address: str) -> str:
    return f"tracking-{order_id}"


def _refund(receipt: Receipt) -> str:
    return "re_ch_1"


DOC = Document(doc_id="doc-1", reviewer="ana", cost=50_000)
DECISION = [Send("decision", True, key="doc-1")]


async def test_the_budget_check_can_be_deployed_at_every_point_of_a_release_1_run() -> None:
    report = await upgrade_at_every_point(release_1, release_2, "approval", DOC, events=DECISION)
    assert report.baseline.result == "approved"  # release 1's own run: no budget check
    assert len(report.points) >= 6


async def test_the_same_change_without_a_patch_breaks_a_run_that_asked_its_reviewer() -> None:
    unpatched = durable.App(version="release-2-unpatched")

    @unpatched.function(name="approval")
    async def approval(ctx: durable.Context, doc: Document) -> str:
        if not await ctx.step("budget", check_budget, doc.cost):
            return "over budget"
        await ctx.step("ask", notify, doc.reviewer, f"please review {doc.doc_id}")
        approved = await ctx.wait_for_event("decision", key=doc.doc_id)
        return "approved" if approved else "rejected"

    with pytest.raises(UpgradeCheckFailed) as failed:
        await upgrade_at_every_point(release_1, unpatched, "approval", DOC, events=DECISION)
    assert str(failed.value).startswith("deploy after position 0 (step 'ask') was journaled")
    assert "recorded step 'ask', code requested step 'budget'" in str(failed.value)
