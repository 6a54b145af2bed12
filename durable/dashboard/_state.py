"""What every request of one dashboard shares, and the CSRF check its actions make."""

from __future__ import annotations

import asyncio
import hmac
from dataclasses import dataclass, field

from starlette.requests import Request

from durable._app import App
from durable.dashboard._live import Hub

CSRF_COOKIE = "durable_csrf"


@dataclass
class Dashboard:
    """One dashboard: its app (connected on first use, so that a dashboard mounted in another
    application needs no lifespan of its own), whether it offers actions, and the hub that
    tells live pages a run changed."""

    app: App
    read_only: bool
    hub: Hub = field(default_factory=Hub)
    _opening: asyncio.Lock = field(default_factory=asyncio.Lock)
    _owned: bool = False
    _ready: bool = False

    async def ready(self) -> App:
        if not self._ready:
            async with self._opening:
                if not self._ready:
                    if not self.app.connected:
                        await self.app.connect()
                        self._owned = True
                    self.hub.attach(self.app)
                    self._ready = True
        return self.app

    async def close(self) -> None:
        await self.hub.close()
        if self._owned:
            await self.app.close()
        self._ready = self._owned = False


def dashboard_of(request: Request) -> Dashboard:
    found: Dashboard = request.app.state.dashboard
    return found


def csrf_token(request: Request) -> str:
    """This browser's CSRF token (set by the guard on every request)."""
    token: str = request.scope["state"]["csrf"]
    return token


def same_secret(given: str, expected: str) -> bool:
    """Whether ``given`` is ``expected``, compared in constant time (as bytes: any text a
    client sends is compared, not refused with an error)."""
    encoded = given.encode("utf-8", "surrogateescape")
    return hmac.compare_digest(encoded, expected.encode("utf-8", "surrogateescape"))


def csrf_ok(request: Request, given: object) -> bool:
    """Whether a form's CSRF field matches this browser's cookie."""
    cookie = request.cookies.get(CSRF_COOKIE, "")
    return bool(cookie) and isinstance(given, str) and same_secret(given, cookie)
