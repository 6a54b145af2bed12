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


def _imports(path: Path, package_root: Path) -> set[str]:
    """The durable/engine modules ``path`` imports, TYPE_CHECKING imports included (an import
    only for types is still an edge of a circle to read through)."""
    module = ".".join(path.relative_to(package_root).with_suffix("").parts)
    module = module.removesuffix(".__init__")
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                parent = module.rsplit(".", node.level)[0]
                base = f"{parent}.{base}" if base else parent
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return {name for name in found if name.split(".")[0] in ("durable", "engine")}


def test_no_module_of_durable_or_engine_is_in_an_import_circle() -> None:
    modules = {
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
        for package in ("durable", "engine")
        for p in (ROOT / package).rglob("*.py")
    }
    # A package's __init__ re-exports its modules; an edge to it is an edge to those modules
    # only through the names it re-exports, so package-to-module edges are left out.
    edges = {
        name: {
            target
            for target in _imports(path, ROOT)
            if target in modules and target != name and target not in ("durable", "engine")
        }
        for name, path in modules.items()
        if path.name != "__init__.py"
    }
    for name in edges:
        stack, seen = [(name, [name])], set()
        while stack:
            current, trail = stack.pop()
            for target in edges.get(current, ()):
                if target == name:
                    pytest.fail(f"import circle: {' -> '.join([*trail, target])}")
                if target not in seen:
                    seen.add(target)
                    stack.append((target, [*trail, target]))


def test_a_module_over_400_lines_says_why_at_its_top() -> None:
    for package in ("durable", "engine"):
        for path in (ROOT / package).rglob("*.py"):
            lines = path.read_text().splitlines()
            if len(lines) > 400:
                docstring = ast.get_docstring(ast.parse("\n".join(lines))) or ""
                assert "Over 400 lines" in docstring, (
                    f"{path.relative_to(ROOT)} has {len(lines)} lines and its docstring does "
                    f"not say why (a paragraph starting 'Over 400 lines')"
                )
