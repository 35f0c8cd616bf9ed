"""How ``eventq replay why`` tells a job's completion callbacks: one step per recorded try."""

from __future__ import annotations

from eventq import events as ev

WHOSE = {"job": "the job's --notify URL", "server": "the server's --notify-url"}


def step(e: ev.Event, t: float) -> tuple[str, str] | None:
    """(state, detail) of a callback's event recorded at ``t``; None for any other event."""
    match e:
        case ev.NotificationDelivered(target=target, tries=tries, status=status):
            return "notified", f"{WHOSE[target]} took it (HTTP {status}) on try {tries}"
        case ev.NotificationFailed(target=target, tries=tries, error=error, retry_at=None):
            return "notify gave up", f"{WHOSE[target]}, try {tries}: {error}; no more tries"
        case ev.NotificationFailed(target=target, tries=tries, error=error,
                                   retry_at=float(retry_at)):
            return "notify failed", (f"{WHOSE[target]}, try {tries}: {error}; next try "
                                     f"{max(0.0, retry_at - t):.0f} s later")
        case ev.HookRan(detail=detail):
            return "on-finish hook", detail
    return None
