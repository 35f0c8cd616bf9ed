"""job-scheduler-v2's CSV sets: reading and checking one, and the submissions it makes.

A CSV row is one job. Its parameter columns become the arguments of a command
template (``bash run.sh preprocess data1``, or ``--param1 preprocess …`` with named
arguments); the reserved ``JOBSCHEDULER_*`` columns set the job's name, priority,
estimate and dependencies. Each job keeps its row in ``metadata.jobscheduler``
(``id``, ``params``, the reserved cells it was given, ``file``, ``line``), which is
what ``eventq export`` writes back.

Everything here is pure: the server's ``POST /api/queue/import`` reads the file's
text with it, checks every row against the jobs it has, and builds the submissions,
all in one step (no lookup round trip, no 3 MB of JSON bodies for 10,000 rows).
"""

from __future__ import annotations

import csv
import datetime
import io
import math
import shlex
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

from eventq.graph import find_cycle

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
META = "jobscheduler"
MAX_NAME = 200
#: Generated names are STEM-LINE: a long file name is cut to this.
MAX_STEM = 120

PRIORITY_DENIED = (f"{PRIORITY} overrides priorities, and only leads and admins may override "
                   "priority: nothing was imported")


class Row:
    """One CSV row, checked; rows without an id get their name when all are read."""

    __slots__ = ("cells", "depends", "explicit", "line", "name", "params")

    def __init__(self, line: int, name: str, params: dict[str, str], depends: list[str],
                 cells: dict[str, str]) -> None:
        self.line, self.name, self.explicit = line, name, bool(name)
        self.params, self.depends, self.cells = params, depends, cells


class Problems:
    """Errors by line (the header is line 1; 0 is the file as a whole); all are reported
    together, and nothing is submitted if there is any."""

    def __init__(self) -> None:
        self.items: list[tuple[int, str]] = []

    def add(self, line: int, message: str) -> None:
        self.items.append((line, message))

    def lines(self) -> list[str]:
        """``line N: message``, by line."""
        return [f"line {line}: {message}" if line else message
                for line, message in sorted(self.items)]


class Existing(NamedTuple):
    """The jobs already known that have the names or ids an import asked about."""

    by_id: dict[str, dict[str, Any]]
    by_name: dict[str, list[str]]

    @classmethod
    def of(cls, jobs: Iterable[dict[str, Any]]) -> Existing:
        """From ``{"job_id", "name", "status"}`` records."""
        by_id = {j["job_id"]: j for j in jobs}
        by_name: dict[str, list[str]] = {}
        for job in by_id.values():
            by_name.setdefault(job["name"], []).append(job["job_id"])
        return cls(by_id, by_name)

    def merged(self, other: Existing) -> Existing:
        return Existing.of([*self.by_id.values(), *other.by_id.values()])


#: Names and ids -> the known jobs that have them.
Lookup = Callable[[set[str], set[str]], Existing]


class Options(NamedTuple):
    """What the importer chose for every row."""

    #: The command each row's parameters follow, split as a shell would.
    template: list[str]
    named_args: bool = False
    #: GPUs per job where no GPUS cell says (None: the server's default).
    gpus: int | None = None
    #: Rows may depend on jobs already submitted.
    append: bool = False
    #: The file's name: generated names are ``STEM-LINE``; kept in each job's metadata.
    file: str = "import.csv"
    #: Submission fields every row shares (target, cwd, env, max_runtime, …).
    shared: dict[str, Any] | None = None


def read_rows(text: str, problems: Problems) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The header and every non-blank row with the line it starts on (a quoted cell may
    span lines); an unreadable row is a problem at its line, and ends the reading."""
    rows: list[tuple[int, list[str]]] = []
    reader = csv.reader(io.StringIO(text.removeprefix("\ufeff"), newline=""))
    start = 1
    try:
        for cells in reader:
            if cells:
                rows.append((start, cells))
            start = reader.line_num + 1
    except csv.Error as exc:
        problems.add(start, f"not a readable CSV row: {exc}")
        return [], []
    if not rows:
        problems.add(0, "the file is empty: a header line is needed")
        return [], []
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


class Layout(NamedTuple):
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


def parse_rows(raw: list[tuple[int, list[str]]], layout: Layout,
               problems: Problems) -> list[Row]:
    """Each row, even with bad cells (its name still counts for the others' checks); not
    those whose cells do not line up with the header. One loop with the layout in locals:
    it runs for every row of a 10,000-row file."""
    width, params_at, checked_at = layout.width, layout.params, layout.checked
    name_at, depends_at, add = layout.name_at, layout.depends_at, problems.add
    rows = []
    for line, cells in raw:
        if len(cells) != width:
            add(line, f"{len(cells)} cells, but the header has {width} columns")
            continue
        given = {c: v for c, at in checked_at if (v := cells[at].strip())}
        name = "" if name_at is None else cells[name_at].strip()
        if name and (len(name) > MAX_NAME or len(name.split()) != 1):
            add(line, f"{JOB_ID} {name!r} must be one word of at most {MAX_NAME} characters "
                      f"({DEPENDS} separates names by spaces)")
        for column, value in given.items():
            wanted, check = CELL_CHECKS[column]
            try:
                check(value)
            except (ValueError, OverflowError):
                add(line, f"{column} {value!r} is not {wanted}")
        rows.append(Row(line, name, {c: cells[at] for c, at in params_at},
                        [] if depends_at is None else cells[depends_at].split(), given))
    return rows


def _hours(value: str) -> float:
    hours = float(value)
    if not math.isfinite(hours * 3600) or hours < 0:
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
    """A given name is used once in the file, and by no job already submitted."""
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


def name_rows(rows: list[Row], stem: str, lookup: Lookup, problems: Problems) -> Existing:
    """Check the given names and name the other rows, against the known jobs' names: those
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


def stem_of(file: str) -> str:
    """``sweep.csv`` -> ``sweep``: what rows without an id are named after."""
    base = file.replace("\\", "/").rsplit("/", 1)[-1]
    stem = base.rsplit(".", 1)[0] if "." in base.strip(".") else base
    return "".join(stem.split())[:MAX_STEM] or "import"


def prepare(text: str, options: Options, lookup: Lookup, problems: Problems) -> list[Row]:
    """Read and check every row (cells, names, dependencies, cycles); ``problems`` says
    what is wrong, each by line."""
    header, raw = read_rows(text, problems)
    if problems.items:
        return []
    check_header(header, problems)
    if problems.items:
        return []
    if not raw:
        problems.add(0, "the file has a header but no rows: nothing to import")
        return []
    rows = parse_rows(raw, Layout.of(header), problems)
    existing = name_rows(rows, stem_of(options.file), lookup, problems)
    check_dependencies(rows, existing, options.append, problems)
    return rows


def row_bodies(rows: Sequence[Row], options: Options) -> list[dict[str, Any]]:
    """Each row's submission; what all rows share is worked out once."""
    named, gpus, file, template = options.named_args, options.gpus, options.file, \
        options.template
    shared = options.shared or {}
    bodies = []
    for row in rows:
        body: dict[str, Any] = {"name": row.name, **shared,
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
