"""Printing for the CLI: rich tables by default, JSON with ``--format json``."""

from __future__ import annotations

import sys
import time

from eventq.cli import cjson
from eventq.timefmt import DAY, iso, relative
from eventq.timefmt import duration as duration  # the CLI's commands take it from here

# typing is not imported at run time (2.5 ms of every command): annotations are strings.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence
    from typing import Any

    from rich.console import Console
    from rich.table import Table

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
        return cjson.dumps(value)
    return str(value)


#: Above this many characters of compact JSON, msgspec indents it (loading it costs less).
INDENT_BY_MSGSPEC = 100_000


def emit_json(value: Any) -> None:
    """``json.dumps(value, indent=2, default=str)``, printed, its times as ISO 8601. json
    indents in pure Python (100 ms for the 10,000 jobs of an import): a large value is
    written compact by json's C encoder, then indented by msgspec, which gives the same
    text."""
    import json  # not at the top: a table needs only ``cjson`` (its docstring says why)

    value = readable_times(value)
    compact = json.dumps(value, default=str, separators=(",", ":"))
    if len(compact) > INDENT_BY_MSGSPEC:
        import msgspec

        try:
            print(msgspec.json.format(compact, indent=2))
            return
        except msgspec.DecodeError:  # NaN or an infinity: json writes them, JSON has none
            pass
    print(json.dumps(value, indent=2, default=str))


def grid(fields: Sequence[str], rows: Iterable[Sequence[str]],
         title: str | None = None) -> Table:
    """A table of text cells (shown as they are: no markup)."""
    from rich.markup import escape
    from rich.table import Table

    t = Table(title=title, show_lines=False)
    for f in fields:
        # Ids are copied into the next command: never cut them.
        t.add_column(f, no_wrap=f.endswith("id"), min_width=12 if f.endswith("id") else None,
                     overflow="fold")
    for row in rows:
        t.add_row(*(escape(c) for c in row))
    return t


def table(rows: Sequence[dict[str, Any]], fields: Sequence[str], title: str | None = None) -> None:
    _get("console").print(grid(fields, ([cell(pick(row, f)) for f in fields] for row in rows),
                               title))


def did_you_mean(word: str, choices: Iterable[str], most: int = 3) -> str:
    """``did you mean submit?`` (or ``submit or status?``); "" when nothing is near."""
    import difflib

    near = difflib.get_close_matches(word, list(choices), n=most, cutoff=0.6)
    return f"did you mean {' or '.join(near)}?" if near else ""


def when(t: float | None) -> str:
    """An epoch time as local time, to the millisecond (a moment named in a sentence)."""
    if t is None:
        return "-"
    import datetime

    return datetime.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def stamp(t: float, now: float) -> str:
    """A row of a history: ``14:20:03`` within a day of ``now``, else with its date."""
    import datetime

    moment = datetime.datetime.fromtimestamp(t)
    return moment.strftime("%H:%M:%S" if abs(now - t) < DAY else "%Y-%m-%d %H:%M:%S")


#: Fields that hold an epoch time wherever they appear in an answer: JSON and ``-o`` output
#: show them as ISO 8601 (``timefmt.iso``).
TIME_FIELDS = frozenset({
    "time", "timestamp", "queued_at", "started_at", "completed_at", "finished_at",
    "begin_at", "estimated_start", "as_of", "at_time", "last_event_time", "since", "start",
    "end", "accepts_until"})
#: Free data of the user's (or a trainer's): its keys mean what they mean to them.
OPAQUE_FIELDS = frozenset({"metadata", "config", "env", "exported_env", "labels",
                           "worker_labels", "params", "cells"})


def readable_times(value: Any) -> Any:
    """``value`` with each epoch time of a TIME_FIELDS key as ISO 8601 (a copy where one
    changes); numbers elsewhere, and everything inside OPAQUE_FIELDS, stay as they are."""
    if isinstance(value, list):
        return [readable_times(v) for v in value]
    if not isinstance(value, dict):
        return value
    out = {}
    for key, item in value.items():
        if key in TIME_FIELDS and isinstance(item, int | float) and not isinstance(item, bool):
            out[key] = iso(item)
        elif key in OPAQUE_FIELDS or not isinstance(item, dict | list):
            out[key] = item
        else:
            out[key] = readable_times(item)
    return out


def from_now(t: float, now: float) -> str:
    """``in 38 min`` or ``2 h ago``."""
    return relative(t, now)


def say(line: str) -> None:
    """One line of an answer as it is: no markup, no highlighting, and no rich to load (a
    third of the CPU of `eventq jobs submit` was rich's import, for one line)."""
    print(line)


def print_reasons(reasons: list[dict[str, Any]] | None) -> None:
    for reason in reasons or []:
        say(f"  waits on {reason['code']}: {reason['detail']}")


def print_estimate(record: dict[str, Any]) -> None:
    start = record.get("estimated_start")
    note = record.get("estimate_note")
    basis = estimate_basis_words(record.get("estimate_basis"))
    if start is None:
        say(f"  estimated start: unknown ({basis or note or 'no estimate'})")
        return
    now = time.time()
    if start <= now + 1 and record.get("reasons") and not basis:
        # Estimates project GPUs, not limits: free GPUs do not mean it starts now.
        say("  estimated start: as soon as the reasons above clear (its GPUs are free now)")
        return
    say(f"  estimated start: {when(start)} ({from_now(start, now)})"
        + (f", {basis}" if basis else "") + (f" — {note}" if note else ""))


#: How a job's end is known: what ``by`` of an estimate's basis names.
BY_WORDS = {"time_limit": "time limit", "estimated_runtime": "estimated end"}


def estimate_basis_words(basis: dict[str, Any] | None) -> str:
    """What an estimate rests on, in words: ``after job train-a ends, its time limit is
    14:20:00`` or ``no estimate: job train-a has no time limit``; "" when nothing is said."""
    if not basis:
        return ""
    if basis["kind"] == "gpus_free":
        return "its GPUs are free"
    if basis["kind"] == "begin_at":
        return "no earlier than its begin time"
    job = f"job {basis.get('name') or basis['job_id']} ({basis['job_id']}" + \
        (", ahead of it in the queue)" if basis.get("status") == "pending" else ")")
    if basis.get("end") is None:
        by = basis.get("by")
        return f"no estimate: {job} ran past its {BY_WORDS[by]}" if by else \
            f"no estimate: {job} has no time limit"
    frees = " and frees a slot of its limit" if basis.get("frees") == "slot" else ""
    end = stamp(basis['end'], time.time())
    return f"after {job} ends{frees}, its {BY_WORDS[basis['by']]} is {end}"
