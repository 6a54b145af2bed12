"""``durable dashboard``: the dashboard served by uvicorn, on a loopback address unless a token
guards it."""

from __future__ import annotations

import ipaddress
import logging

from durable._app import App
from engine.errors import ConfigurationError

log = logging.getLogger("durable.dashboard")


def check_bind(host: str, token: str | None) -> None:
    """ConfigurationError when ``host`` is not a loopback address and no token guards it."""
    if token:
        return
    try:
        local = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        local = False
    if not local:
        raise ConfigurationError(
            f"the dashboard would listen on {host}, beyond this machine, without a token: "
            "give --token (or DURABLE_DASHBOARD_TOKEN), or listen on 127.0.0.1"
        )


async def serve(
    target: str | App,
    *,
    host: str = "127.0.0.1",
    port: int = 8484,
    token: str | None = None,
    read_only: bool = False,
) -> None:
    """Serve the dashboard until cancelled. Binding anywhere but a loopback address requires
    a token: ConfigurationError otherwise, before anything listens."""
    check_bind(host, token)
    import uvicorn

    from durable.dashboard._server import asgi

    site = asgi(target, token=token, read_only=read_only)
    config = uvicorn.Config(
        site, host=host, port=port, log_level="warning", lifespan="on", access_log=False
    )
    server = uvicorn.Server(config)
    shown = host if ":" not in host else f"[{host}]"
    guarded = "" if token is None else " (token required)"
    log.warning("dashboard on http://%s:%d/%s", shown, port, guarded)
    await server.serve()
