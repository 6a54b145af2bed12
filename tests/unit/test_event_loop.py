"""``durable worker --loop``: uvloop's event loop when it is installed, else asyncio's, and a
clear error when uvloop is asked for and missing."""

from __future__ import annotations

import asyncio
import sys

import pytest
import uvloop

from durable._cli import event_loop
from engine.errors import DurableError


def test_auto_takes_uvloop_when_it_is_installed() -> None:
    assert event_loop("auto") == (uvloop.run, "uvloop")
    assert event_loop("uvloop") == (uvloop.run, "uvloop")


def test_asyncio_is_taken_when_asked_for_or_when_uvloop_is_missing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert event_loop("asyncio") == (asyncio.run, "asyncio")
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop now raises ImportError
    assert event_loop("auto") == (asyncio.run, "asyncio")
    with pytest.raises(DurableError, match=r"pip install 'durable\[uvloop\]'"):
        event_loop("uvloop")


def test_a_coroutine_runs_to_its_result_on_each_loop() -> None:
    ran: list[str] = []

    async def work(name: str) -> None:
        await asyncio.sleep(0)
        ran.append(name)

    for wanted in ("asyncio", "auto"):
        run, name = event_loop(wanted)
        run(work(name))
    assert ran == ["asyncio", "uvloop"]
