"""Patches: ``ctx.patched`` and ``ctx.deprecate_patch``, how a function's code changes under runs
in flight without pausing them.

A patch point has a marker in the journal, at ``<position>~<name>`` where ``<position>`` is the
position the task's next call will take: the marker takes no position, so every call after a
patch keeps the position it had before the patch existed. At a patch point a run either finds
its marker (it passed there live, after the patch: the new branch), or finds the next position
already journaled or a wait registered there (it went past before the patch existed: the old
branch), or neither (it is live here now: the new branch, and the marker is journaled before
the choice returns).
"""

from __future__ import annotations

from engine import _limits
from engine._run_state import RunState
from engine.errors import NonDeterminismError


async def patched(state: RunState, name: str) -> bool:
    """``Context.patched``: True for the new branch, False for a run that needs the old one."""
    _limits.name(name, "ctx.patched: the patch name")
    marker, following = state.patch_position(name)
    if state.recorded(marker, "patch", name) is not None:
        return True
    if await state.passed(following):
        return False  # the run went past this point before the patch existed
    await _mark(state, marker, name)
    return True


async def deprecate_patch(state: RunState, name: str) -> None:
    """``Context.deprecate_patch``: the old branch is gone; a run that needs it pauses."""
    _limits.name(name, "ctx.deprecate_patch: the patch name")
    marker, following = state.patch_position(name)
    if state.recorded(marker, "patch", name) is not None:
        return
    if await state.passed(following):
        found = state.journal.get(following)
        recorded = f"{found.kind} {found.name!r}" if found else "a wait"
        error = NonDeterminismError(
            str(state.run_id),
            following,
            recorded=f"{recorded} (the code before patch {name!r})",
            requested=f"the new branch of patch {name!r}, whose old branch was deleted",
        )
        state.nondeterminism = state.nondeterminism or error
        raise error
    await _mark(state, marker, name)


async def _mark(state: RunState, marker: str, name: str) -> None:
    """Journal the marker (live work, fenced by the claim like every write)."""
    await state.checkpoint("before", marker, "patch", name)
    await state.append(marker, "patch", name, {"patched": True})
    await state.checkpoint("journaled", marker, "patch", name)
