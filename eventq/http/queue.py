"""``/api/queue``: submit, list, cancel, concurrency (seed 000 shapes)."""

from __future__ import annotations

import contextlib
import datetime
import functools
import os
import re
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

import msgspec
from aiohttp import web

from eventq import events as ev
from eventq import jobenv, policy
from eventq.actors.scheduler import (
    ChangeLimits,
    CommandError,
    DryRun,
    NamesTaken,
    Outcome,
    SetSettings,
    Submit,
    SubmitMany,
)
from eventq.auth import User
from eventq.callbacks.urls import url_problem
from eventq.gcpause import collector_paused
from eventq.http import bounds as b
from eventq.http.common import (
    ORCH,
    ApiError,
    Handler,
    current_user,
    decode_body,
    require_admin,
)
from eventq.projections.queue import UnknownStatus
from eventq.server import Orchestrator

routes = web.RouteTableDef()

NonNegative = b.GpuCount
Positive = b.Runtime


class SubmitRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The body of ``POST /api/queue/submit`` (SPEC 2); every bound is in ``bounds``."""

    command: b.Words | b.ShellLine | None = None
    config: b.Config | None = None
    config_name: b.ConfigName | None = None
    name: b.JobName | None = None
    gpus: NonNegative | None = None
    num_processes: NonNegative | None = None
    device_ids: Annotated[list[b.GpuIndex], msgspec.Meta(max_length=b.GPUS)] | None = None
    any_gpu: bool = False
    no_wait: bool = False
    target: Literal["auto", "worker", "local"] = "auto"
    worker_labels: b.Labels = {}
    priority_override: Annotated[int, msgspec.Meta(ge=0, le=1000)] | None = None
    max_attempts: Annotated[int, msgspec.Meta(ge=1, le=100)] = 3
    max_runtime: Positive | None = None
    estimated_runtime: Positive | None = None
    retry_on_failure: bool = False
    #: Variables the job declares: every node it runs on gets them.
    env: b.Env = {}
    #: Its working directory, on whichever node runs it.
    cwd: b.Path | None = None
    #: The submitter's whole environment, for a run on the orchestrator's own machine
    #: only (``eventq jobs submit`` sends it unless ``--no-export-env``).
    exported_env: b.Env = {}
    #: The submitter's working directory, for a run on the orchestrator's own machine only.
    exported_cwd: b.Path | None = None
    metadata: b.FreeJson = {}
    team: b.Team | None = None
    dry_run: bool = False
    requires_approval: bool = False
    estimated_cost: b.Cost = 0.0
    #: Job ids or unique job names (in a batch, also the names of the batch's jobs).
    depends_on: Annotated[list[b.Reference], msgspec.Meta(max_length=10_000)] = []
    #: Not before this time: epoch seconds, or ISO-8601 (local time if no zone is given).
    begin_at: b.Epoch | b.IsoTime | None = None
    #: A JSON POST goes here when the job ends (docs/api.md, "Completion callbacks").
    notify_url: b.NotifyUrl | None = None


class Checked:
    """What one request has already checked: a batch of 10,000 rows from one directory
    looks at that directory once, and keeps one environment file for them all."""

    def __init__(self, names: dict[str, str] | None = None, printable: bool = False) -> None:
        #: The batch's own job names, to their new ids.
        self.names = names or {}
        self.dirs: set[str] = set()
        #: Every name of the batch was searched for control characters, and has none.
        self.printable = printable
        #: The environment files to write before the request is recorded, by content.
        self.sealed: dict[bytes, jobenv.Sealed] = {}


def build_spec(req: SubmitRequest, user: User, orch: Orchestrator,
               checked: Checked | None = None, job_id: str | None = None) -> ev.JobSpec:
    """Validate what msgspec cannot, and fill in defaults."""
    checked = checked or Checked()
    if req.gpus is not None and req.num_processes is not None and req.gpus != req.num_processes:
        raise ApiError(422, "gpus and num_processes disagree", "gpus")
    gpus = req.gpus if req.gpus is not None else (req.num_processes or 0) \
        if req.num_processes is not None else 1
    if not req.command and req.config is None and req.config_name is None:
        raise ApiError(422, "a job needs a command, a config or a config_name", "command")
    if isinstance(req.command, list) and req.command and not req.command[0]:
        raise ApiError(422, "the program to run (command's first item) is empty", "command")
    if req.priority_override is not None and user.level not in (ev.Level.ADMIN, ev.Level.LEAD):
        raise ApiError(403, "only leads and admins may override priority", "priority_override")
    if req.name and not checked.printable and b.CONTROL.search(req.name):
        raise ApiError(422, "name must not contain control characters", "name")
    _check_process_text(req)
    _check_free_json(req)
    _check_dir(req.cwd, "cwd", checked)
    _check_gpus(req, gpus, orch)
    if req.notify_url is not None and (why := url_problem(req.notify_url)):
        raise ApiError(422, f"notify_url {why}", "notify_url")
    env_sha256 = _seal_env(req, checked)
    return ev.JobSpec(
        job_id=job_id or new_job_id(orch), user=user.name, priority=ev.LEVEL_PRIORITY[user.level],
        command=req.command or [], name=req.name or req.config_name or _name_of(req.command),
        team=req.team or user.team, priority_override=req.priority_override, gpus=gpus,
        device_ids=req.device_ids, any_gpu=req.any_gpu, target=req.target,
        worker_labels=req.worker_labels, max_attempts=req.max_attempts,
        max_runtime=req.max_runtime, estimated_runtime=req.estimated_runtime,
        retry_on_failure=req.retry_on_failure, cwd=req.cwd, env_sha256=env_sha256,
        metadata=req.metadata, config=req.config if req.config is not None else
        resolve_config(req.config_name, orch), config_name=req.config_name,
        requires_approval=req.requires_approval, estimated_cost=req.estimated_cost,
        depends_on=resolve_dependencies(req.depends_on, orch, checked.names),
        begin_at=parse_time(req.begin_at), notify_url=req.notify_url)


def _check_dir(path: str | None, field: str, checked: Checked) -> None:
    if path is not None and path not in checked.dirs:
        if not os.path.isdir(path):
            hint = "; submit from a directory the server shares, or with --no-export-env" \
                if field == "exported_cwd" else ""
            raise ApiError(422, f"{field} {path} is not a directory on the server{hint}", field)
        checked.dirs.add(path)


def _seal_env(req: SubmitRequest, checked: Checked) -> str | None:
    """The digest of the job's environment file (``eventq/jobenv.py``): no variable enters
    the log. What the submitter exported is kept only for a job that may run here."""
    here = req.target != "worker"
    exported, cwd = (req.exported_env, req.exported_cwd) if here else ({}, None)
    if not req.env and not exported and cwd is None:
        return None
    _check_dir(cwd, "exported_cwd", checked)
    key = _env_key.encode((req.env, exported, cwd))
    sealed = checked.sealed.get(key)
    if sealed is None:
        sealed = checked.sealed[key] = jobenv.seal(req.env, exported, cwd)
    return sealed.digest


_env_key = msgspec.msgpack.Encoder(order="deterministic")


def resolve_dependencies(refs: list[str], orch: Orchestrator,
                         batch: dict[str, str]) -> list[str]:
    """Each reference: a name in this batch, a job id, or the name of exactly one job."""
    out = []
    for ref in refs:
        if ref in batch:
            out.append(batch[ref])
        elif ref in orch.state.jobs:
            out.append(ref)
        elif len(named := orch.state.by_name.get(ref, [])) == 1:
            out.append(named[0])
        elif named:
            raise ApiError(422, f"depends_on: the name {ref!r} is used by {len(named)} jobs; "
                                "use a job id", "depends_on")
        else:
            raise ApiError(422, f"depends_on: no job or name {ref!r}", "depends_on")
    return list(dict.fromkeys(out))


def parse_time(value: float | str | None) -> float | None:
    if value is None or isinstance(value, float | int):
        return None if value is None else float(value)
    try:
        return datetime.datetime.fromisoformat(value).timestamp()
    except ValueError:
        raise ApiError(422, f"begin_at {value!r} is neither epoch seconds nor ISO-8601",
                       "begin_at") from None


#: Ids per second of the clock: an id is the time in 1/65,536 s, 12 hex digits until 2106.
IDS_PER_SECOND = 65_536
_last_id = 0


def new_job_ids(orch: Orchestrator, count: int) -> list[str]:
    """``count`` new ids, unique among known jobs, that grow with time: the next after the
    last one given, or the clock's if that is later (so a restart starts past the ids
    before it, except those given ahead of the clock in its last second or so, which the
    check against known jobs skips).

    Why not random: the log indexes events by job id, and a random id is inserted at a
    random place of that B-tree (~8 us of each submission's commit, more as the log
    grows); a growing one goes at its end. Ids name jobs and guard nothing (tokens do, and
    any user may list the queue), so that they can be guessed costs nothing."""
    global _last_id
    start = max(int(orch.clock.now() * IDS_PER_SECOND), _last_id + 1)
    ids = [f"{n:012x}" for n in range(start, start + count)]
    while taken := [job_id for job_id in ids if job_id in orch.state.jobs]:
        start = int(max(taken), 16) + 1
        ids = [f"{n:012x}" for n in range(start, start + count)]
    _last_id = max(_last_id, start + count - 1)
    return ids


def new_job_id(orch: Orchestrator) -> str:
    """``new_job_ids`` for one id, without its lists (every submission takes one)."""
    global _last_id
    n = max(int(orch.clock.now() * IDS_PER_SECOND), _last_id + 1)
    while (job_id := f"{n:012x}") in orch.state.jobs:
        n += 1
    _last_id = n
    return job_id


def _check_process_text(req: SubmitRequest) -> None:
    """What exec would refuse later must be refused now, while the client can hear it."""
    words = req.command if isinstance(req.command, str) else "".join(req.command or ())
    if "\0" in words:  # one search of the joined words: a batch checks 10,000 commands
        raise ApiError(422, "command must not contain NUL characters", "command")
    if len(words) > b.COMMAND_CHARS:
        raise ApiError(422, f"command has more than {b.COMMAND_CHARS} characters in all",
                       "command")
    for field, env in (("env", req.env), ("exported_env", req.exported_env)):
        if env:
            _check_env(env, field)
    for field, path in (("cwd", req.cwd), ("exported_cwd", req.exported_cwd)):
        if path is not None and "\0" in path:
            raise ApiError(422, f"{field} must not contain NUL characters", field)


def _check_env(env: dict[str, str], field: str) -> None:
    """Names and values are searched joined, as commands are: an exported environment of
    a hundred variables is looked at in a few string operations, not a hundred."""
    names, values = "".join(env), "".join(env.values())
    if "" in env or "=" in names or "\0" in names:
        key = next(k for k in env if not k or "=" in k or "\0" in k)
        raise ApiError(422, f"{field} name {key!r} is not a valid variable name", field)
    if "\0" in values:
        key = next(k for k, v in env.items() if "\0" in v)
        raise ApiError(422, f"{field} {key} must not contain NUL characters", field)
    if len(names) + len(values) > b.ENV_CHARS:
        raise ApiError(422, f"{field} has more than {b.ENV_CHARS} characters of names and "
                            "values in all", field)


def _check_free_json(req: SubmitRequest) -> None:
    """Sizes the decoder cannot bound as it reads: what is stored must be read back."""
    if req.metadata and (why := b.json_problem("metadata", req.metadata, b.METADATA_BYTES)):
        raise ApiError(422, why, "metadata")
    if req.config and (why := b.json_problem("config", req.config, b.CONFIG_BYTES)):
        raise ApiError(422, why, "config")


def _check_gpus(req: SubmitRequest, gpus: int, orch: Orchestrator) -> None:
    """A job no node could ever hold is refused, saying how to ask for what can run."""
    local = orch.gpu_table.nodes.get("local")
    total = len(local.gpus) if local else 0
    if gpus > total and (req.target == "local" or (
            req.target == "auto" and not _a_worker_holds(req, gpus, orch))):
        raise ApiError(422, f"needs {gpus} GPUs; the local node has {total}"
                       + (f" ({local.nvml_error})" if local and local.nvml_error else "")
                       + (" and no worker has that many" if req.target == "auto" else "")
                       + ". A job that needs no GPU runs with --gpus 0 (\"gpus\": 0); "
                         "--target worker waits for a remote worker that has them", "gpus")
    if req.device_ids and local and not set(req.device_ids) <= local.gpus.keys():
        raise ApiError(422, f"device_ids {req.device_ids} are not all GPUs of the local node "
                            f"(it has {sorted(local.gpus)})", "device_ids")
    if req.device_ids and not req.any_gpu and len(req.device_ids) != gpus:
        raise ApiError(422, f"device_ids names {len(req.device_ids)} GPUs but gpus is {gpus}",
                       "device_ids")


def _a_worker_holds(req: SubmitRequest, gpus: int, orch: Orchestrator) -> bool:
    """Has a known worker (connected or not) that many GPUs, and the labels asked for?"""
    for name, node in orch.gpu_table.nodes.items():
        worker = orch.workers.by_id.get(name)
        if worker is not None and len(node.gpus) >= gpus \
                and policy.labels_match(req.worker_labels, worker.labels):
            return True
    return False


def resolve_config(name: str | None, orch: Orchestrator) -> dict[str, Any] | None:
    """``<configs_dir>/<name>/config.json`` or ``<configs_dir>/<name>.json`` (SPEC 2)."""
    if name is None:
        return None
    if "/" in name or name.startswith(".") or "\0" in name:
        raise ApiError(422, f"config_name {name!r} is not a plain name", "config_name")
    for path in (orch.configs_dir / name / "config.json", orch.configs_dir / f"{name}.json"):
        if path.is_file():
            try:
                loaded = msgspec.json.decode(path.read_bytes())
            except msgspec.DecodeError as exc:
                raise ApiError(422, f"config {name} is not valid JSON: {exc}",
                               "config_name") from None
            if not isinstance(loaded, dict):
                raise ApiError(422, f"config {name} is not a JSON object", "config_name")
            return loaded
    raise ApiError(422, f"unknown config_name {name!r} (looked in {orch.configs_dir})",
                   "config_name")


def _name_of(command: list[str] | str | None) -> str:
    words = command.split() if isinstance(command, str) else (command or [])
    return os.path.basename(words[0]) if words else "job"


def submit_reply(orch: Orchestrator, job_id: str) -> dict[str, Any]:
    job = orch.state.jobs[job_id]
    # Seed 000's words: queued = waiting (dependencies, begin time) or pending.
    api_status = {"pending": "queued", "waiting": "queued", "dispatched": "running",
                  "held": "queued"}.get(job.status, job.status)
    reply: dict[str, Any] = {
        "success": True, "job_id": job_id, "status": api_status, "allocated_gpus": job.gpus,
        "queue_position": orch.state.position(job_id, orch.clock.now()),
    }
    if job.status in ("pending", "waiting", "rejected", "blocked"):
        # Recorded by this very submission's decision: current, and free to read.
        reasons = job.reasons or orch.queue.reasons(job)
        reply["reasons"] = [{"code": r.code, "detail": r.detail} for r in reasons]
    return reply


def dry_run_reply(result: DryRun, no_wait: bool) -> dict[str, Any]:
    status = "rejected" if no_wait and result.status == "queued" else result.status
    reply: dict[str, Any] = {
        "success": True, "dry_run": True, "job_id": None, "status": status,
        "node": result.node, "allocated_gpus": result.gpus,
        "reasons": [{"code": r.code, "detail": r.detail} for r in result.reasons],
        "estimated_start": result.estimated_start}
    if result.estimate_note:
        reply["estimate_note"] = result.estimate_note
    return reply


@contextlib.asynccontextmanager
async def keeping_env(orch: Orchestrator, checked: Checked) -> AsyncIterator[None]:
    """The request's environment files are on disk before its block records anything."""
    try:
        async with orch.env_files.kept(checked.sealed.values()):
            yield
    except jobenv.EnvNotKept as exc:
        raise ApiError(503, f"{exc}; nothing was recorded") from None


async def settle(outcome: Outcome) -> None:
    """Reply only once what the command recorded is durable."""
    if outcome.durable is not None:
        await outcome.durable


@routes.post("/api/queue/submit")
async def submit(request: web.Request) -> web.Response:
    orch, user = request.app[ORCH], current_user(request)
    req = decode_body(await request.read(), SubmitRequest)
    checked = Checked()
    spec = build_spec(req, user, orch, checked)
    if req.dry_run:
        field = ev.unstorable_field(spec)  # what a real submission's append would refuse
        if field is not None:
            raise ApiError(422, f"{field} cannot be stored (integers beyond 64 bits)", field)
        return web.json_response(dry_run_reply(orch.scheduler.dry_run(spec), req.no_wait))
    command = Submit(spec, user.principal, req.no_wait)
    if checked.sealed:
        async with keeping_env(orch, checked):
            outcome: Outcome = await orch.scheduler.ask(command)
    else:  # no environment file to keep: a context manager less on the hot route
        outcome = orch.scheduler.submit_waiting(command) or await orch.scheduler.ask(command)
    await settle(outcome)
    # msgspec encodes several times faster than the json module on this hot route.
    return web.Response(body=msgspec.json.encode(submit_reply(orch, spec.job_id)),
                        content_type="application/json")


class BatchRequest(msgspec.Struct, forbid_unknown_fields=True):
    """``POST /api/queue/batch``: many jobs, recorded all together or not at all."""

    jobs: Annotated[list[SubmitRequest], msgspec.Meta(min_length=1, max_length=100_000)]


def pausing_collector(handler: Handler) -> Handler:
    """A route that may build 10,000 jobs: the cyclic collector pauses while it runs, and
    what it built is kept out of the collector's view after (``eventq/gcpause.py``)."""

    @functools.wraps(handler)
    async def route(request: web.Request) -> web.StreamResponse:
        with collector_paused(keeps=request.app[ORCH].long_lived):
            return await handler(request)
    return route


@routes.post("/api/queue/batch")
@pausing_collector
async def submit_batch(request: web.Request) -> web.Response:
    orch, user = request.app[ORCH], current_user(request)
    body = decode_body(await request.read(), BatchRequest)
    ids = await record_batch(orch, user, body.jobs)
    return web.json_response({"success": True, "count": len(ids), "job_ids": ids})


async def record_batch(orch: Orchestrator, user: User, jobs: list[SubmitRequest],
                       new_names: bool = False) -> list[str]:
    """Every job recorded, in one commit, or none: an ApiError whose ``detail`` names each
    bad row (``row N: …``, 1-based), or ``NamesTaken`` if ``new_names`` and another set
    took some of them first. The new jobs' ids, in order."""
    ids = new_job_ids(orch, len(jobs))
    names: dict[str, str] = {}
    problems: list[str] = []
    for row, (req, job_id) in enumerate(zip(jobs, ids, strict=True), start=1):
        if req.name and req.name in names:
            problems.append(f"row {row}: the name {req.name!r} is used twice in this batch")
        if req.name:
            names[req.name] = job_id
        if req.dry_run or req.no_wait:
            problems.append(f"row {row}: dry_run and no_wait do not apply to a batch")
    specs = []
    forbidden = None
    checked = Checked(names, printable=not b.CONTROL.search(" ".join(names)))
    for row, (req, job_id) in enumerate(zip(jobs, ids, strict=True), start=1):
        try:
            specs.append(build_spec(req, user, orch, checked, job_id))
        except ApiError as exc:
            problems.append(f"row {row}: {exc.message}")
            forbidden = forbidden or (exc if exc.status == 403 else None)
    if forbidden is not None:
        raise ApiError(403, f"{forbidden.message}; nothing was recorded", forbidden.field,
                       problems[:100])
    if problems:
        raise ApiError(422, f"{len(problems)} rows are invalid; nothing was recorded", "jobs",
                       problems[:100])
    await _submit_many(orch, SubmitMany(specs, user.principal, new_names), checked)
    return ids


async def _submit_many(orch: Orchestrator, command: SubmitMany, checked: Checked) -> None:
    """Record a checked set, its environment files written first; durable on return."""
    try:
        async with keeping_env(orch, checked):
            outcome: Outcome = await orch.scheduler.ask(command)
    except NamesTaken:
        raise
    except CommandError as exc:
        raise ApiError(exc.status, exc.message, "jobs") from None
    await settle(outcome)


def flag(request: web.Request, name: str) -> bool:
    """A boolean query parameter, spelled as OpenAPI sends one: true or false."""
    raw = request.query.get(name, "false").lower()
    if raw not in ("true", "false"):
        raise ApiError(422, f"{name} must be true or false", name)
    return raw == "true"


def int_param(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(name)
    return default if raw is None else parse_int(raw, name, lo, hi)


_INTEGER = re.compile(r"-?[0-9]+")


def parse_int(raw: str, name: str, lo: int, hi: int) -> int:
    """Digits, as the document's ``integer`` says: not ``+5``, `` 5``, ``1_000`` or ``٣``,
    which Python's ``int`` would take."""
    try:
        value = int(raw) if _INTEGER.fullmatch(raw) else None
    except ValueError:  # more digits than int() reads
        value = None
    if value is None:
        raise ApiError(422, f"{name} must be an integer", name)
    if not lo <= value <= hi:
        raise ApiError(422, f"{name} must be between {lo} and {hi}", name)
    return value


@routes.get("/api/queue")
async def list_queue(request: web.Request) -> web.Response:
    orch = request.app[ORCH]
    limit = int_param(request, "limit", 50, 1, 10_000)
    offset = int_param(request, "offset", 0, 0, 100_000_000)
    status, completed = request.query.get("status"), flag(request, "include_completed")
    # The listing changes only when the log moves on, or as time ages jobs and estimates:
    # dashboards polling an unchanged queue are answered from the last rendering.
    key = (orch.log.head_seq, int(orch.clock.now()), status, limit, completed, offset)
    cached = orch.queue.rendered.get(key)
    if cached is None:
        try:
            jobs = orch.queue.list(status, limit, completed, offset)
        except UnknownStatus as exc:
            raise ApiError(422, str(exc), "status") from None
        cached = msgspec.json.encode({"jobs": jobs, "count": len(jobs),
                                      "total": orch.queue.count(status, completed)})
        orch.queue.remember(key, cached)
    return web.Response(body=cached, content_type="application/json")


@routes.get("/api/queue/stats")
async def stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[ORCH].queue.stats())


@routes.get("/api/queue/me")
async def me(request: web.Request) -> web.Response:
    user = current_user(request)
    return web.json_response({**request.app[ORCH].queue.me(user.name),
                              "level": user.level.value, "team": user.team})


@routes.get("/api/queue/position/{job_id}")
async def position(request: web.Request) -> web.Response:
    orch, job_id = request.app[ORCH], request.match_info["job_id"]
    found = orch.queue.position_of(job_id)
    if found is None:
        raise ApiError(404, f"no job {job_id}")
    return web.json_response(found)


Count = Annotated[int, msgspec.Meta(ge=1, le=10_000)]
Unset = msgspec.UnsetType


class LimitsUpdate(msgspec.Struct, forbid_unknown_fields=True):
    """A partial change of the limits; fields left out keep their value."""

    max_concurrent: Count | Unset = msgspec.UNSET
    user_max_concurrent: Count | Unset = msgspec.UNSET
    team_max_concurrent: Count | Unset = msgspec.UNSET
    enable_fair_share: bool | Unset = msgspec.UNSET
    #: null: no count of its own; the local GPUs are the bound (the default).
    local_job_max_concurrent: Count | Unset | None = msgspec.UNSET
    #: null means unlimited.
    local_gpu_max_concurrent: Count | Unset | None = msgspec.UNSET
    #: From under a second (a demo) to a year; nothing shorter, so aging never overflows.
    starvation_threshold_minutes: Annotated[float, msgspec.Meta(ge=0.01, le=525_600)] | Unset = \
        msgspec.UNSET
    #: Jobs whose estimated_cost is above it start blocked (null: no threshold).
    approval_cost_threshold: Annotated[float, msgspec.Meta(ge=0)] | Unset | None = msgspec.UNSET


def limits_dict(orch: Orchestrator) -> dict[str, Any]:
    body: dict[str, Any] = msgspec.to_builtins(orch.state.limits)
    body["approval_cost_threshold"] = orch.state.approval_cost_threshold
    return body


@routes.get("/api/queue/concurrency")
async def get_limits(request: web.Request) -> web.Response:
    return web.json_response(limits_dict(request.app[ORCH]))


@routes.post("/api/queue/concurrency")
async def set_limits(request: web.Request) -> web.Response:
    orch, user = request.app[ORCH], require_admin(request)
    changes = msgspec.to_builtins(decode_body(await request.read(), LimitsUpdate))
    threshold = changes.pop("approval_cost_threshold", orch.state.approval_cost_threshold)
    if threshold != orch.state.approval_cost_threshold:
        await settle(await orch.scheduler.ask(SetSettings(user.principal, threshold)))
    outcome = await orch.scheduler.ask(ChangeLimits(user.principal, changes))
    await settle(outcome)
    started = [{"job_id": d.job_id, "attempt": d.attempt, "node": d.node, "gpus": d.gpus}
               for d in outcome.dispatched]
    return web.json_response({"success": True, **limits_dict(orch), "started": started})
