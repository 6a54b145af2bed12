"""JSON in and out of the journal, validated by pydantic from type annotations. No pickle."""

from __future__ import annotations

import contextlib
import inspect
import json
import typing
import weakref
from collections.abc import Callable
from functools import lru_cache
from typing import Any

from pydantic import ConfigDict, PydanticUserError, TypeAdapter, ValidationError
from pydantic_core import PydanticSerializationError

from engine._limits import json_text_ok
from engine.errors import InvalidInput, PayloadTooLarge, SerializationError

# NaN and Infinity have no JSON form. By default pydantic writes them as null, so a value would
# come back changed; kept as floats, they make json.dumps(allow_nan=False) refuse the value. A
# model, dataclass or TypedDict keeps its own config (and keeps floats as floats).
_KEEP_NAN = ConfigDict(ser_json_inf_nan="constants")

# Compact JSON, each encoder built once: json.dumps given any option builds a new JSONEncoder
# on every call, a microsecond of each start's, step's and end's few encodings.
_compact = json.JSONEncoder(separators=(",", ":")).encode
_compact_finite = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode


@lru_cache(maxsize=1024)
def adapter(annotation: Any) -> TypeAdapter[Any]:
    try:
        return TypeAdapter(annotation, config=_KEEP_NAN)
    except PydanticUserError:
        return TypeAdapter(annotation)


def prepare(annotation: Any) -> None:
    """Build the validator of ``annotation`` now rather than for its first value. The first
    one in a process also loads pydantic's plugins (an entry-point scan): 20 ms of a process's
    first start here, paid once by an app when it connects. An annotation pydantic has no
    validator for fails at its first value, as it would have without this."""
    with contextlib.suppress(Exception):
        adapter(annotation)


_return_types: weakref.WeakKeyDictionary[Callable[..., Any], Any] = weakref.WeakKeyDictionary()


def return_type(fn: Callable[..., Any]) -> Any:
    """The return annotation of ``fn`` (Any when there is none or it can't be resolved);
    remembered per function (weakly), as resolving annotations costs more than a step's own
    bookkeeping."""
    try:
        return _return_types[fn]
    except (KeyError, TypeError):
        pass
    found = _resolve_return_type(fn)
    with contextlib.suppress(TypeError):  # a callable that takes no weak reference
        _return_types[fn] = found
    return found


def _resolve_return_type(fn: Callable[..., Any]) -> Any:
    target = inspect.unwrap(fn)
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # unresolvable forward references: fall back to plain JSON
        return Any
    return hints.get("return", Any)


def dump(annotation: Any, value: Any, what: str, max_bytes: int | None = None) -> Any:
    """``value`` as JSON-compatible data, or SerializationError naming ``what``; PayloadTooLarge
    when its JSON is longer than ``max_bytes``. NaN and Infinity are refused: they are not JSON."""
    try:
        data = adapter(annotation).dump_python(value, mode="json")
        encoded = _compact_finite(data)
        # Encoded JSON spells a NUL "\u0000" and a surrogate "\udXXX" (a lone one has no
        # UTF-8 form); only then is the value worth walking, as that text can also come from
        # an escaped backslash, and an emoji is a pair of surrogates.
        text_ok = not ("\\u0000" in encoded or "\\ud" in encoded) or json_text_ok(data)
    except (PydanticSerializationError, TypeError, ValueError, RecursionError) as exc:
        raise SerializationError(
            f"{what}: a value of type {type(value).__qualname__} cannot be stored as JSON "
            f"({exc}). Use JSON-compatible data (no NaN or Infinity) or a pydantic model, and "
            f"annotate the return type."
        ) from exc
    if not text_ok:
        raise SerializationError(
            f"{what}: a string in the value contains a NUL character (\\u0000) or a lone "
            f"surrogate (text that is not valid Unicode), which PostgreSQL cannot store in "
            f"JSON; remove it or encode the data (base64)"
        )
    size = len(encoded.encode())
    if max_bytes is not None and size > max_bytes:
        raise PayloadTooLarge(
            f"{what}: {size} bytes of JSON exceed the limit of {max_bytes} bytes "
            f"(App(max_payload_bytes=...)); store large data elsewhere and pass a reference"
        )
    return data


def load(annotation: Any, data: Any) -> Any:
    """Rehydrate journaled JSON into ``annotation`` (a model comes back as that model)."""
    return adapter(annotation).validate_python(data)


def validate_input(annotation: Any, value: Any, what: str, max_bytes: int | None = None) -> Any:
    """Validate a run's input and return it as JSON-compatible data, or raise InvalidInput."""
    try:
        validated = adapter(annotation).validate_python(value)
    except (ValidationError, RecursionError) as exc:
        raise InvalidInput(f"{what}: input does not validate: {exc}") from exc
    try:
        return dump(annotation, validated, what, max_bytes)
    except SerializationError as exc:
        raise InvalidInput(str(exc)) from exc


def compact_json(value: Any) -> str:
    """``value`` as JSON text with no spaces (non-ASCII escaped), as the store sends it."""
    return _compact(value)
