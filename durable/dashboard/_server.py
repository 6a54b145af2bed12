"""The dashboard as an ASGI application: its routes, who may use it, and the headers every
response carries.

Safe by default. A token (``token=``) is asked for unless the dashboard listens on a loopback
address: in an ``Authorization: Bearer`` header, or once as ``?token=`` (then kept in a
cookie). Every action is a POST carrying the CSRF token of a cookie that only this site can
read (SameSite=Strict, compared in constant time); ``read_only`` hides and refuses every
action. Jinja2 escapes every value a run carries; the Content-Security-Policy allows no inline
script or style and nothing from another origin."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlencode

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from durable._app import App
from durable.dashboard import _actions, _pages
from durable.dashboard._render import STATIC
from durable.dashboard._state import CSRF_COOKIE, Dashboard, same_secret

TOKEN_COOKIE = "durable_token"
POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "content-security-policy": POLICY,
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
    "x-frame-options": "DENY",
    "cache-control": "no-store",
}


def asgi(target: str | App, *, token: str | None = None, read_only: bool = False) -> ASGIApp:
    """The dashboard as an ASGI application, for a database URL or an ``App``; mount it in your
    own (Starlette: ``Mount("/durable", app=durable.dashboard.asgi(app))``; FastAPI:
    ``api.mount("/durable", ...)``). With ``token``, every request must carry it. Actions go
    through the app's own methods (those the CLI uses); ``read_only`` offers none."""
    app = target if isinstance(target, App) else App(database_url=target)
    dashboard = Dashboard(app, read_only)
    routes = [
        Route("/", _pages.runs_page, name="runs"),
        Route("/runs/{run_id}", _pages.run_page, name="run"),
        Route("/runs/{run_id}/fragment", _pages.run_fragment, name="run_fragment"),
        Route("/runs/{run_id}/live", _pages.run_live, name="run_live"),
        Route("/runs/{run_id}/value/{what}", _pages.run_value, name="run_value"),
        Route("/capacity", _pages.capacity_page, name="capacity"),
        Route("/actions/run", _actions.run_action, methods=["POST"], name="run_action"),
        Route("/actions/event", _actions.send_event, methods=["POST"], name="send_event"),
        Route("/actions/bulk", _actions.bulk_action, methods=["POST"], name="bulk_action"),
        Mount("/static", app=StaticFiles(directory=STATIC), name="static"),
    ]

    @asynccontextmanager
    async def lifespan(_site: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await dashboard.close()

    site = Starlette(routes=routes, lifespan=lifespan)
    site.state.dashboard = dashboard
    return _Guard(site, token)


class _Guard:
    """Every request: the token when one is set, a CSRF cookie, the security headers."""

    def __init__(self, site: Starlette, token: str | None) -> None:
        self.site = site
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.site(scope, receive, send)
            return
        request = Request(scope)
        refused = None if self.token is None else self._refused(request)
        if refused is not None:
            for name, value in HEADERS.items():
                refused.headers[name] = value
            await refused(scope, receive, send)
            return
        csrf = request.cookies.get(CSRF_COOKIE) or secrets.token_urlsafe(24)
        scope.setdefault("state", {})["csrf"] = csrf
        fresh = CSRF_COOKIE not in request.cookies

        async def send_secured(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [(k.encode(), v.encode()) for k, v in HEADERS.items()]
                if fresh:
                    cookie = f"{CSRF_COOKIE}={csrf}; Path=/; SameSite=Strict; HttpOnly"
                    headers.append((b"set-cookie", cookie.encode()))
                message["headers"] = headers
            await send(message)

        await self.site(scope, receive, send_secured)

    def _refused(self, request: Request) -> Response | None:
        """None when the request carries the token; else the response to send instead."""
        token: Any = self.token
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        cookie = request.cookies.get(TOKEN_COOKIE, "")
        if any(v and same_secret(v, token) for v in (given, cookie)):
            return None
        query = request.query_params.get("token", "")
        if query and same_secret(query, token):
            rest = [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
            target = str(request.url.replace(query=urlencode(rest)))
            redirect = RedirectResponse(target, status_code=303)
            redirect.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
            return redirect
        return PlainTextResponse(
            "a token is required: open this page once with ?token=..., or send the header "
            "'Authorization: Bearer ...'",
            status_code=401,
        )
