"""The public surface: exported names, layering, the error tree, the control-flow signals."""

from __future__ import annotations

import ast
import inspect
import types
from pathlib import Path

import pytest

import durable
import durable.testing
from engine import _signals, errors

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("module", [durable, durable.testing], ids=lambda m: m.__name__)
def test_all_is_sorted_and_lists_every_public_name(module: types.ModuleType) -> None:
    assert module.__all__ == sorted(module.__all__)
    public = {
        n
        for n, value in vars(module).items()
        if not n.startswith("_") and n != "annotations" and not inspect.ismodule(value)
    }
    assert set(module.__all__) == public


@pytest.mark.parametrize("module", [durable, durable.testing], ids=lambda m: m.__name__)
def test_every_public_name_has_a_docstring(module: types.ModuleType) -> None:
    for name in module.__all__:
        obj = getattr(module, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert inspect.getdoc(obj), f"{module.__name__}.{name} has no docstring"


def test_the_engine_never_imports_durable() -> None:
    for path in (ROOT / "engine").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert not any(n == "durable" or n.startswith("durable.") for n in names), path


def test_both_packages_ship_py_typed() -> None:
    assert (ROOT / "durable" / "py.typed").exists()
    assert (ROOT / "engine" / "py.typed").exists()


def test_every_error_derives_from_durable_error_and_is_drawn_in_the_tree() -> None:
    tree = inspect.getdoc(errors) or ""
    for name, obj in vars(errors).items():
        if inspect.isclass(obj) and issubclass(obj, Exception):
            assert issubclass(obj, durable.DurableError), name
            assert name in tree, f"{name} is missing from the tree in engine/errors.py"


def test_non_determinism_error_shows_the_position_and_both_sides() -> None:
    error = durable.NonDeterminismError("r1", "3", "step 'charge'", "step 'charge-card'")
    assert "position 3" in str(error)
    assert "recorded step 'charge'" in str(error)
    assert "requested step 'charge-card'" in str(error)


def test_control_flow_signals_cannot_be_swallowed_by_except_exception() -> None:
    for make in (_signals.suspend, lambda: _signals.abandon("lost")):
        with pytest.raises(BaseException) as raised:  # noqa: PT011, PT012
            try:
                raise make()
            except Exception:  # what user code writes around a step
                pytest.fail("a control-flow signal was caught by except Exception")
        assert not isinstance(raised.value, Exception)


def test_control_flow_signals_cannot_be_constructed_by_users() -> None:
    with pytest.raises(TypeError, match="engine only"):
        _signals.Suspend(object(), "mine")
