"""``eventq jobs list`` and ``eventq jobs show``: the queue and one job, as tables that say
what they leave out (rows past ``-l``, finished jobs without ``-a``), with times a person
reads ("14:20", "in 38 min", "1h 02m") and ISO 8601 for scripts (``--format json``, ``-o``);
``--watch`` redraws either from the event stream (eventq/cli/watch.py, loaded only then)."""

from __future__ import annotations

import argparse
import shlex
import time
from typing import TYPE_CHECKING, Any

from eventq.cli import output
from eventq.cli.client import Client, CliError, quote
from eventq.cli.output import cell, did_you_mean, emit_json, pick
from eventq.timefmt import clock, duration, iso, relative

if TYPE_CHECKING:
    from rich.console import RenderableType

LIST_FIELDS = ["job_id", "name", "user", "status", "gpus", "allocated_gpus", "started",
               "runtime", "position", "reasons"]
#: What ``GET /api/queue`` tells of a job (``metadata.KEY`` reaches into its metadata).
RECORD_FIELDS = (
    "job_id", "name", "user", "team", "status", "priority", "effective_priority", "gpus",
    "allocated_gpus", "node", "target", "attempt", "max_attempts", "queued_at", "started_at",
    "completed_at", "exit_code", "error", "metadata", "depends_on", "begin_at", "reasons",
    "position", "estimated_start", "estimate_note", "estimate_basis")
#: Columns worked out from the record: when it started (a waiting job: when it is expected
#: to), and how long it has run.
DERIVED_FIELDS = ("started", "runtime")
WAITING = frozenset({"pending", "waiting", "blocked", "held"})
FINISHED = frozenset({"completed", "failed", "cancelled", "rejected"})
DETAIL_KEYS = ("job_id", "name", "user", "status", "gpus", "allocated_gpus", "node", "attempt",
               "position", "exit_code", "error", "command", "cwd")


# --- fields -------------------------------------------------------------------------------


def output_fields(text: str | None) -> list[str] | None:
    """The ``-o`` fields, each known (or a key of metadata); None for the default table."""
    if text is None:
        return None
    fields = [f.strip() for f in text.split(",") if f.strip()]
    if not fields:
        raise CliError("-o needs at least one field, e.g. -o job_id,status")
    known = (*RECORD_FIELDS, *DERIVED_FIELDS)
    for field in fields:
        head, dot, _ = field.partition(".")
        if field in known or (dot and head == "metadata"):
            continue
        nearest = did_you_mean(head, known, most=1)
        if dot and nearest:
            nearest = nearest.replace("?", f".{field.partition('.')[2]}?")
        raise CliError(f"unknown field {field!r} in -o" + (f"; {nearest}" if nearest else "")
                       + f" (fields: {', '.join(known)}, metadata.KEY)")
    return fields


def expected_start(job: dict[str, Any]) -> float | None:
    """When it started; for a job that waits, when it is expected to (its estimate, else
    its begin time), as Slurm's START_TIME does."""
    found = job.get("estimated_start") or job.get("begin_at") if job["status"] in WAITING \
        else job.get("started_at")
    return None if found is None else float(found)


def runtime(job: dict[str, Any], now: float) -> float | None:
    started = job.get("started_at")
    if started is None or job["status"] in WAITING:
        return None
    if job["status"] in FINISHED:
        ended = job.get("completed_at")
        return None if ended is None else float(ended - started)
    return now - float(started)


def for_script(job: dict[str, Any], field: str, fmt: str, now: float) -> Any:
    """A ``-o`` value: times as ISO 8601, a runtime in seconds (JSON) or ``1h 02m``."""
    if field == "started":
        value = expected_start(job)
        return None if value is None else iso(value)
    if field == "runtime":
        ran = runtime(job, now)
        return ran if fmt == "json" or ran is None else duration(ran)
    if field == "reasons" and fmt != "json":
        return reasons_text(job) or None
    value = pick(job, field)
    if field in output.TIME_FIELDS and isinstance(value, int | float):
        return iso(value)
    return value


def for_person(job: dict[str, Any], field: str, now: float) -> str:
    """A cell of the default table: "14:20", "in 38 min", "1h 02m", reasons in a line."""
    if field == "started":
        value = expected_start(job)
        if value is None:
            return "-"
        return relative(value, now) if job["status"] in WAITING else clock(value, now)
    if field == "runtime":
        ran = runtime(job, now)
        return "-" if ran is None else duration(ran)
    if field == "reasons":
        return reasons_text(job) or "-"
    return cell(pick(job, field))


def reasons_text(job: dict[str, Any]) -> str:
    return "; ".join(f"{r['code']}: {r['detail']}" for r in job.get("reasons") or [])


# --- jobs list ------------------------------------------------------------------------------


class Listing:
    """One reading of ``GET /api/queue``, and what it leaves out."""

    def __init__(self, api: Client, args: argparse.Namespace,
                 fields: list[str] | None) -> None:
        self.api, self.args, self.fields = api, args, fields
        self.jobs: list[dict[str, Any]] = []
        self.total = 0
        #: Finished jobs, counted when the listing of unfinished ones is empty.
        self.finished = 0

    def query(self) -> str:
        query = f"?limit={self.args.limit}" + ("&include_completed=true" if self.args.all
                                               else "")
        return query + (f"&status={quote(self.args.status)}" if self.args.status else "")

    def start(self) -> None:
        self.read()

    def read(self) -> None:
        reply = self.api.call("GET", "/api/queue" + self.query())
        self.jobs, self.total = reply["jobs"], reply.get("total", len(reply["jobs"]))
        if not self.jobs and not self.args.all and not self.args.status:
            self.finished = self.api.call(
                "GET", "/api/queue?limit=1&include_completed=true").get("total", 0)

    def note(self) -> str | None:
        """What the rows leave out, in a line; None when they are everything."""
        if self.jobs:
            if len(self.jobs) >= self.total:
                return None
            return f"{len(self.jobs):,} of {self.total:,} (use -l N" + \
                ("" if self.args.all else " / -a") + ")"
        if self.args.status:
            return f"no jobs with status {self.args.status}"
        if self.finished:
            return f"no unfinished jobs; -a shows the {self.finished:,} finished"
        return "no jobs yet (submit one: eventq jobs submit -- CMD ARGS…)"

    def concerns(self, record: dict[str, Any]) -> bool:
        return True  # any event may move a job, a reason or a position

    def over(self) -> bool:
        return False

    def as_json(self) -> Any:
        if self.fields is None:
            return self.jobs
        now = time.time()
        return [{f: for_script(j, f, "json", now) for f in self.fields} for j in self.jobs]

    def draw(self, now: float) -> RenderableType:
        from rich.console import Group
        from rich.text import Text

        note = self.note()
        if not self.jobs:
            return Text(note or "")
        fields = self.fields or LIST_FIELDS
        rows = ([cell(for_script(j, f, "table", now)) for f in fields] for j in self.jobs) \
            if self.fields else ([for_person(j, f, now) for f in fields] for j in self.jobs)
        table = output.grid(fields, rows)
        return Group(table, Text(note)) if note else table


def list_jobs(args: argparse.Namespace) -> int:
    listing = Listing(client(args), args, output_fields(args.fields))
    if args.watch:
        from eventq.cli.watch import watch

        return watch(listing.api, listing, args.format)
    listing.read()
    if args.format == "json":
        emit_json(listing.as_json())
        note = listing.note()
        if note:
            output.errors.print(f"eventq: {note}", markup=False, highlight=False)
        return 0
    output.console.print(listing.draw(time.time()))
    return 0


def client(args: argparse.Namespace) -> Client:
    return Client.find(args.url, args.token, args.data_dir, args.ca)


# --- jobs show ------------------------------------------------------------------------------


class JobPage:
    """One job and its history (``GET /api/jobs/{id}`` and its events)."""

    def __init__(self, api: Client, job_id: str) -> None:
        self.api, self.job_id = api, job_id
        self.job: dict[str, Any] = {}
        self.events: list[dict[str, Any]] = []

    def start(self) -> None:
        self.read()

    def read(self) -> None:
        self.job = self.api.call("GET", f"/api/jobs/{quote(self.job_id)}")
        self.events = self.api.call("GET", f"/api/jobs/{quote(self.job_id)}/events")["events"]

    def concerns(self, record: dict[str, Any]) -> bool:
        body = record.get("body") or {}
        return self.job_id in (body.get("job_id"), (body.get("job") or {}).get("job_id")) \
            or self.job_id in (body.get("job_ids") or ())

    def over(self) -> bool:
        return self.job.get("status") in FINISHED

    def as_json(self) -> Any:
        return {"job": self.job, "events": self.events}

    def draw(self, now: float) -> RenderableType:
        from rich.console import Group
        from rich.text import Text

        lines: list[RenderableType] = [_detail(key, value) for key, value in
                                       self.details(now)]
        rows = ([output.stamp(e["time"], now), e["principal"], e["type"], _short(e["body"])]
                for e in self.events)
        lines.append(output.grid(["time", "by", "event", "detail"], rows, title="history"))
        return Group(*lines) if lines else Text("")

    def details(self, now: float) -> list[tuple[str, str]]:
        job = self.job
        out = [(key, cell(job[key])) for key in DETAIL_KEYS if job.get(key) is not None]
        if isinstance(job.get("command"), list):  # as a shell would take it again
            out[[k for k, _ in out].index("command")] = ("command", shlex.join(job["command"]))
        out += _times(job, now)
        if job.get("env"):  # as the server shows it: secret-looking values redacted
            out.append(("env", " ".join(f"{k}={v}" for k, v in job["env"].items())))
        if job.get("exported_env"):
            out.append(("exported env", f"{job['exported_env']} variables, for a run on the "
                                        "server's machine"))
        if job.get("reasons"):
            out.append(("waits on", reasons_text(job)))
        return out


def _times(job: dict[str, Any], now: float) -> list[tuple[str, str]]:
    """Submitted, started (or expected to), ended, and for how long: local and relative."""
    def moment(t: float) -> str:
        return f"{clock(t, now)} ({relative(t, now)})"

    out = [("submitted", moment(job["queued_at"]))]
    start = expected_start(job)
    if start is not None:
        out.append(("starts" if job["status"] in WAITING else "started", moment(start)))
    if job["status"] in WAITING and (basis := output.estimate_basis_words(
            job.get("estimate_basis"))):
        out.append(("estimate", basis))
    if job["status"] in FINISHED and job.get("completed_at") is not None:
        out.append(("ended", moment(job["completed_at"])))
    ran = runtime(job, now)
    if ran is not None:
        out.append(("runtime", duration(ran)))
    return out


def _detail(key: str, value: str) -> RenderableType:
    from rich.text import Text

    line = Text(f"{key}: ", style="bold")
    line.append(value)
    return line


def _short(body: dict[str, Any]) -> str:
    body = {k: v for k, v in body.items() if k not in ("job_id", "job") and v not in ("", None)}
    return ", ".join(f"{k}={cell(v)}" for k, v in output.readable_times(body).items())


def show_job(args: argparse.Namespace) -> int:
    page = JobPage(client(args), args.job_id)
    if args.watch:
        from eventq.cli.watch import watch

        return watch(page.api, page, args.format)
    page.read()
    if args.format == "json":
        emit_json(page.as_json())
    else:
        output.console.print(page.draw(time.time()))
    return 0


def add_parsers(jobs: argparse._SubParsersAction[argparse.ArgumentParser],
                common: argparse.ArgumentParser) -> None:
    ls = jobs.add_parser("list", parents=[common], help="list jobs (unfinished ones by default)")
    ls.add_argument("--status", help="e.g. running, queued, blocked, failed (comma-separated)")
    ls.add_argument("-l", "--limit", type=int, default=50)
    ls.add_argument("-a", "--all", action="store_true", help="include finished jobs")
    ls.add_argument("-o", "--fields",
                    help="comma-separated fields, dot paths into metadata allowed "
                         "(metadata.run_name); times as ISO 8601")
    ls.add_argument("--watch", action="store_true",
                    help="redraw as the queue changes (from the server's event stream)")
    ls.set_defaults(run=list_jobs)
    show = jobs.add_parser("show", parents=[common], help="a job and its event history")
    show.add_argument("job_id")
    show.add_argument("--watch", action="store_true",
                      help="redraw as the job changes, until it ends")
    show.set_defaults(run=show_job)
