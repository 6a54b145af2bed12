"""Pages from templates: Jinja2 with every value escaped, and the helpers templates use to show
values (cut at LONG characters, with a link to the whole) and times."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.requests import Request
from starlette.responses import HTMLResponse

from durable.dashboard._state import csrf_token, dashboard_of

HERE = Path(__file__).resolve().parent
STATIC = HERE / "static"
LONG = 2000  # characters of a value shown in place

_env = Environment(
    loader=FileSystemLoader(HERE / "templates"),
    autoescape=select_autoescape(default=True, default_for_string=True),
    trim_blocks=True,
    lstrip_blocks=True,
)


def shown(value: Any) -> str:
    """A value as indented JSON."""
    if isinstance(value, str):
        return value
    return json.dumps(value, indent=2, ensure_ascii=False, default=str)


def cut(text: str) -> tuple[str, bool]:
    """``text`` cut at LONG characters, and whether it was."""
    return (text[:LONG], True) if len(text) > LONG else (text, False)


def when(moment: datetime | None) -> str:
    return "" if moment is None else moment.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def age(span: timedelta | None) -> str:
    if span is None:
        return ""
    seconds = span.total_seconds()
    for unit, size in (("d", 86_400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.1f} s"


_env.filters.update(shown=shown, when=when, age=age)
_env.globals.update(cut=cut)


def page(request: Request, template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    dashboard = dashboard_of(request)
    html = _env.get_template(template).render(
        base=request.scope.get("root_path", ""),
        csrf=csrf_token(request),
        read_only=dashboard.read_only,
        **context,
    )
    return HTMLResponse(html, status_code=status_code)
