"""``POST /api/queue/import``: a job-scheduler-v2 CSV, read, checked and recorded here.

The server reads the file's text itself: the names it gives and checks are the ones it
knows at that moment (no lookup round trip that another import could overtake), and
10,000 rows travel as the 0.4 MB file, not as 3.6 MB of JSON submissions.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

import msgspec
from aiohttp import web

from eventq import jobscheduler as jsv2
from eventq.actors.scheduler import NamesTaken
from eventq.auth import User
from eventq.events import Level
from eventq.http import bounds as b
from eventq.http.common import ORCH, ApiError, current_user, decode_body
from eventq.http.queue import (
    NonNegative,
    Positive,
    SubmitRequest,
    flag,
    pausing_collector,
    record_batch,
)
from eventq.http.schemas import ImportedJob, ImportReply
from eventq.server import Orchestrator

routes = web.RouteTableDef()


class ImportRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The file and what applies to every row (``eventq import``'s flags)."""

    #: The CSV's text: a header line, then one job per row.
    csv: str
    #: The command each row's parameters follow, as a list of words.
    command: Annotated[list[b.Word], msgspec.Meta(min_length=1, max_length=1000)]
    #: The file's name: rows without a JOBSCHEDULER_JOB_ID are named ``STEM-LINE``.
    file: b.FileName = "import.csv"
    #: Parameters as ``--column value`` instead of positionally.
    named_args: bool = False
    #: GPUs per job where no GPUS cell says (default: 1).
    gpus: NonNegative | None = None
    #: JOBSCHEDULER_DEPENDS_ON may also name jobs already submitted.
    append: bool = False
    target: Literal["auto", "worker", "local"] = "auto"
    max_runtime: Positive | None = None
    max_attempts: Annotated[int, msgspec.Meta(ge=1, le=100)] | None = None
    retry_on_failure: bool = False
    cwd: b.Path | None = None
    env: b.Env = {}
    #: The submitter's directory and environment, for runs on the server's machine only.
    exported_cwd: b.Path | None = None
    exported_env: b.Env = {}
    #: Each job's end is POSTed here (as a submission's ``notify_url``).
    notify_url: b.NotifyUrl | None = None


@routes.post("/api/queue/import")
@pausing_collector
async def import_csv(request: web.Request) -> web.Response:
    orch, user = request.app[ORCH], current_user(request)
    body = decode_body(await request.read(), ImportRequest)
    for _ in range(TRIES):
        try:
            rows, ids = await _record(orch, user, body)
            break
        except NamesTaken:
            continue  # another set took some of the names it gave: name the rows again
    else:
        raise ApiError(409, f"other imports kept taking the names of {body.file}'s rows; "
                            "nothing was imported: try again", "csv")
    reply = ImportReply(success=True, count=len(ids), job_ids=ids, jobs=[
        ImportedJob(line=r.line, name=r.name, job_id=job_id)
        for r, job_id in zip(rows, ids, strict=True)])
    encoded = msgspec.json.encode(reply)
    if flag(request, "pretty"):  # as `eventq import --format json` prints it
        encoded = msgspec.json.format(encoded, indent=2)
    return web.Response(body=encoded, content_type="application/json")


#: Times an import names its rows again when a concurrent one took some names first.
TRIES = 5


async def _record(orch: Orchestrator, user: User,
                  body: ImportRequest) -> tuple[list[jsv2.Row], list[str]]:
    """Read, check and record every row, or raise: problems by line, or ``NamesTaken``."""
    options = options_of(body)
    problems = jsv2.Problems()
    rows = jsv2.prepare(body.csv, options, lookup_in(orch), problems)
    if problems.items:
        raise ApiError(422, f"{len(problems.items)} problems in {body.file}; nothing was "
                            "imported", "csv", problems.lines())
    if user.level not in (Level.ADMIN, Level.LEAD) and any(jsv2.PRIORITY in r.cells
                                                            for r in rows):
        raise ApiError(403, jsv2.PRIORITY_DENIED, "csv")
    try:
        requests = msgspec.convert(jsv2.row_bodies(rows, options), list[SubmitRequest])
    except msgspec.ValidationError as exc:  # what the cells or the flags made is refused
        text = str(exc)
        row = f"row {int(m[1]) + 1}: " if (m := _INDEX.search(text)) else ""
        raise _by_line(ApiError(422, "a row is invalid; nothing was recorded", "csv",
                                [row + _INDEX.sub("$", text)]), rows) from None
    try:
        return rows, await record_batch(orch, user, requests, new_names=True)
    except ApiError as exc:
        raise _by_line(exc, rows) from None


#: What each row's submission takes from the request where it was given (None, False
#: and {} are the defaults: a row left alone gets the submission's own).
SHARED = ("target", "max_runtime", "max_attempts", "retry_on_failure", "cwd", "env",
          "exported_cwd", "exported_env", "notify_url")


def options_of(body: ImportRequest) -> jsv2.Options:
    shared = {name: value for name in SHARED
              if (value := getattr(body, name)) is not None and value is not False
              and value != {}}
    return jsv2.Options(body.command, body.named_args, body.gpus, body.append, body.file,
                        shared)


def lookup_in(orch: Orchestrator) -> jsv2.Lookup:
    """The jobs the server knows that have any of these names or ids."""
    state = orch.state

    def lookup(names: set[str], ids: set[str]) -> jsv2.Existing:
        found = dict.fromkeys(job_id for job_id in ids if job_id in state.jobs)
        for name in names:
            found.update(dict.fromkeys(state.by_name.get(name, ())))
        return jsv2.Existing.of({"job_id": job_id, "name": state.jobs[job_id].spec.name,
                                 "status": state.jobs[job_id].status} for job_id in found)
    return lookup


_ROWS = re.compile(r"\brows? (\[[\d, ]+\]|\d+)")
_INDEX = re.compile(r"\$\[(\d+)\]")


def _by_line(exc: ApiError, rows: list[jsv2.Row]) -> ApiError:
    """The batch's ``row N`` (1-based) as the CSV's ``line L``."""

    def line_of(n: int) -> str:
        return str(rows[n - 1].line) if 1 <= n <= len(rows) else f"row {n}"

    def swap(match: re.Match[str]) -> str:
        numbers = [int(n) for n in re.findall(r"\d+", match.group(1))]
        return f"line{'s' if len(numbers) > 1 else ''} {', '.join(map(line_of, numbers))}"

    detail = [_ROWS.sub(swap, d) for d in exc.detail] if isinstance(exc.detail, list) \
        else exc.detail
    return ApiError(exc.status, _ROWS.sub(swap, exc.message).replace("recorded", "imported"),
                    "csv", detail)
