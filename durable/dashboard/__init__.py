"""The web dashboard: find any run, see its timeline, act on it.

``durable dashboard`` serves it; ``asgi(url_or_app)`` is the same thing as an ASGI application
to mount in your own. It needs the optional dependencies of ``pip install durable[dashboard]``.
"""

from __future__ import annotations

from engine.errors import ConfigurationError

try:
    import jinja2  # noqa: F401
    import starlette  # noqa: F401
except ImportError as exc:  # pragma: no cover - the extra is installed in the tests
    raise ConfigurationError(
        f"the dashboard needs its optional dependencies ({exc.name} is missing): "
        "pip install 'durable[dashboard]'"
    ) from exc

from durable.dashboard._serve import serve
from durable.dashboard._server import asgi

__all__ = ["asgi", "serve"]
