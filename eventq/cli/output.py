"""Printing for the CLI: rich tables by default, JSON with ``--format json``."""

from __future__ import annotations

import datetime
import json
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console

    console: Console
    errors: Console

# rich loads when something is drawn with it: `console` and `errors` are made on first use
# (module __getattr__), so JSON output and plain messages never import it. Within this
# module, which has no such globals until then, they are `_get("console")`.


def _get(name: str) -> Console:
    made: Console | None = globals().get(name)
    if made is None:
        from rich.console import Console

        stream = sys.stdout if name == "console" else sys.stderr
        # Piped output is read by scripts and grep: do not squeeze it to 80 columns.
        # `errors` takes the messages that are not the answer (progress, the end of a
        # followed log).
        made = Console(stderr=name == "errors", width=None if stream.isatty() else 200)
        globals()[name] = made
    return made


def __getattr__(name: str) -> Any:
    if name in ("console", "errors"):
        return _get(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def pick(record: dict[str, Any], path: str) -> Any:
    """A dot path into a record: ``metadata.run_name``."""
    value: Any = record
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return ",".join(str(v) for v in value) if value else "-"
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)


#: Above this many characters of compact JSON, msgspec indents it (loading it costs less).
INDENT_BY_MSGSPEC = 100_000


def emit_json(value: Any) -> None:
    """``json.dumps(value, indent=2, default=str)``, printed. json indents in pure Python
    (100 ms for the 10,000 jobs of an import): a large value is written compact by json's
    C encoder, then indented by msgspec, which gives the same text."""
    compact = json.dumps(value, default=str, separators=(",", ":"))
    if len(compact) > INDENT_BY_MSGSPEC:
        import msgspec

        try:
            print(msgspec.json.format(compact, indent=2))
            return
        except msgspec.DecodeError:  # NaN or an infinity: json writes them, JSON has none
            pass
    print(json.dumps(value, indent=2, default=str))


def table(rows: Sequence[dict[str, Any]], fields: Sequence[str], title: str | None = None) -> None:
    from rich.markup import escape
    from rich.table import Table

    t = Table(title=title, show_lines=False)
    for f in fields:
        # Ids are copied into the next command: never cut them.
        t.add_column(f, no_wrap=f.endswith("id"), min_width=12 if f.endswith("id") else None,
                     overflow="fold")
    for row in rows:
        t.add_row(*(escape(cell(pick(row, f))) for f in fields))
    _get("console").print(t)


def when(t: float | None) -> str:
    """An epoch time as local time, to the millisecond."""
    if t is None:
        return "-"
    return datetime.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def duration(seconds: float) -> str:
    """``2h 5m``, ``4m 59s``, ``1.25s``: exact enough to compare, short enough to read."""
    if seconds < 60:
        return f"{seconds:.3f}".rstrip("0").rstrip(".") + "s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d {hours}h {minutes}m"
    if hours:
        return f"{hours}h {minutes}m {secs}s"
    return f"{minutes}m {secs}s"


def from_now(t: float, now: float) -> str:
    """``in 4m 59s`` or ``1m 2s ago``."""
    delta = t - now
    return f"in {duration(delta)}" if delta >= 0 else f"{duration(-delta)} ago"


def print_reasons(reasons: list[dict[str, Any]] | None) -> None:
    for reason in reasons or []:
        _get("console").print(f"  waits on {reason['code']}: {reason['detail']}", markup=False)


def print_estimate(record: dict[str, Any]) -> None:
    out = _get("console")
    start = record.get("estimated_start")
    note = record.get("estimate_note")
    if start is None:
        out.print(f"  estimated start: unknown ({note or 'no estimate'})", markup=False)
        return
    now = time.time()
    if start <= now + 1 and record.get("reasons"):
        # Estimates project GPUs, not limits: free GPUs do not mean it starts now.
        out.print("  estimated start: as soon as the reasons above clear (its GPUs are "
                  "free now)", markup=False)
        return
    out.print(f"  estimated start: {when(start)} ({from_now(start, now)})"
              + (f" — {note}" if note else ""), markup=False)
