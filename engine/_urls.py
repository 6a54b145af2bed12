"""Database URLs: which ones are accepted, and how they are shown.

Every message and log line that names a database URL shows it through ``redact``, so that a
password, in the user part (``postgresql://u:secret@host/db``) or in the query
(``?password=secret``, ``?sslpassword=...``), never reaches a terminal or a log file.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit

from engine.errors import ConfigurationError

SCHEMES = ("postgresql", "postgres")
_HIDDEN = "***"
# What looks like "user:password@" or "password=..." in text that urlsplit cannot take apart.
_CREDENTIALS = re.compile(r"(?P<user>[^:@/\s]*):(?!//)[^@\s]*@")
_SECRET_PARAMETER = re.compile(r"(?i)(?P<name>[a-z_]*password)=[^&#\s]*")


def redact(url: str) -> str:
    """``url`` with every password replaced by ``***``; a URL without one is unchanged."""
    if "://" not in url:
        return _by_pattern(url)
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            credentials, hosts = netloc.rsplit("@", 1)
            user, has_password, _password = credentials.partition(":")
            netloc = f"{user}:{_HIDDEN}@{hosts}" if has_password else netloc
        query = parts.query
        if "password" in query.lower():
            pairs = parse_qsl(query, keep_blank_values=True)
            query = urlencode(
                [(k, _HIDDEN if k.lower().endswith("password") else v) for k, v in pairs],
                safe="*/",
            )
        if (netloc, query) == (parts.netloc, parts.query):
            return url
        # Not urlunsplit: it drops the "//" of a URL with no host (postgresql:///db?host=/run).
        return (
            f"{parts.scheme}://{netloc}{parts.path}"
            + (f"?{query}" if query else "")
            + (f"#{parts.fragment}" if parts.fragment else "")
        )
    except ValueError:  # not a URL urllib can parse
        return _by_pattern(url)


def _by_pattern(text: str) -> str:
    """``text`` with whatever looks like a password hidden."""
    text = _CREDENTIALS.sub(rf"\g<user>:{_HIDDEN}@", text)
    return _SECRET_PARAMETER.sub(rf"\g<name>={_HIDDEN}", text)


def check(url: str) -> str:
    """``url`` if it is a PostgreSQL URL, else ConfigurationError (showing it redacted)."""
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme not in SCHEMES:
        raise ConfigurationError(
            f"a database URL must start with postgresql:// or postgres://, got {redact(url)!r}"
        )
    return url
