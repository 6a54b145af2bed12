"""`python -m tests.acceptance.skewed ARGS`: the durable CLI in a process whose wall clock is off
by $CLOCK_SKEW_SECONDS. The engine reads the wall clock only through SystemClock, so shifting it
there is what a machine with a wrong clock looks like to durable."""

from __future__ import annotations

import os
import sys
from datetime import datetime, timedelta

from durable._cli import main
from engine._clock import SystemClock

_SKEW = timedelta(seconds=float(os.environ["CLOCK_SKEW_SECONDS"]))
_true_now = SystemClock.now


def _skewed_now(self: SystemClock) -> datetime:
    return _true_now(self) + _SKEW


SystemClock.now = _skewed_now  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
