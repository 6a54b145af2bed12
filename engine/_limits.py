"""The bounds every value durable stores keeps, checked before the database sees it.

A value out of bounds raises a ``DurableError`` that names the call and the bound, and nothing
is stored; without these checks PostgreSQL would refuse it with a driver error (an index row
too large, an invalid byte sequence, an integer out of range), or store NaN as ``null``.

- **Names** (functions, events, queues, schedules, rate limits, steps): at most
  ``MAX_NAME_BYTES`` (255) bytes of UTF-8.
- **Keys** (idempotency keys, event keys, concurrency and rate-limit keys): at most
  ``MAX_KEY_BYTES`` (1,024) bytes of UTF-8. Names and keys are indexed, and an index entry of
  PostgreSQL holds at most about 2.7 kB.
- **Text** everywhere (names, keys, JSON strings): valid Unicode without NUL characters. A
  lone surrogate (``"\\ud800"``, or a byte that is not UTF-8 read by ``surrogateescape``) has no
  UTF-8 form, and PostgreSQL cannot store NUL in text.
- **Priorities**: a 32-bit integer, ``-2**31`` to ``2**31 - 1``; limits, weights and sizes
  from 1 to ``2**31 - 1``.
- **Durations** (sleeps, timeouts, delays): a finite number of seconds or a timedelta, at most
  ``MAX_DURATION`` (100 years). **Times** (``sleep_until``, ``start_at``): before the year
  ``MAX_YEAR`` (9000), so that a deadline computed from them stays a valid date.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from engine.errors import DurableError, InvalidInput

MAX_NAME_BYTES = 255
MAX_KEY_BYTES = 1024
MAX_INT = 2**31 - 1  # PostgreSQL's integer
MIN_PRIORITY = -(2**31)
MAX_PRIORITY = MAX_INT
MAX_DURATION = timedelta(days=36_525)
MAX_YEAR = 9000
MAX_TAGS = 20


def text(value: object, what: str, max_bytes: int, error: type[DurableError] = InvalidInput) -> str:
    """``value`` if it is a storable string of at most ``max_bytes`` bytes of UTF-8. ``what``
    names the value and the call it was given to (``"send_event: the event key"``): messages
    start with it."""
    if not isinstance(value, str):
        raise error(f"{what} must be a string, got {type(value).__name__}")
    try:
        size = len(value.encode())
    except UnicodeEncodeError:
        raise error(
            f"{what} {_shown(value)} is not valid Unicode (it holds a lone surrogate, as left by "
            f"bytes that are not UTF-8)"
        ) from None
    if "\x00" in value:
        raise error(f"{what} {_shown(value)} contains a NUL character, which cannot be stored")
    if size > max_bytes:
        raise error(f"{what} is {size} bytes of UTF-8 ({_shown(value)}); the limit is {max_bytes}")
    return value


def name(value: object, what: str, error: type[DurableError] = InvalidInput) -> str:
    return text(value, what, MAX_NAME_BYTES, error)


def key(value: object, what: str, error: type[DurableError] = InvalidInput) -> str:
    return text(value, what, MAX_KEY_BYTES, error)


def tags(value: object, what: str) -> dict[str, str]:
    """A run's tags: at most MAX_TAGS, each a name (a key's rules) with a key's value."""
    if not isinstance(value, Mapping):
        raise InvalidInput(f"{what} must be a dict of strings, got {type(value).__name__}")
    if len(value) > MAX_TAGS:
        raise InvalidInput(f"{what}: at most {MAX_TAGS} tags, got {len(value)}")
    if "" in value:
        raise InvalidInput(f"{what}: a tag name is empty")
    return {
        name(k, f"{what}: a tag name"): key(v, f"{what}: the value of tag {_shown(str(k))}")
        for k, v in value.items()
    }


def priority(value: object, what: str, error: type[DurableError] = InvalidInput) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise error(f"{what} must be an integer, got {type(value).__name__}")
    if not MIN_PRIORITY <= value <= MAX_PRIORITY:
        raise error(
            f"{what} {value} is out of range: it must be from {MIN_PRIORITY} to {MAX_PRIORITY}"
        )
    return value


def duration(
    value: object,
    what: str,
    *,
    error: type[DurableError] = InvalidInput,
    negative: bool = True,
    zero: bool = True,
) -> timedelta:
    """``value`` (a timedelta, or seconds) as a timedelta within ``MAX_DURATION``. A wait may be
    negative (its time has passed: it is over at once); a setting passes ``negative=False``,
    and ``zero=False`` when it must be more than zero."""
    if isinstance(value, timedelta):
        span = value
    elif isinstance(value, int | float) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise error(f"{what} must be a finite number of seconds, got {value}")
        if abs(value) > MAX_DURATION.total_seconds():
            raise error(f"{what} of {value} seconds is longer than {_years(MAX_DURATION)}")
        span = timedelta(seconds=value)
    else:
        raise error(
            f"{what} must be a timedelta or a number of seconds, got {type(value).__name__}"
        )
    if abs(span) > MAX_DURATION:
        raise error(f"{what} of {span} is longer than {_years(MAX_DURATION)}")
    if (span < timedelta(0) and not negative) or (span == timedelta(0) and not zero):
        least = "zero or more" if zero else "more than zero"
        raise error(f"{what} must be {least}, got {span}")
    return span


def count(
    value: object, what: str, error: type[DurableError] = InvalidInput, maximum: int = MAX_INT
) -> int:
    """``value`` if it is an integer from 1 to ``maximum`` (a limit, a size, a weight)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= maximum:
        raise error(f"{what} must be an integer from 1 to {maximum}, got {value!r}")
    return value


def moment(value: object, what: str) -> datetime:
    """``value`` as a timezone-aware datetime (a naive one is taken as UTC) before ``MAX_YEAR``."""
    if not isinstance(value, datetime):
        raise InvalidInput(f"{what} must be a datetime, got {type(value).__name__}")
    aware = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    try:
        in_range = aware.astimezone(UTC).year < MAX_YEAR
    except OverflowError:  # an offset that pushes it past datetime.max or min
        in_range = False
    if not in_range:
        raise InvalidInput(f"{what} {value.isoformat()} is not before the year {MAX_YEAR}")
    return aware


def _years(span: timedelta) -> str:
    return f"{round(span.days / 365.25)} years"


def _shown(value: str) -> str:
    """A short, printable excerpt of ``value`` for a message."""
    excerpt = value[:40].encode(errors="backslashreplace").decode()
    return repr(excerpt) + ("..." if len(value) > 40 else "")


def json_text_ok(data: Any) -> bool:
    """Whether every string in JSON data (keys included) is valid Unicode without NUL."""
    if isinstance(data, str):
        return "\x00" not in data and _encodes(data)
    if isinstance(data, dict):
        return all(json_text_ok(k) and json_text_ok(v) for k, v in data.items())
    if isinstance(data, list):
        return all(json_text_ok(item) for item in data)
    return True


def _encodes(value: str) -> bool:
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True
