"""Step stubs of durable.testing."""

from __future__ import annotations

import traceback

import pytest

from durable.testing import failing


def test_a_failing_stub_raises_with_a_fresh_traceback_each_time() -> None:
    body = failing(ValueError("no such street"))
    depths = []
    for _ in range(3):
        with pytest.raises(ValueError, match="no such street") as raised:
            body("o-1", "1 Main St")
        depths.append(len(traceback.extract_tb(raised.value.__traceback__)))
    assert depths == [depths[0]] * 3


def test_a_failing_stub_fails_its_first_calls_then_calls_the_next_body() -> None:
    body = failing(KeyError("gone"), times=2, then=lambda n: n + 1)
    for _ in range(2):
        with pytest.raises(KeyError):
            body(1)
    assert body(1) == 2
