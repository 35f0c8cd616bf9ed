"""Where a notification may go: an absolute http or https URL, checked before it is stored.

A webhook's URL often is its secret (Slack's and Discord's hold their token in the path), so
wherever one is shown, only its origin is: ``shown``.
"""

from __future__ import annotations

import yarl

from eventq.http.bounds import CONTROL, URL_CHARS


def url_problem(url: str) -> str | None:
    """Why a notification cannot be sent to ``url``; None when it can."""
    if len(url) > URL_CHARS:
        return f"is longer than {URL_CHARS} characters"
    if CONTROL.search(url) or any(c.isspace() for c in url):
        return "must not contain spaces or control characters"
    try:
        parsed = yarl.URL(url)
        port = parsed.port
    except ValueError as exc:
        return f"is not a URL ({exc})"
    if parsed.scheme not in ("http", "https"):
        return f"must be an http:// or https:// URL (not {parsed.scheme or 'relative'})"
    if not parsed.host:
        return "names no host"
    if port == 0:
        return "names port 0"
    return None


#: What stands for the rest of a shown URL (``eventq/redact.py``'s word).
HIDDEN = "<redacted>"


def shown(url: str) -> str:
    """The URL's origin, and ``/<redacted>`` for whatever follows it (a path, a query, a
    password)."""
    try:
        origin = str(yarl.URL(url).origin())
    except ValueError:
        return HIDDEN
    return origin + (f"/{HIDDEN}" if url.rstrip("/") != origin else "")
