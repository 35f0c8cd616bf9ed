"""``eventq queue limits``: the queue's limits, for anyone to read and admins to change.

Each flag is one field of ``POST /api/queue/concurrency``; any subset may be given and the
others keep their value. The reply names the jobs the change started, so an admin who
raises a limit sees at once what it set off.
"""

from __future__ import annotations

import argparse
from typing import Any, NamedTuple

from eventq.cli import output
from eventq.cli.client import Client, CliError
from eventq.cli.output import cell, emit_json, table

#: Jobs a change started that the table names one by one; ``--format json`` lists all.
NAMED_STARTS = 10


def count(text: str) -> int:
    """A whole number; the server bounds it (and names the field if it is out of range)."""
    return int(text)


#: What ``--local-jobs``/``--local-gpus`` take for no limit (sent as null).
UNLIMITED = "unlimited"


def count_or_unlimited(text: str) -> int | str:
    return UNLIMITED if text == UNLIMITED else count(text)


class Flag(NamedTuple):
    flag: str
    field: str
    meaning: str
    metavar: str


FLAGS = (
    Flag("--max", "max_concurrent", "jobs running at once, in all", "N"),
    Flag("--per-user", "user_max_concurrent", "jobs running at once per user", "N"),
    Flag("--per-team", "team_max_concurrent", "jobs running at once per team (with fair share)",
         "N"),
    Flag("--fair-share", "enable_fair_share", "team limits apply", "on|off"),
    Flag("--local-jobs", "local_job_max_concurrent", "jobs running at once on the server's "
         "machine", "N|unlimited"),
    Flag("--local-gpus", "local_gpu_max_concurrent", "GPUs in use at once on the server's "
         "machine", "N|unlimited"),
)


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser],
               common: argparse.ArgumentParser) -> None:
    queue = sub.add_parser("queue", help="the queue's own settings").add_subparsers(
        dest="action", required=True)
    p = queue.add_parser("limits", parents=[common],
                         help="show the limits; with flags, change them (admins)",
                         description="Without flags: the limits. With any of them: change "
                                     "those (admins); the others keep their value.")
    for f in FLAGS:
        if f.field == "enable_fair_share":
            p.add_argument(f.flag, dest=f.field, choices=["on", "off"], help=f.meaning)
        else:
            kind = count_or_unlimited if f.metavar.endswith(UNLIMITED) else count
            p.add_argument(f.flag, dest=f.field, type=kind, metavar=f.metavar, help=f.meaning)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    api = Client.find(args.url, args.token, args.data_dir, args.ca)
    changes = {f.field: _value(getattr(args, f.field)) for f in FLAGS
               if getattr(args, f.field) is not None}
    reply = _change(api, changes) if changes else api.call("GET", "/api/queue/concurrency")
    if args.format == "json":
        emit_json(reply)
        return 0
    if changes:
        said = ", ".join(f"{f.flag} to {getattr(args, f.field)}" for f in FLAGS
                         if f.field in changes)
        output.console.print(f"changed {said}; {started_text(reply['started'])}", markup=False)
    table([{"flag": f.flag, "value": value_text(f.field, reply[f.field]), "limit": f.meaning}
           for f in FLAGS], ["flag", "value", "limit"], title="queue limits")
    return 0


def _value(given: int | str) -> int | bool | None:
    """What the API takes for a flag's word: ``on``/``off``, ``unlimited`` (null)."""
    if isinstance(given, int):
        return given
    return None if given == UNLIMITED else given == "on"


def _change(api: Client, changes: dict[str, Any]) -> Any:
    try:
        return api.call("POST", "/api/queue/concurrency", changes)
    except CliError as exc:
        text = str(exc)
        if "(HTTP 403)" in text:
            raise CliError("only admins may change the queue's limits (this token is not an "
                           "admin's; pass one with --token or EVENTQ_TOKEN)") from None
        flag = next((f.flag for f in FLAGS if f"[field: {f.field}]" in text), None)
        raise CliError(f"{flag}: {text}" if flag else text) from None


def started_text(started: list[dict[str, Any]]) -> str:
    if not started:
        return "no job started because of it"
    named = ", ".join(f"{s['job_id']} on {s['node']}" + (f" GPUs {cell(s['gpus'])}"
                                                          if s["gpus"] else "")
                      for s in started[:NAMED_STARTS])
    more = len(started) - NAMED_STARTS
    return (f"started {len(started)} job{'s' if len(started) > 1 else ''} because of it: "
            f"{named}" + (f" and {more} more (--format json lists them)" if more > 0 else ""))


def value_text(field: str, value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if value is None:
        return "unlimited (its GPUs are the bound)" if field == "local_job_max_concurrent" \
            else "unlimited"
    return str(value)


def line(stats: dict[str, Any]) -> str:
    """The limits in one line, for ``eventq jobs status``."""
    local_jobs, local_gpus = stats["local_job_max_concurrent"], stats["local_gpu_max_concurrent"]
    return (f"{stats['max_concurrent']} jobs, {stats['user_max_concurrent']} per user, "
            f"{stats['team_max_concurrent']} per team; local: "
            + ("any number of jobs (its GPUs are the bound)" if local_jobs is None
               else f"{local_jobs} jobs") + ", "
            + ("all its GPUs" if local_gpus is None else f"{local_gpus} GPUs")
            + f"; fair share {'on' if stats['enable_fair_share'] else 'off'} "
              "(eventq queue limits changes them)")
