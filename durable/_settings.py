"""``Settings``: how an app connects and how its workers run, checked when the app is built."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from engine import _limits, _urls, dump
from engine.errors import ConfigurationError, InvalidInput, SerializationError


@dataclass(frozen=True)
class Settings:
    """An app's settings (see ``App``): a value out of range is a ConfigurationError here,
    not a worker that spins or never claims later."""

    database_url: str | None = None
    listen_url: str | None = None
    pooled: bool | None = None
    lease: timedelta = timedelta(seconds=30)
    poll_interval: timedelta = timedelta(seconds=2)
    short_wait: timedelta = timedelta(milliseconds=250)
    pool_size: int = 10
    connect_timeout: float | None = None
    max_payload_bytes: int | None = 1 << 20
    retention: timedelta | None = None
    cleanup_interval: timedelta = timedelta(minutes=10)
    eager_start: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "lease", setting(self.lease, "App: lease", positive=True))
        object.__setattr__(
            self, "poll_interval", setting(self.poll_interval, "App: poll_interval", True)
        )
        object.__setattr__(self, "short_wait", setting(self.short_wait, "App: short_wait"))
        _limits.count(self.pool_size, "App: pool_size", ConfigurationError)
        if self.connect_timeout is not None:
            setting(self.connect_timeout, "App: connect_timeout", positive=True)
        if self.max_payload_bytes is not None:
            _limits.count(self.max_payload_bytes, "App: max_payload_bytes", ConfigurationError)
        object.__setattr__(self, "retention", retention(self.retention, "App: retention"))
        object.__setattr__(
            self, "cleanup_interval", setting(self.cleanup_interval, "App: cleanup_interval", True)
        )
        if self.listen_url is not None:
            _urls.check(self.listen_url)
        if self.pooled is not None and not isinstance(self.pooled, bool):
            raise ConfigurationError(f"App: pooled must be True or False, got {self.pooled!r}")
        if not isinstance(self.eager_start, bool):
            raise ConfigurationError(
                f"App: eager_start must be True or False, got {self.eager_start!r}"
            )


def setting(value: object, what: str, positive: bool = False) -> timedelta:
    """A duration setting (never negative; with ``positive``, more than zero), or
    ConfigurationError."""
    return _limits.duration(
        value, what, error=ConfigurationError, negative=False, zero=not positive
    )


MIN_RETENTION = timedelta(hours=1)


def retention(value: object, what: str) -> timedelta | None:
    """A retention (None: keep for ever), at least MIN_RETENTION, or ConfigurationError."""
    if value is None:
        return None
    span = setting(value, what, positive=True)
    if span < MIN_RETENTION:
        raise ConfigurationError(f"{what} must be at least an hour, got {span}")
    return span


def json_or_invalid(value: Any, what: str, max_bytes: int | None) -> Any:
    """``value`` as JSON-compatible data, or InvalidInput naming ``what``."""
    try:
        return dump(Any, value, what, max_bytes)
    except SerializationError as exc:
        raise InvalidInput(str(exc)) from exc
