"""``eventq import``, ``eventq export``, ``eventq progress``: job-scheduler-v2's CSV sets.

A CSV row is one job. Its parameter columns become the arguments of a command
template (``bash run.sh preprocess data1``, or ``--param1 preprocess …`` with
``--named-args``); the reserved ``JOBSCHEDULER_*`` columns of job-scheduler-v2 set
the job's name, priority, estimate and dependencies. The whole file is one
``POST /api/queue/batch``: every row is recorded, or none and each error names its
line. Each job keeps its row in ``metadata.jobscheduler`` (``id``, ``params``, the
reserved cells it was given, ``file``, ``line``), which is what ``export`` writes back.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import json
import math
import os
import re
import shlex
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from eventq.cli import output
from eventq.cli.client import Client, CliError, parse_sse, quote
from eventq.cli.output import emit_json
from eventq.gcpause import collector_paused
from eventq.graph import find_cycle

if TYPE_CHECKING:
    import queue

    from rich.progress import Progress

# What one command needs loads inside it: rich's progress and live displays when they are
# drawn, msgspec and urllib when an import is sent, threads when progress is watched.
# `eventq --help` loads none of them.

PREFIX = "JOBSCHEDULER_"
JOB_ID = "JOBSCHEDULER_JOB_ID"
STATUS = "JOBSCHEDULER_STATUS"
PRIORITY = "JOBSCHEDULER_PRIORITY"
ESTIMATE = "JOBSCHEDULER_ESTIMATE_TIME"
ELAPSED = "JOBSCHEDULER_ELAPSED_TIME"
STARTED = "JOBSCHEDULER_STARTED_AT"
FINISHED = "JOBSCHEDULER_FINISHED_AT"
ERROR = "JOBSCHEDULER_ERROR_MESSAGE"
DEPENDS = "JOBSCHEDULER_DEPENDS_ON"
BEGIN = "JOBSCHEDULER_BEGIN_AT"
#: Not a job-scheduler-v2 column: the GPUs a row's job needs (not passed to the command).
GPUS = "GPUS"
#: Columns job-scheduler-v2 writes that describe a run, not a job: read and ignored.
RUN_COLUMNS = {STATUS, ELAPSED, STARTED, FINISHED, ERROR, "JOBSCHEDULER_CREATED_AT",
               "JOBSCHEDULER_HEARTBEAT", "JOBSCHEDULER_WORKER_ID"}
JOB_COLUMNS = {JOB_ID, PRIORITY, ESTIMATE, DEPENDS, BEGIN, GPUS}
RESERVED = frozenset(JOB_COLUMNS | RUN_COLUMNS)
#: The header ``export`` writes, in job-scheduler-v2's order, before the parameters.
EXPORT_HEAD = [JOB_ID, STATUS, PRIORITY, ESTIMATE, ELAPSED, STARTED, FINISHED, ERROR, DEPENDS]
META = "jobscheduler"
#: Files with more rows than this show a progress bar while they are read and checked.
LARGE = 1000
#: Jobs per page when reading the queue.
PAGE = 5000
#: Errors printed before the rest are only counted.
SHOWN_ERRORS = 50
MAX_NAME = 200

# job-scheduler-v2's words for eventq's statuses.
JSV2_STATUS = {"completed": "done", "failed": "error", "cancelled": "error", "rejected": "error",
               "dispatched": "running", "running": "running", "pending": "pending",
               "waiting": "pending", "blocked": "pending", "held": "pending"}
STATUS_CHOICES = sorted({*JSV2_STATUS, *JSV2_STATUS.values()})


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser],
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
    env = imp.add_mutually_exclusive_group()
    env.add_argument("--export-env", action="store_true",
                     help="also send this shell's environment with every job (it is repeated "
                          "in every row: mind the server's request size limit)")
    env.add_argument("--no-export-env", action="store_true",
                     help="send neither the working directory nor the environment")
    imp.set_defaults(run=import_csv)

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
    return Client.find(args.url, args.token, args.data_dir)


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


@dataclass
class Row:
    """One CSV row, checked; ``body`` is its SubmitRequest."""

    line: int
    name: str
    explicit: bool
    params: dict[str, str]
    depends: list[str]
    cells: dict[str, str]
    body: dict[str, Any] = field(default_factory=dict)


@dataclass
class Problems:
    """Errors by line; all are reported together, and nothing is submitted if any."""

    items: list[tuple[int, str]] = field(default_factory=list)

    def add(self, line: int, message: str) -> None:
        self.items.append((line, message))

    def raise_if_any(self, path: Path) -> None:
        if not self.items:
            return
        ordered = sorted(self.items)
        for line, message in ordered[:SHOWN_ERRORS]:
            print(f"{path}:{line}: {message}" if line else f"{path}: {message}", file=sys.stderr)
        if len(ordered) > SHOWN_ERRORS:
            print(f"… and {len(ordered) - SHOWN_ERRORS} more", file=sys.stderr)
        raise CliError(f"{len(ordered)} problems in {path}; nothing was imported")


@dataclass
class Existing:
    """The jobs already on the server that have the names or ids an import asked about."""

    by_id: dict[str, dict[str, Any]]
    by_name: dict[str, list[str]]

    @classmethod
    def of(cls, jobs: list[dict[str, Any]]) -> Existing:
        by_name: dict[str, list[str]] = {}
        for job in jobs:
            by_name.setdefault(job["name"], []).append(job["job_id"])
        return cls({j["job_id"]: j for j in jobs}, by_name)

    def merged(self, other: Existing) -> Existing:
        return Existing.of([*self.by_id.values(), *other.by_id.values()])


#: Names and ids -> the jobs on the server that have them.
Lookup = Callable[[set[str], set[str]], Existing]


def server_lookup(api: Client) -> Lookup:
    """Asks the server about just these names and ids (a queue of 100,000 jobs is not
    downloaded to import 10 rows)."""
    def lookup(names: set[str], ids: set[str]) -> Existing:
        reply = api.call("POST", "/api/queue/lookup", {"names": sorted(names),
                                                       "ids": sorted(ids)})
        return Existing.of(reply["jobs"])
    return lookup


def read_rows(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The header and every non-blank row with the line it starts on."""
    try:
        handle = open(path, newline="", encoding="utf-8-sig")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror}") from None
    rows: list[tuple[int, list[str]]] = []
    with handle:
        reader = csv.reader(handle)
        start = 1
        try:
            for cells in reader:
                if cells:
                    rows.append((start, cells))
                start = reader.line_num + 1
        except (csv.Error, UnicodeDecodeError) as exc:
            raise CliError(f"{path}:{start}: not a readable CSV row: {exc}") from None
    if not rows:
        raise CliError(f"{path} is empty: a header line is needed")
    header = [c.strip() for c in rows[0][1]]
    return header, rows[1:]


def check_header(header: list[str], problems: Problems) -> None:
    seen: set[str] = set()
    for column in header:
        if not column:
            problems.add(1, "a column has no name")
        elif column in seen:
            problems.add(1, f"the column {column} appears twice")
        elif column.startswith(PREFIX) and column not in RESERVED:
            known = ", ".join(sorted((JOB_COLUMNS | RUN_COLUMNS) - {GPUS}))
            problems.add(1, f"unknown reserved column {column} (known: {known})")
        seen.add(column)


def build_argv(template: list[str], params: dict[str, str], named: bool) -> list[str]:
    if not named:
        return [*template, *params.values()]
    argv = list(template)
    for column, value in params.items():
        argv += (f"--{column}", value)
    return argv


def command_value(argv: list[str]) -> list[str] | str:
    """A list runs as is; with an empty argument it goes through ``sh -c`` as quoted text
    (the server refuses empty list items), which gives the job the same argv."""
    return argv if all(argv) else shlex.join(argv)


def _int_cell(value: str, lo: int, hi: int) -> int:
    number = int(value)
    if not lo <= number <= hi:
        raise ValueError
    return number


@dataclass(frozen=True)
class Layout:
    """Where the header puts each column, worked out once rather than for every row."""

    width: int
    #: (column, index) of each parameter, in the header's order.
    params: list[tuple[str, int]]
    #: (column, index) of the cells with a format to check, in the order a row keeps them.
    checked: list[tuple[str, int]]
    name_at: int | None
    depends_at: int | None

    @classmethod
    def of(cls, header: list[str]) -> Layout:
        at = {column: i for i, column in enumerate(header)}
        return cls(len(header), [(c, i) for c, i in at.items() if c not in RESERVED],
                   [(c, at[c]) for c in (PRIORITY, ESTIMATE, BEGIN, GPUS) if c in at],
                   at.get(JOB_ID), at.get(DEPENDS))


def parse_row(line: int, layout: Layout, cells: list[str], problems: Problems) -> Row | None:
    """The row, even with bad cells (its name still counts for the others' checks);
    None if its cells do not line up with the header."""
    if len(cells) != layout.width:
        problems.add(line, f"{len(cells)} cells, but the header has {layout.width} columns")
        return None
    params = {c: cells[at] for c, at in layout.params}
    given = {c: v for c, at in layout.checked if (v := cells[at].strip())}
    name = "" if layout.name_at is None else cells[layout.name_at].strip()
    if name and (len(name.split()) != 1 or len(name) > MAX_NAME):
        problems.add(line, f"{JOB_ID} {name!r} must be one word of at most {MAX_NAME} "
                           f"characters ({DEPENDS} separates names by spaces)")
    for column, value in given.items():
        wanted, check = CELL_CHECKS[column]
        try:
            check(value)
        except (ValueError, OverflowError):
            problems.add(line, f"{column} {value!r} is not {wanted}")
    depends = [] if layout.depends_at is None else cells[layout.depends_at].split()
    return Row(line, name, bool(name), params, depends, given)


def _hours(value: str) -> float:
    hours = float(value)
    if not math.isfinite(hours) or hours < 0:
        raise ValueError
    return hours


def _begin(value: str) -> float | str:
    try:
        return float(value)
    except ValueError:
        datetime.datetime.fromisoformat(value)
        return value


CELL_CHECKS: dict[str, tuple[str, Callable[[str], object]]] = {
    PRIORITY: ("an integer from 0 to 1000", lambda v: _int_cell(v, 0, 1000)),
    ESTIMATE: ("a number of hours (0 or more)", _hours),
    GPUS: ("a whole number of GPUs (0 or more)", lambda v: _int_cell(v, 0, 4096)),
    BEGIN: ("epoch seconds or an ISO-8601 time", _begin)}


def check_given_names(rows: list[Row], existing: Existing, problems: Problems) -> None:
    """A given name is used once in the file, and by no job on the server."""
    first: dict[str, int] = {}
    for row in rows:
        if not row.explicit:
            continue
        if row.name in first:
            problems.add(row.line, f"{JOB_ID} {row.name!r} is used again (first on line "
                                   f"{first[row.name]})")
            continue
        first[row.name] = row.line
        taken = existing.by_name.get(row.name, [])
        if taken:
            job = existing.by_id[taken[0]]
            again = f" (to run that job again: eventq jobs retry {job['job_id']})" \
                if job["status"] in ("failed", "cancelled") else ""
            problems.add(row.line, f"{JOB_ID} {row.name!r} is already the name of job "
                                   f"{job['job_id']} ({job['status']}); give the row another "
                                   f"id{again}")


def name_unnamed(rows: list[Row], stem: str, existing: Existing) -> None:
    """Give the rows without an id ``STEM-LINE``, made unique: none is dropped."""
    used = {row.name for row in rows if row.explicit} | existing.by_name.keys()
    for row in rows:
        if row.explicit:
            continue
        name, n = f"{stem}-{row.line}", 1
        while name in used:
            n += 1
            name = f"{stem}-{row.line}.{n}"
        row.name = name
        used.add(name)


def check_dependencies(rows: list[Row], existing: Existing, append: bool,
                       problems: Problems) -> None:
    in_file = {row.name for row in rows}
    for row in rows:
        for ref in row.depends:
            if ref in in_file:
                continue
            on_server = ref in existing.by_id or ref in existing.by_name
            if not on_server:
                where = "no row of this file" + (" and no job on the server" if append else "")
                problems.add(row.line, f"{DEPENDS} names {ref!r}, which is {where}")
            elif not append:
                problems.add(row.line, f"{DEPENDS} names {ref!r}, which is not a row of this "
                                       "file but a job already submitted: use --append to add "
                                       "jobs that depend on earlier ones")
            elif ref not in existing.by_id and (count := len(existing.by_name[ref])) > 1:
                problems.add(row.line, f"{DEPENDS} names {ref!r}, which {count} jobs on the "
                                       "server are called; name it by job id")
    lines = {row.name: row.line for row in rows}
    edges = {row.name: row.depends for row in rows}
    while cycle := find_cycle(edges):
        at = ", ".join(str(lines[n]) for n in cycle[:-1])
        problems.add(lines[cycle[0]], f"dependency cycle {' -> '.join(cycle)} "
                                      f"(line{'s' if len(cycle) > 2 else ''} {at})")
        for name in cycle:  # report every cycle, each once
            edges.pop(name, None)


def row_body(row: Row, args: argparse.Namespace, template: list[str], path: Path,
             shared: dict[str, Any]) -> dict[str, Any]:
    return row_bodies([row], args, template, path, shared)[0]


def row_bodies(rows: Sequence[Row], args: argparse.Namespace, template: list[str], path: Path,
               shared: dict[str, Any]) -> list[dict[str, Any]]:
    """Each row's SubmitRequest; what all rows share is worked out once."""
    head = {"target": args.target, **shared}
    named, gpus, file = args.named_args, args.gpus, path.name
    bodies = []
    for row in rows:
        body: dict[str, Any] = {"name": row.name, **head,
                                "command": command_value(build_argv(template, row.params,
                                                                    named))}
        cells = row.cells
        if GPUS in cells:
            body["gpus"] = int(cells[GPUS])
        elif gpus is not None:
            body["gpus"] = gpus
        if PRIORITY in cells:
            body["priority_override"] = int(cells[PRIORITY])
        if ESTIMATE in cells and (hours := float(cells[ESTIMATE])) > 0:
            body["estimated_runtime"] = hours * 3600
        if BEGIN in cells:
            body["begin_at"] = _begin(cells[BEGIN])
        if row.depends:
            body["depends_on"] = row.depends
        meta: dict[str, Any] = {"id": row.name, "params": row.params, "file": file,
                                "line": row.line}
        if cells:
            meta["cells"] = cells
        body["metadata"] = {META: meta}
        bodies.append(body)
    return bodies


def _progress() -> Progress:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
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


def import_csv(args: argparse.Namespace) -> int:
    with collector_paused():
        return _import_csv(args)


def _import_csv(args: argparse.Namespace) -> int:
    path: Path = args.file
    template = _template(args.command)
    if args.gpus is not None and args.gpus < 0:
        raise CliError(f"--gpus must be 0 or more (got {args.gpus})")
    api = _client(args)
    header, raw = read_rows(path)
    problems = Problems()
    check_header(header, problems)
    problems.raise_if_any(path)
    if not raw:
        raise CliError(f"{path} has a header but no rows: nothing to import")
    shown = _may_draw()
    with _progress() if len(raw) > LARGE and shown else contextlib.nullcontext() as bar:
        rows = prepare(raw, header, path, server_lookup(api), args, problems, bar)
    problems.raise_if_any(path)
    _check_priority_allowed(api, rows)
    bodies = row_bodies(rows, args, template, path, _shared_fields(args))
    for row, body in zip(rows, bodies, strict=True):
        row.body = body
    with output.errors.status(f"submitting {len(rows)} jobs") if len(rows) > LARGE and shown \
            else contextlib.nullcontext():
        reply = _submit_batch(api, rows, path)
    if args.format == "json":
        emit_json({"count": reply["count"], "jobs": [
            {"line": r.line, "name": r.name, "job_id": j}
            for r, j in zip(rows, reply["job_ids"], strict=True)]})
        return 0
    console = output.console
    console.print(f"imported {reply['count']} jobs from {path} (lines {rows[0].line}-"
                  f"{rows[-1].line})", markup=False, highlight=False)
    if len(rows) <= 20:
        for row, job_id in zip(rows, reply["job_ids"], strict=True):
            console.print(f"  line {row.line}: {row.name} -> {job_id}", markup=False,
                          highlight=False)
    return 0


def prepare(raw: list[tuple[int, list[str]]], header: list[str], path: Path,
            lookup: Lookup, args: argparse.Namespace, problems: Problems,
            bar: Progress | None) -> list[Row]:
    """Read and check every row (names, dependencies, cycles), with a bar if given; the
    server is asked only about the names and ids the file uses or would give."""
    task = bar.add_task(f"reading {path.name}", total=len(raw)) if bar is not None else None
    layout = Layout.of(header)
    rows: list[Row] = []
    for i, (line, cells) in enumerate(raw, start=1):
        row = parse_row(line, layout, cells, problems)
        if row is not None:
            rows.append(row)
        if bar is not None and task is not None and i % 500 == 0:
            bar.update(task, completed=i)
    if bar is not None and task is not None:
        bar.update(task, completed=len(raw), description="checking names and dependencies")
    existing = name_rows(rows, path.stem, lookup, problems)
    check_dependencies(rows, existing, args.append, problems)
    return rows


def name_rows(rows: list[Row], stem: str, lookup: Lookup, problems: Problems) -> Existing:
    """Check the given names and name the other rows, against the server's names: those
    the file gives or refers to, and those it would give (asked again while a generated
    name turns out to be taken, so two imports never give the same one)."""
    given = {row.name for row in rows if row.explicit}
    refs = {d for row in rows for d in row.depends} - given
    asked = given | refs | {f"{stem}-{row.line}" for row in rows if not row.explicit}
    existing = lookup(asked, refs)
    check_given_names(rows, existing, problems)
    for _ in range(100):
        name_unnamed(rows, stem, existing)
        fresh = {row.name for row in rows if not row.explicit} - asked
        if not fresh:
            break
        asked |= fresh
        existing = existing.merged(lookup(fresh, set()))
    return existing


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
    if not args.no_export_env:
        shared["cwd"] = os.getcwd()
    if args.export_env:
        shared["env"] = dict(os.environ)
    return shared


PRIORITY_DENIED = (f"{PRIORITY} overrides priorities, and only leads and admins may override "
                   "priority: nothing was imported. Import with a lead's or an admin's token "
                   f"(--token or EVENTQ_TOKEN), or leave the {PRIORITY} cells empty to run at "
                   "your level's priority")


def _check_priority_allowed(api: Client, rows: list[Row]) -> None:
    """Say so before sending 10,000 rows, rather than have each row refused."""
    if not any(PRIORITY in row.cells for row in rows):
        return
    me = api.call("GET", "/api/queue/me")
    if me.get("level") not in ("lead", "admin"):
        raise CliError(f"{PRIORITY_DENIED} (your token is a {me.get('level')}'s)")


_ROWS = re.compile(r"\brows? (\[[\d, ]+\]|\d+)")


def server_lines(text: str, rows: Sequence[Row]) -> str:
    """A server message with its batch rows (1-based) turned into CSV lines."""

    def line_of(n: int) -> str:
        return str(rows[n - 1].line) if 1 <= n <= len(rows) else f"row {n}"

    def swap(match: re.Match[str]) -> str:
        numbers = [int(n) for n in re.findall(r"\d+", match.group(1))]
        lines = ", ".join(line_of(n) for n in numbers)
        return f"line{'s' if len(numbers) > 1 else ''} {lines}"

    return _ROWS.sub(swap, text)


def _submit_batch(api: Client, rows: list[Row], path: Path) -> dict[str, Any]:
    """One request; a refusal is reported line by line."""
    import urllib.error
    import urllib.request

    import msgspec

    data = msgspec.json.encode({"jobs": [r.body for r in rows]})
    req = urllib.request.Request(api.url + "/api/queue/batch", data=data, method="POST", headers={
        "Authorization": f"Bearer {api.token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=600) as resp:
            reply: dict[str, Any] = msgspec.json.decode(resp.read())
            return reply
    except urllib.error.HTTPError as exc:
        try:
            body = json.loads(exc.read())
        except ValueError:
            body = None
        body = body if isinstance(body, dict) else {}
        status = exc.code
    except OSError as exc:
        raise CliError(f"cannot reach the server at {api.url}: {exc}") from None
    detail = body.get("detail")
    messages = [str(d) for d in detail] if isinstance(detail, list) else \
        [str(body.get("error", f"HTTP {status}"))]
    if status == 413:
        raise CliError(f"the server refused the import as too large ({len(data) / 2**20:.1f} "
                       "MiB in one request); nothing was imported. Leave out --export-env, or "
                       "split the file and import the parts with --append")
    if status == 403 or any("only leads and admins may override priority" in m
                            for m in messages):
        raise CliError(PRIORITY_DENIED)
    for message in messages:
        one = re.fullmatch(r"row (\d+): (.*)", message, re.DOTALL)
        if one and 1 <= int(one.group(1)) <= len(rows):
            print(f"{path}:{rows[int(one.group(1)) - 1].line}: {one.group(2)}", file=sys.stderr)
        else:
            print(f"{path}: {server_lines(message, rows)}", file=sys.stderr)
    raise CliError(f"the server refused the import (HTTP {status}); nothing was imported")


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


@dataclass
class JobView:
    name: str
    status: str
    gated: bool
    reasons: list[dict[str, str]] = field(default_factory=list)


@dataclass
class QueueProgress:
    """What ``progress`` shows: counts by status, and the jobs that are not ready."""

    counts: Counter[str]
    jobs: dict[str, JobView]
    names: dict[str, str]

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
            "error": c["failed"] + c["cancelled"] + c["rejected"],
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
            self._set(spec["job_id"], JobView(spec.get("name", ""), "", gated))
            self._status(spec["job_id"], "waiting" if gated else "pending")
            self.names[spec["job_id"]] = spec.get("name", "")
            return True
        if kind == "jobs_purged":
            for job_id in body.get("job_ids", []):
                job = self.jobs.pop(job_id, None)
                if job is not None:
                    self.counts[job.status] -= 1
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
    error_parts = [f"{k} {by[k]}" for k in ("failed", "cancelled", "rejected") if by.get(k)]
    lines = [
        f"Total: {s['total']}",
        f"  Done: {s['done']}",
        f"  Running: {s['running']}",
        f"  Error: {s['error']}" + (f" ({', '.join(error_parts)})" if error_parts else ""),
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
        return watch(api, args.format)
    summary = snapshot(api, everything=False).summary()
    if args.format == "json":
        emit_json(summary)
    else:
        output.console.print(render(summary), markup=False, highlight=False)
    return 0


#: The least time between two redraws while events arrive.
REDRAW_SECONDS = 0.25


def watch(api: Client, fmt: str) -> int:
    """Subscribe to the event stream first, then read the queue, then fold the stream onto
    it: the events between the two are applied again, which leaves every job as its latest
    event says. Ends on Ctrl-C."""
    import queue
    import threading

    try:
        while True:
            messages: queue.Queue[tuple[str, str] | None] = queue.Queue()
            resp = api.open("GET", "/api/events/stream", timeout=None)
            reader = threading.Thread(target=_read_stream, args=(resp, messages), daemon=True)
            reader.start()
            model = snapshot(api, everything=True)
            if _follow(model, messages, fmt) == "resubscribe":
                with contextlib.suppress(OSError):
                    resp.close()
                continue
            raise CliError("the server closed the event stream (did it stop?)")
    except KeyboardInterrupt:
        return 0


def _read_stream(resp: Any, messages: queue.Queue[tuple[str, str] | None]) -> None:
    with contextlib.suppress(OSError, ValueError):
        for message in parse_sse(resp):
            messages.put((message.event, message.data))
    messages.put(None)


def _follow(model: QueueProgress, messages: queue.Queue[tuple[str, str] | None],
            fmt: str) -> str:
    """Redraw as events arrive (at most every REDRAW_SECONDS); why it stopped."""
    import queue

    from rich.live import Live
    from rich.text import Text

    out = output.console
    live = out.is_terminal and fmt != "json"
    shown = ""
    dirty, last = True, 0.0
    with Live(Text(""), console=out, auto_refresh=False) if live \
            else contextlib.nullcontext() as screen:
        while True:
            wait = max(0.0, last + REDRAW_SECONDS - time.monotonic()) if dirty else None
            try:
                item = messages.get(timeout=wait)
            except queue.Empty:
                item = ("", "")
            if item is None:
                return "closed"
            event, data = item
            if event == "dropped":
                return "resubscribe"
            if event:
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    record = json.loads(data)
                    dirty = model.apply(record) or dirty
                if time.monotonic() - last < REDRAW_SECONDS:
                    continue
            if not dirty:
                continue
            summary = model.summary()
            text = json.dumps(summary) if fmt == "json" else render(summary)
            dirty, last = False, time.monotonic()
            if text == shown:
                continue
            shown = text
            if screen is not None:
                screen.update(Text(text), refresh=True)
            elif fmt == "json":
                print(text, flush=True)
            else:
                stamp = datetime.datetime.now().strftime("%H:%M:%S")
                out.print(f"--- {stamp}\n{text}", markup=False, highlight=False)
                sys.stdout.flush()
