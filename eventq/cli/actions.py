"""``eventq jobs position|approve|reject|retry|hold|release|priority``: acting on one job."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from eventq.cli import output
from eventq.cli.client import Client, CliError, quote
from eventq.cli.output import emit_json, print_estimate, print_reasons

#: How many failed jobs one page of ``retry --status`` asks for.
RETRY_PAGE = 500
RETRYABLE = ("failed", "cancelled")


def add_parsers(jobs: argparse._SubParsersAction[argparse.ArgumentParser],
                common: argparse.ArgumentParser) -> None:
    p = jobs.add_parser("position", parents=[common],
                        help="a job's place in the queue, every reason it waits, its start")
    p.add_argument("job_id")
    p.set_defaults(run=position)
    a = jobs.add_parser("approve", parents=[common], help="let a blocked job queue (admins)")
    a.add_argument("job_id")
    a.set_defaults(run=act, verb="approve")
    r = jobs.add_parser("reject", parents=[common], help="refuse a blocked job (admins)")
    r.add_argument("job_id")
    r.add_argument("--reason", required=True, help="why: recorded and shown to the submitter")
    r.set_defaults(run=act, verb="reject")
    h = jobs.add_parser("hold", parents=[common], help="keep a waiting job from starting")
    h.add_argument("job_id")
    h.set_defaults(run=act, verb="hold")
    rel = jobs.add_parser("release", parents=[common], help="return a held job to the queue")
    rel.add_argument("job_id")
    rel.set_defaults(run=act, verb="release")
    pr = jobs.add_parser("priority", parents=[common],
                         help="override a waiting job's priority (leads and admins)")
    pr.add_argument("job_id")
    pr.add_argument("priority", nargs="?", type=int, help="0-1000; higher starts first")
    pr.add_argument("--clear", action="store_true", help="back to its owner's level")
    pr.set_defaults(run=set_priority)
    rt = jobs.add_parser("retry", parents=[common],
                         help="run a failed or cancelled job again, as its next attempt")
    rt.add_argument("job_id", nargs="?")
    rt.add_argument("--status", choices=RETRYABLE,
                    help="retry every job in this state (yours; an admin's: everyone's)")
    rt.set_defaults(run=retry)


def _client(args: argparse.Namespace) -> Client:
    return Client.find(args.url, args.token, args.data_dir, args.ca)


def position(args: argparse.Namespace) -> int:
    found = _client(args).call("GET", f"/api/queue/position/{quote(args.job_id)}")
    if args.format == "json":
        emit_json(found)
        return 0
    where = "not in the queue" if found["position"] is None else \
        f"position {found['position']} of {found['queue_depth']}"
    output.console.print(f"{found['job_id']} is {found['status']}: {where}")
    print_reasons(found.get("reasons"))
    if found["position"] is not None:
        print_estimate(found)
    return 0


def _post(args: argparse.Namespace, verb: str, query: str = "", body: Any = None) -> Any:
    return _client(args).call("POST", f"/api/queue/{quote(args.job_id)}/{verb}{query}", body)


def _done(args: argparse.Namespace, reply: dict[str, Any], what: str) -> int:
    if args.format == "json":
        emit_json(reply)
    else:
        output.console.print(f"{reply['job_id']} {what}: now {reply['status']}")
    return 0


PAST = {"approve": "approved", "reject": "rejected", "hold": "held", "release": "released"}


def act(args: argparse.Namespace) -> int:
    query = f"?reason={quote(args.reason)}" if args.verb == "reject" and args.reason else ""
    return _done(args, _post(args, args.verb, query), PAST[args.verb])


def set_priority(args: argparse.Namespace) -> int:
    if args.clear == (args.priority is not None):
        raise CliError("give a priority (0-1000), or --clear to return to the owner's level")
    if args.priority is not None and not 0 <= args.priority <= 1000:
        raise CliError(f"priority must be between 0 and 1000 (got {args.priority})")
    reply = _post(args, "priority", body={"priority": args.priority})
    what = "priority cleared" if args.clear else f"priority set to {args.priority}"
    return _done(args, reply, what)


def retry(args: argparse.Namespace) -> int:
    if (args.job_id is None) == (args.status is None):
        raise CliError("give a job id, or --status failed to retry every failed job")
    if args.job_id is not None:
        return _done(args, _post(args, "retry"), "retried")
    return _retry_all(args, _client(args))


def _retry_all(args: argparse.Namespace, api: Client) -> int:
    """Page through the jobs in ``--status``, retrying each once.

    A retried job leaves the state, so the next page starts over; a job that fails
    again while this runs is not retried twice (``seen``).
    """
    seen: set[str] = set()
    retried: list[str] = []
    problems: list[dict[str, str]] = []
    skipped = 0
    while True:
        # Jobs refused or failed to retry stay in the list: skip past them.
        page = api.call("GET", f"/api/queue?status={args.status}&include_completed=true"
                               f"&limit={RETRY_PAGE}&offset={skipped + len(problems)}")["jobs"]
        fresh = [j["job_id"] for j in page if j["job_id"] not in seen]
        if not fresh:
            break
        for job_id in fresh:
            seen.add(job_id)
            try:
                api.call("POST", f"/api/queue/{quote(job_id)}/retry")
            except CliError as exc:
                if exc.status == 403:
                    skipped += 1  # another user's job: not ours to retry
                else:
                    problems.append({"job_id": job_id, "error": str(exc)})
                continue
            retried.append(job_id)
    if args.format == "json":
        emit_json({"retried": retried, "skipped_not_yours": skipped, "errors": problems})
    else:
        output.console.print(f"retried {len(retried)} {args.status} jobs"
                             + (f": {', '.join(retried)}" if retried else ""))
        if skipped:
            output.console.print(f"skipped {skipped} jobs of other users")
    for problem in problems:
        print(f"eventq: {problem['job_id']}: {problem['error']}", file=sys.stderr)
    return 1 if problems else 0
