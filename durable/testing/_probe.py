"""``Probe``: what a simulation sees of the runs it drives, and where it crashes them."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections import Counter
from collections.abc import Iterable

from engine import Checkpoint, Decision

Key = tuple[uuid.UUID, str]


class Probe:
    """Counts checkpoints and attempts, crashes on cue, shuffles completion order.

    ``crashes`` are indexes into the checkpoints passed during one drive; ``shuffle`` (a
    generator) lets other branches overtake the one at a checkpoint. Step executions and
    re-executions are kept by (run, position)."""

    def __init__(self, crashes: Iterable[int], shuffle: random.Random | None) -> None:
        self.crash_at = set(crashes)
        self.shuffle = shuffle
        self.passed: list[Checkpoint] = []
        self.crashed: list[Checkpoint] = []
        self.executions: Counter[Key] = Counter()
        self.journaled: set[Key] = set()
        self.reruns: list[Key] = []
        self.attempts = 0
        self.crashed_attempt = False

    async def __call__(self, point: Checkpoint) -> Decision:
        index = len(self.passed)
        self.passed.append(point)
        if self.shuffle is not None:  # let other branches overtake this one
            for _ in range(self.shuffle.randrange(4)):
                await asyncio.sleep(0)
        key = (point.run_id, point.position)
        if point.moment == "journaled":
            self.journaled.add(key)
        if index in self.crash_at:
            self.crashed.append(point)
            self.crashed_attempt = True
            return "crash"
        if point.moment == "before" and point.kind == "step":
            if key in self.journaled:
                self.reruns.append(key)
            self.executions[key] += 1
        return "continue"

    def executions_seen_from(self, run_id: uuid.UUID) -> Counter[str]:
        """Executions keyed by position for ``run_id``, ``run@position`` for other runs."""
        return Counter({_relative(key, run_id): n for key, n in self.executions.items()})

    def reruns_seen_from(self, run_id: uuid.UUID) -> list[str]:
        return [_relative(key, run_id) for key in self.reruns]


def _relative(key: Key, run_id: uuid.UUID) -> str:
    run, position = key
    return position if run == run_id else f"{run}@{position}"
