"""Times and durations as people read them; the standard library only (the CLI loads it).

Stored times are epoch seconds (the log, the HTTP API). What a person or a script reads is
one of: ``iso`` (ISO 8601 with the local offset: JSON and ``-o`` output), ``clock`` (a
table's "14:20", or the date once it is more than a day away), ``relative`` ("in 38 min"),
and ``duration`` ("1h 02m").
"""

from __future__ import annotations

# datetime (1.3 ms of CPU) loads with the first time formatted: `eventq jobs submit` prints
# none, and imports this module.

DAY = 86_400.0


def iso(t: float) -> str:
    """``2026-11-24T14:20:03.123456+01:00``: local time, its offset, to the microsecond
    (always six digits, so that two such strings of one offset sort as their times do)."""
    import datetime

    return datetime.datetime.fromtimestamp(t).astimezone().isoformat(timespec="microseconds")


def clock(t: float, now: float) -> str:
    """``14:20`` within a day of ``now``, else the date: ``2026-11-21``."""
    import datetime

    moment = datetime.datetime.fromtimestamp(t)
    return moment.strftime("%H:%M") if abs(now - t) < DAY else moment.strftime("%Y-%m-%d")


def relative(t: float, now: float) -> str:
    """``in 38 min``, ``2 h ago``, ``in 3 days``: the whole units passed (a reader wants
    the order of magnitude; ``clock`` or ``iso`` give the moment)."""
    delta = t - now
    span = abs(delta)
    if span < 60:
        text = f"{span:.0f} s"
    elif span < 3600:
        text = f"{int(span // 60)} min"
    elif span < DAY:
        text = f"{int(span // 3600)} h"
    else:
        days = int(span // DAY)
        text = f"{days} day" + ("s" if days > 1 else "")
    return f"in {text}" if delta >= 0 else f"{text} ago"


def duration(seconds: float) -> str:
    """``0.25s``, ``42s``, ``4m 05s``, ``1h 02m``, ``3d 04h``: the two largest units."""
    if seconds < 0:
        return "-" + duration(-seconds)
    if seconds < 10:
        return f"{seconds:.2f}".rstrip("0").rstrip(".") + "s"
    whole = round(seconds)
    minutes, secs = divmod(whole, 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d {hours:02d}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"
