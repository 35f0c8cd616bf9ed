"""``eventq import``, ``eventq export``, ``eventq progress``: job-scheduler-v2's CSV sets.

A CSV row is one job. Its parameter columns become the arguments of a command
template (``bash run.sh preprocess data1``, or ``--param1 preprocess …`` with
``--named-args``); the reserved ``JOBSCHEDULER_*`` columns of job-scheduler-v2 set
the job's name, priority, estimate and dependencies (``eventq.jobscheduler``). The
file goes to the server as it is, in one ``POST /api/queue/import``: the server reads
and checks it, and records every row, or none and each error names its line. Each
job keeps its row in ``metadata.jobscheduler`` (``id``, ``params``, the reserved cells
it was given, ``file``, ``line``), which is what ``export`` writes back.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import json
import os
import re
import shlex
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from eventq import jobscheduler as jsv2
from eventq.cli import output
from eventq.cli.client import Client, CliError, exportable_environ, quote
from eventq.cli.output import emit_json
from eventq.jobscheduler import (
    BEGIN,
    DEPENDS,
    ELAPSED,
    ERROR,
    ESTIMATE,
    FINISHED,
    GPUS,
    JOB_ID,
    META,
    PRIORITY,
    STARTED,
    STATUS,
)

if TYPE_CHECKING:
    from rich.progress import Progress
    from rich.text import Text

# What one command needs loads inside it: rich's progress and live displays when they are
# drawn, urllib when an import is sent, threads when progress is watched.
# `eventq --help` loads none of them.

#: The header ``export`` writes, in job-scheduler-v2's order, before the parameters.
EXPORT_HEAD = [JOB_ID, STATUS, PRIORITY, ESTIMATE, ELAPSED, STARTED, FINISHED, ERROR, DEPENDS]
#: Files with more lines than this show a progress bar while they are sent and checked.
LARGE = 1000
#: Jobs per page when reading the queue.
PAGE = 5000
#: Errors printed before the rest are only counted.
SHOWN_ERRORS = 50

# job-scheduler-v2's words for eventq's statuses.
JSV2_STATUS = {"completed": "done", "failed": "error", "cancelled": "error", "rejected": "error",
               "dispatched": "running", "running": "running", "pending": "pending",
               "waiting": "pending", "blocked": "pending", "held": "pending"}
STATUS_CHOICES = sorted({*JSV2_STATUS, *JSV2_STATUS.values()})


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser],
                common: argparse.ArgumentParser) -> None:
    _add_import(sub, common)
    _add_export(sub, common)
    _add_progress(sub, common)


def _add_import(sub: argparse._SubParsersAction[argparse.ArgumentParser],
                common: argparse.ArgumentParser) -> None:
    imp = sub.add_parser(
        "import", parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter,
        help="submit every row of a job-scheduler-v2 CSV as a job, all or none",
        description=IMPORT_HELP)
    imp.add_argument("file", type=Path, metavar="FILE.csv")
    imp.add_argument("--command", required=True, metavar="TEMPLATE",
                     help='the command each row\'s parameters are appended to, e.g. '
                          '"bash run.sh" (split like a shell would)')
    imp.add_argument("--named-args", action="store_true",
                     help="pass parameters as --column value instead of positionally")
    imp.add_argument("--gpus", type=int, help="GPUs per job where no GPUS column says "
                                              "(default: the server's, 1)")
    imp.add_argument("--append", action="store_true",
                     help="add to jobs already submitted: JOBSCHEDULER_DEPENDS_ON may also "
                          "name them (by unique name or id)")
    imp.add_argument("--target", choices=["auto", "worker", "local"], default="auto")
    imp.add_argument("--max-runtime", type=float, help="seconds; a job running longer fails")
    imp.add_argument("--max-attempts", type=int)
    imp.add_argument("--retry-on-failure", action="store_true")
    imp.add_argument("--notify", metavar="URL",
                     help="POST each job's end to this http(s) URL as JSON")
    env = imp.add_mutually_exclusive_group()
    env.add_argument("--export-env", action="store_true",
                     help="also send this shell's environment with every job (it is repeated "
                          "in every row: mind the server's request size limit)")
    env.add_argument("--no-export-env", action="store_true",
                     help="send neither the working directory nor the environment")
    imp.set_defaults(run=import_csv)


def _add_export(sub: argparse._SubParsersAction[argparse.ArgumentParser],
                common: argparse.ArgumentParser) -> None:
    exp = sub.add_parser("export", parents=[common],
                         help="write imported jobs as a job-scheduler-v2 CSV",
                         description="Write the jobs that came from `eventq import` as a CSV "
                                     "with job-scheduler-v2's columns (JOBSCHEDULER_STATUS is "
                                     "pending, running, done or error), then their parameter "
                                     "columns, in submission order. `eventq import` reads it "
                                     "back as the same jobs.")
    exp.add_argument("file", type=Path, nargs="?", metavar="FILE",
                     help="default: standard output")
    exp.add_argument("--status", help="only these, comma-separated: job-scheduler-v2's words "
                                      "(pending, running, done, error) or eventq's (waiting, "
                                      "failed, cancelled, …)")
    exp.add_argument("--user", help="only this user's jobs")
    exp.add_argument("--force", action="store_true", help="overwrite FILE if it exists")
    exp.set_defaults(run=export_csv)


def _add_progress(sub: argparse._SubParsersAction[argparse.ArgumentParser],
                  common: argparse.ArgumentParser) -> None:
    prog = sub.add_parser("progress", parents=[common],
                          help="totals; pending split into ready, waiting and blocked",
                          description="Totals by state, and pending jobs split into Ready "
                                      "(queued), Waiting (for dependencies or a begin time) and "
                                      "Blocked (a failed dependency, an admin's approval, or a "
                                      "hold), naming each blocked job and what blocks it.")
    prog.add_argument("--watch", action="store_true",
                      help="redraw live from the server's event stream until Ctrl-C")
    prog.set_defaults(run=progress)


IMPORT_HELP = """\
Submit every row of FILE.csv as a job, all or none.

Parameter columns become arguments of --command, in column order: `bash run.sh
preprocess data1`, or with --named-args `bash run.sh --param1 preprocess --param2
data1`. An empty cell is an empty argument (named: `--param1 ""`).

Reserved columns (job-scheduler-v2's):
  JOBSCHEDULER_JOB_ID      the job's name; rows without one are named FILE-LINE
  JOBSCHEDULER_PRIORITY    a priority override (0-1000, higher first); overriding
                           priority needs a lead's or an admin's token
  JOBSCHEDULER_ESTIMATE_TIME  estimated runtime in hours (0: unknown)
  JOBSCHEDULER_DEPENDS_ON  space-separated names of rows (with --append: also of jobs
                           already submitted) that must complete first
  JOBSCHEDULER_BEGIN_AT    not before this time (epoch seconds or ISO-8601)
  GPUS                     GPUs the job needs (default --gpus, else 1)
The run columns an export writes (JOBSCHEDULER_STATUS, _ELAPSED_TIME, _STARTED_AT,
_FINISHED_AT, _ERROR_MESSAGE, …) are ignored, so an export imports as the same jobs.

Equal priorities start in row order. Dependency cycles, unknown names and invalid
cells are refused with their line numbers (the header is line 1), and nothing is
submitted.

Jobs run in the current directory; unlike `eventq jobs submit`, the environment is
sent only with --export-env (it would be repeated in every row).
"""


def _client(args: argparse.Namespace) -> Client:
    return Client.find(args.url, args.token, args.data_dir, args.ca)


# --- reading the queue ---------------------------------------------------------------


def list_all(api: Client, status: str | None = None,
             include_completed: bool = False) -> list[dict[str, Any]]:
    """Every matching job, page by page (``offset``). A job seen on two pages is kept once;
    on a queue that changes while it is read, a job that moves to an earlier part of the
    listing between two pages can be missed (a page holds PAGE jobs)."""
    seen: dict[str, dict[str, Any]] = {}
    offset = 0
    query = "&include_completed=true" if include_completed else ""
    if status:
        query += f"&status={quote(status)}"
    for _ in range(100_000):
        page = api.call("GET", f"/api/queue?limit={PAGE}&offset={offset}{query}")["jobs"]
        for job in page:
            seen.setdefault(job["job_id"], job)
        if len(page) < PAGE:
            break
        offset += PAGE
    return list(seen.values())


# --- import ----------------------------------------------------------------------------


def import_csv(args: argparse.Namespace) -> int:
    """The file goes to the server as it is: the server reads and checks every row against
    the jobs it has, and records all of them or none."""
    path: Path = args.file
    template = _template(args.command)
    if args.gpus is not None and args.gpus < 0:
        raise CliError(f"--gpus must be 0 or more (got {args.gpus})")
    api = _client(args)
    text = _read_text(path)
    request = {"csv": text, "command": template, "file": path.name,
               "named_args": args.named_args, "append": args.append, "target": args.target,
               **_shared_fields(args)}
    if args.gpus is not None:
        request["gpus"] = args.gpus
    data = json.dumps(request).encode()
    lines = text.count("\n")
    with _sending(path, lines, len(data)) as sent:
        raw = _send_import(api, data, path, sent, pretty=args.format == "json")
    if args.format == "json":
        # The server's reply as it is, which it indents: decoding 10,000 jobs only to
        # encode them again would cost more than the rest of the command's own work.
        sys.stdout.buffer.write(raw + b"\n")
        return 0
    reply = json.loads(raw)
    jobs = reply["jobs"]
    console = output.console
    console.print(f"imported {reply['count']} jobs from {path} (lines {jobs[0]['line']}-"
                  f"{jobs[-1]['line']})", markup=False, highlight=False)
    if len(jobs) <= 20:
        for job in jobs:
            console.print(f"  line {job['line']}: {job['name']} -> {job['job_id']}",
                          markup=False, highlight=False)
    return 0


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise CliError(f"{path}:{line}: not UTF-8 text ({exc.reason}); nothing was "
                       "imported") from None


def _template(text: str) -> list[str]:
    try:
        words = shlex.split(text)
    except ValueError as exc:
        raise CliError(f"--command {text!r} cannot be split: {exc}") from None
    if not words:
        raise CliError("--command is empty: give the command each row's parameters follow, "
                       'e.g. --command "bash run.sh"')
    return words


def _shared_fields(args: argparse.Namespace) -> dict[str, Any]:
    shared: dict[str, Any] = {}
    if args.max_runtime is not None:
        shared["max_runtime"] = args.max_runtime
    if args.max_attempts is not None:
        shared["max_attempts"] = args.max_attempts
    if args.retry_on_failure:
        shared["retry_on_failure"] = True
    if args.notify:
        shared["notify_url"] = args.notify
    if not args.no_export_env and args.target != "worker":
        shared["exported_cwd"] = os.getcwd()
    if args.export_env and args.target != "worker":
        shared["exported_env"] = exportable_environ()
    return shared


PRIORITY_DENIED = (f"{jsv2.PRIORITY_DENIED}. Import with a lead's or an admin's token (--token "
                   f"or EVENTQ_TOKEN), or leave the {PRIORITY} cells empty to run at your "
                   "level's priority")
#: Bytes per piece of a large file's upload (each moves the bar).
PIECE = 256 * 1024


@contextlib.contextmanager
def _sending(path: Path, lines: int, size: int) -> Iterator[Callable[[int], None] | None]:
    """A bar while a large file is sent, then a spinner while the server checks and
    records it; nothing when stderr is not a terminal."""
    if lines <= LARGE or not _may_draw():
        yield None
        return
    with _progress() as bar:
        task = bar.add_task(f"sending {path.name}", total=size)

        def sent(count: int) -> None:
            bar.update(task, completed=count)
            if count >= size:
                bar.update(task, total=None, description=f"the server checks and records "
                                                         f"{path.name} ({lines:,} lines)")
        yield sent


def _send_import(api: Client, data: bytes, path: Path, sent: Callable[[int], None] | None,
                 pretty: bool) -> bytes:
    """One request, its reply's bytes; a refusal is reported line by line. (http.client,
    not urllib.request: one request needs none of what urllib adds, 5 ms to load.)"""
    import http.client
    import urllib.parse

    where = urllib.parse.urlsplit(api.url)
    conn = http.client.HTTPSConnection(where.hostname or "localhost", where.port, timeout=600,
                                       context=api.ssl_context) \
        if where.scheme == "https" else \
        http.client.HTTPConnection(where.hostname or "localhost", where.port, timeout=600)
    try:
        conn.putrequest("POST", where.path.rstrip("/") + "/api/queue/import"
                        + ("?pretty=true" if pretty else ""))
        for header, value in (("Authorization", f"Bearer {api.token}"),
                              ("Content-Type", "application/json"),
                              ("Content-Length", str(len(data)))):
            conn.putheader(header, value)
        conn.endheaders()
        with contextlib.suppress(OSError):  # a refusal may come before the whole body
            for at in range(0, len(data), PIECE):
                conn.send(data[at:at + PIECE])
                if sent is not None:
                    sent(min(at + PIECE, len(data)))
        resp = conn.getresponse()
        raw = resp.read()
    except (OSError, http.client.HTTPException) as exc:
        raise CliError(api.unreachable(exc)) from None
    finally:
        conn.close()
    if resp.status == 200:
        return raw
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    raise _refusal(resp.status, body if isinstance(body, dict) else {}, path, len(data))


def _refusal(status: int, body: dict[str, Any], path: Path, size: int) -> CliError:
    """What the server refused, printed by line as ``FILE:LINE: message``."""
    if status == 413:
        return CliError(f"the server refused the import as too large ({size / 2**20:.1f} MiB "
                        "in one request); nothing was imported. Leave out --export-env, or "
                        "split the file and import the parts with --append")
    if status == 403:
        return CliError(PRIORITY_DENIED)
    if status == 404:
        return CliError("the server has no CSV import (POST /api/queue/import): it is older "
                        "than this eventq; nothing was imported")
    detail = body.get("detail")
    messages = [str(d) for d in detail] if isinstance(detail, list) else []
    for message in messages[:SHOWN_ERRORS]:
        one = re.fullmatch(r"line (\d+): (.*)", message, re.DOTALL)
        print(f"{path}:{one[1]}: {one[2]}" if one else f"{path}: {message}", file=sys.stderr)
    if len(messages) > SHOWN_ERRORS:
        print(f"… and {len(messages) - SHOWN_ERRORS} more", file=sys.stderr)
    error = str(body.get("error") or f"HTTP {status}")
    return CliError(error if "nothing was imported" in error else
                    f"{error} (HTTP {status}); nothing was imported", status, body)


def _progress() -> Progress:
    """Bytes sent of the whole, then time while the server works."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    return Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                    TimeElapsedColumn(), console=output.errors, transient=True)


def _may_draw() -> bool:
    """Whether rich may draw on stderr: it is a terminal, or a variable rich reads may make
    it draw (then rich decides, as ever). Otherwise the bar and the spinner would draw
    nothing, and rich is not loaded for them."""
    if any(v in os.environ for v in ("TTY_COMPATIBLE", "TTY_INTERACTIVE", "FORCE_COLOR")):
        return True
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


# --- export ----------------------------------------------------------------------------


def export_csv(args: argparse.Namespace) -> int:
    wanted = _wanted_statuses(args.status)
    if args.file is not None and args.file.exists() and not args.force:
        raise CliError(f"{args.file} exists; use --force to overwrite it")
    jobs = list_all(_client(args), include_completed=True)
    names = {j["job_id"]: j["name"] for j in jobs}
    chosen = [j for j in jobs if isinstance(j.get("metadata"), dict)
              and isinstance(j["metadata"].get(META), dict)
              and (wanted is None or j["status"] in wanted)
              and (args.user is None or j["user"] == args.user)]
    chosen.sort(key=lambda j: (j["queued_at"], j["metadata"][META].get("line", 0)))
    header, rows = export_rows(chosen, names)
    if args.format == "json":
        text = json.dumps([dict(zip(header, r, strict=True)) for r in rows], indent=2)
        _write(args.file, lambda out: out.write(text + "\n"))
    else:
        def write(out: IO[str]) -> None:
            writer = csv.writer(out, lineterminator="\n")
            writer.writerow(header)
            writer.writerows(rows)
        _write(args.file, write)
    if args.file is not None:
        print(f"exported {len(rows)} jobs to {args.file}", file=sys.stderr)
    return 0


def _write(path: Path | None, write: Any) -> None:
    if path is None:
        write(sys.stdout)
        sys.stdout.flush()
        return
    try:
        with open(path, "w", newline="", encoding="utf-8") as out:
            write(out)
    except OSError as exc:
        raise CliError(f"cannot write {path}: {exc.strerror}") from None


def _wanted_statuses(given: str | None) -> set[str] | None:
    if not given:
        return None
    wanted: set[str] = set()
    for word in given.split(","):
        word = word.strip()
        if word not in STATUS_CHOICES:
            raise CliError(f"unknown status {word!r}; use one of {', '.join(STATUS_CHOICES)}")
        wanted |= {s for s, jsv2 in JSV2_STATUS.items() if word in (s, jsv2)}
    return wanted


def export_rows(jobs: list[dict[str, Any]],
                names: dict[str, str]) -> tuple[list[str], list[list[str]]]:
    """job-scheduler-v2's columns, BEGIN_AT and GPUS where used, then every parameter."""
    params: dict[str, None] = {}
    for job in jobs:
        params.update(dict.fromkeys(job["metadata"][META].get("params", {})))
    begin = any(job.get("begin_at") is not None for job in jobs)
    gpus = any(job["gpus"] != 1 or GPUS in job["metadata"][META].get("cells", {})
               for job in jobs)
    header = [*EXPORT_HEAD, *([BEGIN] if begin else []), *([GPUS] if gpus else []), *params]
    rows = []
    for job in jobs:
        meta = job["metadata"][META]
        cells = meta.get("cells", {})
        status = JSV2_STATUS.get(job["status"], job["status"])
        started, finished = job.get("started_at"), job.get("completed_at")
        row = [str(meta.get("id", job["name"])), status,
               str(job["priority"]) if PRIORITY in cells else "",
               cells.get(ESTIMATE, ""),
               f"{finished - started:.3f}" if started is not None and finished is not None
               and status in ("done", "error") else "",
               _utc(started), _utc(finished if status in ("done", "error") else None),
               _error_message(job) if status == "error" else "",
               " ".join(names.get(d, d) for d in job.get("depends_on", []))]
        if begin:
            row.append(cells.get(BEGIN) or _iso(job.get("begin_at")))
        if gpus:
            row.append(str(job["gpus"]))
        row += [str(meta.get("params", {}).get(p, "")) for p in params]
        rows.append(row)
    return header, rows


def _utc(t: float | None) -> str:
    """job-scheduler-v2's timestamps: SQLite's datetime('now'), UTC."""
    if t is None:
        return ""
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _iso(t: float | None) -> str:
    return "" if t is None else datetime.datetime.fromtimestamp(t).astimezone().isoformat()


def _error_message(job: dict[str, Any]) -> str:
    if job["status"] == "failed":
        return str(job.get("error") or "failed")
    return str(job["status"])


# --- progress --------------------------------------------------------------------------


# Plain classes, not dataclasses: `dataclasses` loads `inspect`, 7 ms of every command.


class JobView:
    __slots__ = ("gated", "name", "reasons", "status")

    def __init__(self, name: str, status: str, gated: bool,
                 reasons: list[dict[str, str]] | None = None) -> None:
        self.name, self.status, self.gated = name, status, gated
        self.reasons = reasons if reasons is not None else []


class QueueProgress:
    """What ``progress`` shows: counts by status, and the jobs that are not ready."""

    def __init__(self, counts: Counter[str], jobs: dict[str, JobView],
                 names: dict[str, str]) -> None:
        self.counts, self.jobs, self.names = counts, jobs, names

    def blocked(self) -> list[tuple[str, JobView]]:
        return [(job_id, j) for job_id, j in self.jobs.items() if _is_blocked(j)]

    def summary(self) -> dict[str, Any]:
        c = self.counts
        waiting = [j for j in self.jobs.values() if j.status == "waiting" and not _is_blocked(j)]
        blocked = self.blocked()
        for_begin = sum(1 for j in waiting
                        if {r["code"] for r in j.reasons} == {"begin_time"})
        return {
            "total": sum(c.values()),
            "by_status": dict(sorted(c.items())),
            "done": c["completed"], "running": c["dispatched"] + c["running"],
            "error": c["failed"] + c["rejected"], "cancelled": c["cancelled"],
            "pending": c["pending"] + c["waiting"] + c["blocked"] + c["held"],
            "ready": c["pending"],
            "waiting": len(waiting), "waiting_for_dependencies": len(waiting) - for_begin,
            "waiting_for_begin_time": for_begin,
            "blocked": len(blocked),
            "blocked_jobs": [{"job_id": job_id, "name": j.name, "status": j.status,
                              "reasons": [{"code": r["code"],
                                           "detail": self.readable(r["detail"])}
                                          for r in j.reasons if r["code"] in BLOCKING]}
                             for job_id, j in blocked],
        }

    def readable(self, detail: str) -> str:
        """Job ids in a reason, followed by the job's name."""
        return _ID.sub(lambda m: f"{self.names[m.group(0)]} ({m.group(0)})"
                       if m.group(0) in self.names else m.group(0), detail)

    def apply(self, record: dict[str, Any]) -> bool:
        """Fold one event of the stream; whether anything shown may have changed."""
        kind, body = record.get("type"), record.get("body") or {}
        if kind == "job_submitted":
            spec = body["job"]
            gated = bool(spec.get("depends_on")) or spec.get("begin_at") is not None
            self._set(spec["job_id"], JobView(spec.get("name", ""), "", gated,
                                              list(body.get("reasons") or [])))
            self._status(spec["job_id"], "waiting" if gated else "pending")
            self.names[spec["job_id"]] = spec.get("name", "")
            return True
        if kind == "jobs_purged":
            self._purge(body.get("job_ids", []))
            return True
        job = self.jobs.get(body.get("job_id", ""))
        if job is None:
            return False
        job_id = body["job_id"]
        if kind == "job_reasons_changed":
            job.reasons = list(body.get("reasons", []))
        elif kind == "job_blocked":
            job.reasons = [{"code": "approval", "detail": body.get("reason", "")}]
            self._status(job_id, "blocked")
        elif kind == "job_held":
            job.reasons = [{"code": "held", "detail": "held by its owner or an admin"}]
            self._status(job_id, "held")
        elif kind == "job_approved":
            job.reasons = []
            self._status(job_id, "waiting" if job.gated else "pending")
        elif kind == "attempt_started":
            if job.status == "dispatched":
                self._status(job_id, "running")
        elif kind in STATUS_OF:
            job.reasons = []
            self._status(job_id, STATUS_OF[kind])
        else:
            return False
        return True

    def _purge(self, job_ids: list[str]) -> None:
        for job_id in job_ids:
            job = self.jobs.pop(job_id, None)
            if job is not None:
                self.counts[job.status] -= 1

    def _set(self, job_id: str, job: JobView) -> None:
        old = self.jobs.get(job_id)
        if old is not None and old.status:
            self.counts[old.status] -= 1
        self.jobs[job_id] = job

    def _status(self, job_id: str, status: str) -> None:
        job = self.jobs[job_id]
        if job.status:
            self.counts[job.status] -= 1
        self.counts[status] += 1
        job.status = status


#: Events that set a job's status (and clear its reasons).
STATUS_OF = {"job_ready": "pending", "job_released": "pending", "job_requeued": "pending",
             "attempt_dispatched": "dispatched", "job_completed": "completed",
             "job_failed": "failed", "job_cancelled": "cancelled", "job_rejected": "rejected"}
BLOCKING = ("dependency_failed", "approval", "held")
_ID = re.compile(r"\b[0-9a-f]{12}\b")


def _is_blocked(job: JobView) -> bool:
    if job.status in ("blocked", "held"):
        return True
    return job.status == "waiting" and any(r["code"] == "dependency_failed" for r in job.reasons)


def _view(record: dict[str, Any]) -> JobView:
    gated = bool(record.get("depends_on")) or record.get("begin_at") is not None
    return JobView(record["name"], record["status"], gated, list(record.get("reasons") or []))


def snapshot(api: Client, everything: bool) -> QueueProgress:
    """Counts from the stats; the jobs that are not ready from the listing (``everything``:
    every job, so that a live stream can be folded onto it)."""
    if everything:
        jobs = list_all(api, include_completed=True)
        counts = Counter(j["status"] for j in jobs)
    else:
        counts = Counter(api.call("GET", "/api/queue/stats")["by_status"])
        jobs = list_all(api, status="waiting,blocked,held")
    model = QueueProgress(counts, {j["job_id"]: _view(j) for j in jobs},
                      {j["job_id"]: j["name"] for j in jobs})
    _name_mentioned(api, model)
    return model


def _name_mentioned(api: Client, model: QueueProgress, most: int = 100) -> None:
    """Look up the names of jobs that blocking reasons mention (a failed dependency)."""
    unknown = {m for _, j in model.blocked() for r in j.reasons
               for m in _ID.findall(r["detail"]) if m not in model.names}
    for job_id in sorted(unknown)[:most]:
        with contextlib.suppress(CliError):
            model.names[job_id] = api.call("GET", f"/api/jobs/{quote(job_id)}")["name"]


def render(summary: dict[str, Any], most: int = 50) -> str:
    s = summary
    by = s["by_status"]
    error_parts = [f"{k} {by[k]}" for k in ("failed", "rejected") if by.get(k)]
    lines = [
        f"Total: {s['total']}",
        f"  Done: {s['done']}",
        f"  Running: {s['running']}",
        f"  Error: {s['error']}" + (f" ({', '.join(error_parts)})" if error_parts else ""),
        f"  Cancelled: {s['cancelled']}",
        f"  Pending: {s['pending']}",
        f"    - Ready: {s['ready']}      queued: starts when limits and GPUs allow",
        f"    - Waiting: {s['waiting']}    for dependencies ({s['waiting_for_dependencies']}) "
        f"or a begin time ({s['waiting_for_begin_time']})",
        f"    - Blocked: {s['blocked']}    a failed dependency, an approval or a hold",
    ]
    blocked = s["blocked_jobs"]
    if blocked:
        lines.append("Blocked jobs:")
    for job in blocked[:most]:
        why = "; ".join(f"{r['code']}: {r['detail']}" for r in job["reasons"])
        lines.append(f"  {job['name']} ({job['job_id']}, {job['status']}): {why}")
    if len(blocked) > most:
        lines.append(f"  … and {len(blocked) - most} more (--format json lists all)")
    return "\n".join(lines)


def progress(args: argparse.Namespace) -> int:
    api = _client(args)
    if args.watch:
        from eventq.cli.watch import watch

        return watch(api, ProgressView(api), args.format)
    summary = snapshot(api, everything=False).summary()
    if args.format == "json":
        emit_json(summary)
    else:
        output.console.print(render(summary), markup=False, highlight=False)
    return 0


class ProgressView:
    """``progress --watch``: read whole once per subscription, then folded event by event
    (a queue of 100,000 jobs is not read again for each change)."""

    def __init__(self, api: Client) -> None:
        self.api = api
        self.model = QueueProgress(Counter(), {}, {})

    def start(self) -> None:
        self.model = snapshot(self.api, everything=True)

    def read(self) -> None:
        pass  # the events themselves keep the model current

    def concerns(self, record: dict[str, Any]) -> bool:
        try:
            return self.model.apply(record)
        except (KeyError, TypeError):
            return False

    def over(self) -> bool:
        return False

    def as_json(self) -> Any:
        return self.model.summary()

    def draw(self, now: float) -> Text:
        from rich.text import Text

        return Text(render(self.model.summary()))
