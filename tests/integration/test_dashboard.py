"""The dashboard's routes in process (httpx on its ASGI application): pages, filters, actions
with their CSRF check, read-only, the token, the headers, escaping, truncation, the event
stream. tests/acceptance/test_dashboard_browser.py drives the same pages in Chromium."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

import httpx
import pytest

import durable
from durable.dashboard import asgi
from durable.dashboard._serve import check_bind
from engine.errors import ConfigurationError
from tests.helpers import make_app, running_worker, serving, status_is, until

pytestmark = pytest.mark.postgres


def _functions(app: durable.App) -> None:
    @app.function(name="waiting")
    async def waiting(ctx: durable.Context, data: dict[str, Any]) -> Any:
        await ctx.step("prepare", lambda: "ready")
        return await ctx.wait_for_event("go", key=data["key"], timeout=timedelta(hours=1))

    @app.function(name="broken")
    async def broken(ctx: durable.Context, n: int) -> None:
        raise RuntimeError(f"broken {n}")


@asynccontextmanager
async def _client(site: Any) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=site)
    async with httpx.AsyncClient(transport=transport, base_url="http://dash") as client:
        yield client


async def _csrf(client: httpx.AsyncClient) -> str:
    await client.get("/capacity")
    token = client.cookies.get("durable_csrf")
    assert token
    return token


async def test_the_runs_page_lists_counts_filters_and_escapes(database_url: str) -> None:
    app = make_app(database_url)
    _functions(app)
    async with app:
        hostile = await app.start(
            "waiting", {"key": "a", "note": "<script>alert(1)</script>"}, tags={"tenant": "acme"}
        )
        await app.start("waiting", {"key": "b"}, tags={"tenant": "other"})
        async with _client(asgi(app)) as client:
            page = await client.get("/")
            acme = await client.get("/", params={"tag": "tenant=acme"})
            searched = await client.get("/", params={"q": "acme"})
            bad = await client.get("/", params={"since": "yesterday"})
            run = await client.get(f"/runs/{hostile.run_id}")
            missing = await client.get("/runs/not-a-run")
    assert page.status_code == 200
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-frame-options"] == "DENY"
    assert re.findall(r'data-status="pending">pending <b class="count">(\d+)', page.text) == ["2"]
    assert page.text.count("data-run=") == 2
    assert re.findall(r'data-run="([^"]+)"', acme.text) == [str(hostile.run_id)]
    assert re.findall(r'data-run="([^"]+)"', searched.text) == [str(hostile.run_id)]
    assert bad.status_code == 400
    assert "is not a date and time" in bad.text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in run.text
    assert "<script>alert" not in run.text
    assert missing.status_code == 404


async def test_a_run_page_shows_its_timeline_and_cuts_long_values(database_url: str) -> None:
    app = make_app(database_url)
    _functions(app)
    async with app, running_worker(app):
        handle = await app.start("waiting", {"key": "k", "long": "x" * 5000})
        await until(lambda: status_is(handle, "suspended"), what="waiting")
        async with _client(asgi(app)) as client:
            page = await client.get(f"/runs/{handle.run_id}")
            whole = await client.get(f"/runs/{handle.run_id}/value/input")
    assert re.findall(r'data-kind="(\w+)"', page.text) == ["step", "wait"]
    assert f"/runs/{handle.run_id}/value/input" in page.text
    longest = max(len(run) for run in re.findall("x+", page.text))
    assert 1900 < longest < 2000  # cut, with a link to the whole
    assert whole.status_code == 200
    assert max(len(run) for run in re.findall("x+", whole.text)) == 5000


async def test_actions_need_the_csrf_token_and_go_through_the_app(database_url: str) -> None:
    app = make_app(database_url)
    _functions(app)
    async with app, running_worker(app):
        waiting = await app.start("waiting", {"key": "k"})
        broken = await app.start("broken", 1)
        await until(lambda: status_is(waiting, "suspended"), what="waiting")
        await until(lambda: status_is(broken, "failed"), what="failed")
        async with _client(asgi(app)) as client:
            csrf = await _csrf(client)
            forged = await client.post(
                "/actions/run",
                data={"csrf": "forged", "run_id": str(waiting.run_id), "action": "cancel"},
            )
            none = await client.post(
                "/actions/run", data={"run_id": str(waiting.run_id), "action": "cancel"}
            )
            sent = await client.post(
                "/actions/event",
                data={
                    "csrf": csrf,
                    "name": "go",
                    "key": "k",
                    "payload": '{"ok": true}',
                    "run_id": str(waiting.run_id),
                },
            )
            not_json = await client.post(
                "/actions/event", data={"csrf": csrf, "name": "go", "key": "k", "payload": "NaN"}
            )
            retried = await client.post(
                "/actions/run", data={"csrf": csrf, "run_id": str(broken.run_id), "action": "retry"}
            )
        assert await waiting.result(timeout=20) == {"ok": True}
        new_run = retried.headers["location"].split("/runs/")[1].split("?")[0]
        retry = await app.get_run(new_run).info()
    assert forged.status_code == none.status_code == 403
    assert sent.status_code == 303
    assert not_json.status_code == 400
    assert "not JSON" in not_json.text
    assert retried.status_code == 303
    assert retry.forked_from == broken.run_id


async def test_a_bulk_action_confirms_the_count_first(database_url: str) -> None:
    app = make_app(database_url)
    _functions(app)
    async with app:
        chosen = [
            await app.start("waiting", {"key": str(i)}, tags={"batch": "1"}) for i in range(3)
        ]
        other = await app.start("waiting", {"key": "x"}, tags={"batch": "2"})
        async with _client(asgi(app)) as client:
            csrf = await _csrf(client)
            form = {"csrf": csrf, "action": "cancel", "tag": "batch=1"}
            confirm = await client.post("/actions/bulk", data=form)
            statuses_before = [await h.status() for h in chosen]
            done = await client.post("/actions/bulk", data={**form, "confirm": "yes"})
        statuses = [await h.status() for h in chosen]
        untouched = await other.status()
    assert re.findall(r'data-count="(\d+)"', confirm.text) == ["3"]
    assert statuses_before == ["pending"] * 3
    assert done.status_code == 200
    assert statuses == ["cancelled"] * 3
    assert untouched == "pending"


async def test_read_only_offers_and_accepts_no_action(database_url: str) -> None:
    app = make_app(database_url)
    _functions(app)
    async with app:
        handle = await app.start("waiting", {"key": "k"})
        async with _client(asgi(app, read_only=True)) as client:
            page = await client.get(f"/runs/{handle.run_id}")
            runs = await client.get("/")
            csrf = client.cookies.get("durable_csrf")
            refused = await client.post(
                "/actions/run",
                data={"csrf": csrf, "run_id": str(handle.run_id), "action": "cancel"},
            )
        status = await handle.status()
    assert '<form method="post"' not in page.text + runs.text
    assert "read-only" in page.text
    assert refused.status_code == 403
    assert status == "pending"


async def test_a_token_guards_every_request(database_url: str) -> None:
    app = make_app(database_url)
    async with app, _client(asgi(app, token="s3cret")) as client:
        without = await client.get("/")
        wrong = await client.get("/", headers={"authorization": "Bearer nope"})
        bearer = await client.get("/", headers={"authorization": "Bearer s3cret"})
        odd = await client.get("/", params={"token": "s3crét"})
        once = await client.get("/capacity", params={"token": "s3cret"})
        after = await client.get("/capacity")
    assert without.status_code == wrong.status_code == odd.status_code == 401
    assert "content-security-policy" in without.headers
    assert bearer.status_code == 200
    assert once.status_code == 303
    assert "token" not in once.headers["location"]
    assert after.status_code == 200  # the cookie the redirect set


def test_listening_beyond_this_machine_needs_a_token() -> None:
    check_bind("127.0.0.1", None)
    check_bind("::1", None)
    check_bind("0.0.0.0", "s3cret")
    for host in ("0.0.0.0", "192.0.2.1", "example.internal"):
        with pytest.raises(ConfigurationError, match="without a token"):
            check_bind(host, None)
    done = subprocess.run(
        [sys.executable, "-m", "durable", "dashboard", "--host", "0.0.0.0"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1
    assert "without a token" in done.stderr


async def test_the_event_stream_says_when_the_run_changes(database_url: str) -> None:
    app = make_app(database_url)
    _functions(app)
    async with app:
        handle = await app.start("waiting", {"key": "k"})
        async with (
            serving(asgi(app)) as url,
            httpx.AsyncClient(base_url=url, timeout=30) as client,
            client.stream("GET", f"/runs/{handle.run_id}/live") as stream,
        ):
            lines = stream.aiter_lines()
            assert await anext(lines) == "retry: 2000"
            async with running_worker(app):
                line = await asyncio.wait_for(_next_event(lines), 20)
    assert line == f"data: {handle.run_id}"


async def _next_event(lines: AsyncIterator[str]) -> str:
    async for line in lines:
        if line.startswith("data: "):
            return line
    raise AssertionError("the stream ended")
