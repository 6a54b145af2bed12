"""The dashboard in a real browser: Debian's chromium, headless, driven by Playwright. The
dashboard is served by uvicorn on a free port, a worker runs in the same process, and each
test acts as an operator would: it reads the timeline, clicks, fills forms. The screenshots in
docs/ (shown by the README) are taken here."""

from __future__ import annotations

import asyncio
import functools
import itertools
import shutil
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, Dialog, Page, async_playwright

import durable
from durable.dashboard import asgi
from tests.helpers import make_app, running_worker, serving, status_is, until

pytestmark = pytest.mark.postgres

DOCS = Path(__file__).resolve().parents[2] / "docs"
STEP_MS = [60, 120, 180, 240, 300]


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium is needed (scripts/test installs it when run as root)"
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=chromium,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        try:
            yield launched
        finally:
            await launched.close()


async def _page(browser: Browser) -> Page:
    page = await browser.new_page(viewport={"width": 1280, "height": 900})

    async def no_dialog(dialog: Dialog) -> None:
        await dialog.dismiss()
        raise AssertionError(f"a dialog opened: {dialog.message}")

    page.on("dialog", no_dialog)
    return page


def _functions(app: durable.App, fixed: dict[str, bool]) -> None:
    async def pause(ms: int) -> int:
        await asyncio.sleep(ms / 1000)
        return ms

    tries: dict[str, int] = {}

    @durable.step(retries=3, backoff=durable.Backoff(initial=timedelta(milliseconds=20)))
    async def flaky(run: str) -> str:
        tries[run] = tries.get(run, 0) + 1
        if tries[run] < 3:
            raise ConnectionError(f"try {tries[run]} failed")
        return "passed"

    @app.function(name="five_steps")
    async def five_steps(ctx: durable.Context, run: str) -> list[Any]:
        done: list[Any] = [await ctx.step(f"step-{i}", pause, ms) for i, ms in enumerate(STEP_MS)]
        done.append(await ctx.step("flaky", flaky, run))
        return done

    @app.function(name="sleeper")
    async def sleeper(ctx: durable.Context, note: str) -> str:
        await ctx.sleep(timedelta(hours=1))
        return note

    @app.function(name="approval")
    async def approval(ctx: durable.Context, key: str) -> Any:
        await ctx.step("ask", lambda: "asked")
        return await ctx.wait_for_event("decision", key=key, timeout=timedelta(days=1))

    @app.function(name="charge")
    async def charge(ctx: durable.Context, n: int) -> int:
        async def bill() -> int:
            if not fixed["charge"]:
                raise RuntimeError("the card processor rejected the call")
            return n

        return await ctx.step("bill", bill)


async def test_a_five_step_run_shows_its_bars_in_order_sized_by_duration(
    database_url: str, browser: Browser
) -> None:
    app = make_app(database_url)
    _functions(app, {"charge": True})
    async with app, running_worker(app), serving(asgi(app)) as url:
        handle = await app.start("five_steps", "r1", tags={"tenant": "acme"})
        await handle.result(timeout=30)
        for i in range(3):
            await app.start("approval", f"a{i}", tags={"tenant": "acme" if i else "globex"})
        page = await _page(browser)
        await page.goto(f"{url}/runs/{handle.run_id}")
        rows = page.locator(".timeline .row-step")
        assert await rows.count() == 6
        bars = []
        for i in range(5):
            rect = rows.nth(i).locator("rect.try")
            assert await rect.count() == 1
            bars.append(
                (
                    float(await rect.get_attribute("x") or 0),
                    float(await rect.get_attribute("width") or 0),
                    float(await rect.get_attribute("data-ms") or 0),
                )
            )
        attempts = rows.nth(5).locator("rect.try")
        tries = await attempts.count()
        classes = [await attempts.nth(i).get_attribute("class") for i in range(tries)]
        await page.locator(".timeline").screenshot(path=DOCS / "dashboard-timeline.png")
        await page.screenshot(path=DOCS / "dashboard-run.png", full_page=True)
        await page.goto(f"{url}/")
        await page.screenshot(path=DOCS / "dashboard-runs.png")
    starts = [x for x, _w, _ms in bars]
    assert starts == sorted(starts)  # in the order they ran
    for (x, width, _ms), (next_x, _w, _m) in itertools.pairwise(bars):
        assert x + width <= next_x + 1  # one after the other
    # Widths follow the recorded durations (each step slept 60, 120, ... 300 ms).
    per_ms = [width / ms for _x, width, ms in bars]
    assert max(per_ms) / min(per_ms) < 1.05
    assert [ms for *_, ms in bars] == sorted(ms for *_, ms in bars)
    assert tries == 3
    assert classes == ["try failed", "try failed", "try ok"]


async def test_a_sleeping_run_cancelled_from_its_page_shows_cancelled_without_a_reload(
    database_url: str, browser: Browser
) -> None:
    app = make_app(database_url)
    _functions(app, {"charge": True})
    async with app, running_worker(app), serving(asgi(app)) as url:
        handle = await app.start("sleeper", "zzz")
        await until(lambda: status_is(handle, "suspended"), what="asleep")
        page = await _page(browser)
        await page.goto(f"{url}/runs/{handle.run_id}")
        await page.wait_for_selector("#live[data-connected=yes]")
        await page.evaluate("window.stillTheSamePage = true")
        assert await page.inner_text("#run-status") == "suspended"
        await page.click("button.action-cancel")
        await page.wait_for_selector("#run-status.status-cancelled", timeout=20_000)
        same = await page.evaluate("window.stillTheSamePage === true")
        status = await handle.status()
    assert same
    assert status == "cancelled"


async def test_a_waiting_run_woken_by_the_send_event_form_completes(
    database_url: str, browser: Browser
) -> None:
    app = make_app(database_url)
    _functions(app, {"charge": True})
    async with app, running_worker(app), serving(asgi(app)) as url:
        handle = await app.start("approval", "exp-42")
        await until(lambda: status_is(handle, "suspended"), what="waiting for a decision")
        page = await _page(browser)
        await page.goto(f"{url}/runs/{handle.run_id}")
        await page.wait_for_selector("#live[data-connected=yes]")
        assert await page.locator(".timeline .row-wait").count() == 1
        form = page.locator("form.send-event")
        assert await form.locator("input[name=name]").input_value() == "decision"
        assert await form.locator("input[name=key]").input_value() == "exp-42"
        await form.locator("textarea[name=payload]").fill('{"approved": true}')
        await form.locator("button").click()
        await page.wait_for_selector("#run-status.status-completed", timeout=20_000)
        events = page.locator(".timeline .row-event")
        result = await page.inner_text("#value-result")
        assert await events.count() == 1
        assert await page.locator(".timeline .row-wait").count() == 0
        assert await handle.result(timeout=5) == {"approved": True}
    assert '"approved": true' in result


async def test_a_filtered_bulk_retry_confirms_the_count_and_completes_every_run(
    database_url: str, browser: Browser
) -> None:
    fixed = {"charge": False}
    app = make_app(database_url)
    _functions(app, fixed)
    async with app, running_worker(app), serving(asgi(app)) as url:
        acme = [await app.start("charge", i, tags={"tenant": "acme"}) for i in range(6)]
        other = [await app.start("charge", i, tags={"tenant": "globex"}) for i in range(2)]
        for handle in [*acme, *other]:
            await until(functools.partial(status_is, handle, "failed"), what="the bug fails it")
        fixed["charge"] = True  # the fix is deployed
        page = await _page(browser)
        await page.goto(f"{url}/")
        await page.fill("input[name=tag]", "tenant=acme")
        await page.select_option("select[name=status]", "failed")
        await page.click("form.filters button")
        await page.wait_for_selector("a.current[data-status=failed]")
        assert await page.locator("tr[data-run]").count() == 6
        await page.click("button.bulk-retry")
        count = await page.get_attribute(".confirm-count", "data-count")
        heading = await page.inner_text("h1")
        await page.click("button.confirm")
        await page.wait_for_selector("ul.bulk-done")
        retried = await page.locator("ul.bulk-done li").count()
        results = []
        for original in acme:
            retry = await app.list_runs(durable.RunFilter(search=str(original.run_id)))
            assert retry[0].status == "failed"
            forks = [r for r in await app.list_runs(limit=100) if r.forked_from == original.run_id]
            assert len(forks) == 1
            results.append(await app.get_run(forks[0].run_id).result(timeout=30))
        untouched = [await h.status() for h in other]
    assert count == "6"
    assert heading == "Retry 6 runs?"
    assert retried == 6
    assert sorted(results) == list(range(6))
    assert untouched == ["failed", "failed"]


async def test_a_hostile_payload_is_text_and_read_only_offers_no_action(
    database_url: str, browser: Browser
) -> None:
    app = make_app(database_url)
    _functions(app, {"charge": True})
    hostile = "<script>alert(1)</script><img src=x onerror=alert(2)>"
    async with app:
        handle = await app.start("sleeper", hostile, tags={"note": hostile})
        async with serving(asgi(app)) as url, serving(asgi(app, read_only=True)) as read_only:
            page = await _page(browser)
            await page.goto(f"{url}/runs/{handle.run_id}")
            shown = await page.inner_text("#value-input")
            await page.goto(f"{url}/")
            listed = await page.inner_text("table.runs")
            await page.goto(f"{read_only}/runs/{handle.run_id}")
            buttons = await page.locator("main button").count()
            forms = await page.locator("form[method=post]").count()
            await page.goto(f"{read_only}/")
            list_buttons = await page.locator("form[method=post]").count()
    assert hostile in shown  # shown as the text it is; a dialog would have failed the test
    assert hostile in listed
    assert buttons == forms == list_buttons == 0
