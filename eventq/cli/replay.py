"""``eventq replay …``: reads the log file directly, whether a server runs or not."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from eventq.cli import output
from eventq.cli.client import CliError, default_data_dir
from eventq.cli.output import emit_json, readable_times, table, when
from eventq.paths import LOG_FILE

if TYPE_CHECKING:
    from eventq.log import Record

# The fold and the log (the actors, structlog, asyncio, aiosqlite, msgspec) load when a
# replay command runs: every other command stays quick to launch.


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser],
               common: argparse.ArgumentParser) -> None:
    rp = sub.add_parser("replay", help="audit the event log").add_subparsers(
        dest="action", required=True)
    v = rp.add_parser("verify", parents=[common],
                      help="check the hash chain, the anchored head and the invariants")
    v.add_argument("--log", type=Path, help="an events.db file (default: the data directory's)")
    v.add_argument("--key", type=Path,
                   help="the log's anchor key (default: events.key beside the log)")
    v.set_defaults(run=verify)
    s = rp.add_parser("show", parents=[common], help="print events")
    s.add_argument("--log", type=Path)
    s.add_argument("--job")
    s.add_argument("--type")
    s.add_argument("--principal")
    s.add_argument("--from", dest="from_seq", type=int, default=1)
    s.add_argument("--to", dest="to_seq", type=int)
    s.set_defaults(run=show)
    st = rp.add_parser("state", parents=[common], help="the state as it was at a seq")
    st.add_argument("--log", type=Path)
    st.add_argument("--at", type=int, help="seq (default: the last)")
    st.set_defaults(run=state)
    w = rp.add_parser("why", parents=[common],
                      help="a job's story: each state, who did it, why and how long it waited")
    w.add_argument("job_id")
    w.add_argument("--log", type=Path)
    w.set_defaults(run=_why)
    at = rp.add_parser("at", parents=[common], help="who held each GPU at a moment")
    at.add_argument("time", help="ISO-8601 local time, epoch seconds, or a seq with --seq")
    at.add_argument("what", choices=["gpus"], help="what to show")
    at.add_argument("--seq", action="store_true", help="TIME is an event's seq")
    at.add_argument("--log", type=Path)
    at.set_defaults(run=_at)


def _why(args: argparse.Namespace) -> int:
    from eventq.cli import why

    return why.why(args, _conn(args))


def _at(args: argparse.Namespace) -> int:
    from eventq.cli import why

    return why.at(args, _conn(args))


def _log_path(args: argparse.Namespace) -> Path:
    path: Path = args.log or (args.data_dir or default_data_dir()) / LOG_FILE
    return path


def _conn(args: argparse.Namespace) -> Any:
    from eventq.log import connect_readonly

    try:
        return connect_readonly(_log_path(args))
    except FileNotFoundError as exc:
        raise CliError(str(exc)) from None


def verify(args: argparse.Namespace) -> int:
    """What a start checks, and the invariants; a change is named by seq, exit 1."""
    from eventq import replay
    from eventq.log import HeadTrust, KeyFileInvalid, LogCorrupt, read_key

    if args.key is not None and not args.key.is_file():
        raise CliError(f"no key file at {args.key}")
    try:
        result = replay.verify(_conn(args), read_key(_log_path(args), args.key))
    except KeyFileInvalid as exc:
        raise CliError(str(exc)) from None
    except LogCorrupt as exc:
        where = f"first bad seq {exc.seq}" if exc.first else \
            f"bad at seq {exc.seq} (changed at or before it)"
        if args.format == "json":
            emit_json({"ok": False, "first_bad_seq": exc.seq, "exact": exc.first,
                       "why": exc.why})
        else:
            from rich.markup import escape

            output.console.print(f"[red]FAIL[/red] {where}: {escape(exc.why)}", highlight=False)
        return 1
    count, problems = result.events, result.problems
    if args.format == "json":
        emit_json({"ok": not problems, "events": count, "problems": problems,
                   "anchor": result.trust.value})
    elif problems:
        output.console.print(f"[red]FAIL[/red] chain intact over {count} events, but:")
        for p in problems:
            output.console.print(f"  {p}")
    else:
        chain = "hash chain intact up to the anchored head" if result.trust is HeadTrust.KEYED \
            else "hash chain intact (no keyed anchor: a cut tail or a recomputed chain " \
                 "would not show)"
        output.console.print(f"OK: {count} events, {chain}, no GPU held twice, "
                             "no job run twice", highlight=False)
    return 1 if problems else 0


def _line(r: Record) -> dict[str, Any]:
    """An event as printed: a job's secret-looking values redacted (eventq/redact.py)."""
    import msgspec

    from eventq.redact import redact_body

    body = msgspec.to_builtins(r.event)
    body.pop("type", None)
    return {"seq": r.seq, "time": r.time, "principal": r.principal, "type": r.type,
            "body": redact_body(r.type, body)}


def show(args: argparse.Namespace) -> int:
    from eventq import replay
    from eventq.log import LogCorrupt, iter_verified

    conn = _conn(args)
    records = (r for r in iter_verified(conn) if r.seq >= args.from_seq
               and (args.to_seq is None or r.seq <= args.to_seq))
    try:
        for r in replay.select(records, args.job, args.type, args.principal):
            line = _line(r)
            if args.format == "json":
                print(json.dumps(readable_times(line), default=str))
            else:
                print(f"{r.seq:>8} {when(r.time)} {r.principal:<14} {r.type:<24} "
                      f"{json.dumps(readable_times(line['body']), default=str)}")
    except LogCorrupt as exc:
        raise CliError(str(exc)) from None
    return 0


def state(args: argparse.Namespace) -> int:
    import msgspec

    from eventq import replay
    from eventq.log import LogCorrupt

    try:
        folded = replay.fold(_conn(args), to_seq=args.at)
    except LogCorrupt as exc:
        raise CliError(str(exc)) from None
    s = folded.scheduler
    summary = {
        "at_seq": folded.last_seq, "at_time": folded.last_time,
        "by_status": dict(Counter(j.status for j in s.jobs.values())),
        "running": s.counts.total, "waiting": s.waiting_count(),
        "limits": msgspec.to_builtins(s.limits),
        "queue": [j.spec.job_id for j in s.iter_waiting(folded.last_time)][:50],
        "gpus": {node: {str(g): f"{h[0]}#{h[1]}" for g, h in sorted(n.held.items())}
                 for node, n in folded.gpus.nodes.items()},
    }
    if args.format == "json":
        emit_json(summary)
        return 0
    output.console.print(f"state at seq {summary['at_seq']}: {summary['by_status']}, "
                         f"running {summary['running']}, waiting {summary['waiting']}")
    rows = [{"node": node, "gpu": g, "held_by": h}
            for node, held in summary["gpus"].items() for g, h in held.items()]
    table(rows, ["node", "gpu", "held_by"], title="GPUs held")
    return 0
