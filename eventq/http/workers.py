"""``/api/workers/*``: the two worker transports (SPEC 6), authenticated by X-Worker-Token.

eventq's own agent speaks JSON over ``/api/workers/ws``. SimpleTuner's stock worker
speaks REST plus one SSE stream, exactly as its code does. Both end in the same
registry and scheduler commands, so both are fenced the same way: a report about an
attempt that is not this worker's live one changes nothing.

eventq's agent also holds a lease (``eventq.leases``): its welcome grants one and each
heartbeat heard while the worker is online is answered, which renews it. A worker given
up (``WorkerLost``) is answered no more; its connection is closed so that it says hello
again and learns what is still its own.
"""

from __future__ import annotations

import asyncio
import json
from typing import Annotated, Any, Literal

import msgspec
from aiohttp import WSMsgType, web

from eventq import events as ev
from eventq import gcpause, policy
from eventq.actors.registry import WorkerGone, WorkerHello
from eventq.actors.scheduler import AttemptReport, Outcome, Reconciled
from eventq.actors.workers_state import Worker
from eventq.auth import token_hash
from eventq.http import bounds as b
from eventq.http.common import ORCH, ApiError, decode_body
from eventq.http.hub import Outbox
from eventq.leases import lease_terms
from eventq.server import Orchestrator

routes = web.RouteTableDef()
PING_SECONDS = 15.0
#: How long a stock worker's terminal report may keep its next job back (see
#: ``_until_closed``); past it, its idle heartbeat gets the job to it at the latest.
REPORT_CLOSE_WAIT = 2.0
REPORT_POLL = 0.002
REPORT_SETTLE = 0.01
#: What a stock worker must be told when its stream opens (decided at register).
PENDING = web.AppKey("pending_greetings", dict[str, Reconciled])


def authenticate_worker(request: web.Request) -> Worker:
    token = request.headers.get("X-Worker-Token", "")
    worker = request.app[ORCH].workers.by_token(token_hash(token)) if token else None
    if worker is None:
        raise ApiError(401, "missing or invalid worker token (X-Worker-Token)")
    request.app[ORCH].registry.touch(worker.worker_id)
    return worker


def _same_worker(worker: Worker, worker_id: str | None) -> None:
    if worker_id is not None and worker_id != worker.worker_id:
        raise ApiError(403, f"this token belongs to worker {worker.worker_id}, not {worker_id}",
                       "worker_id")


async def hello(orch: Orchestrator, msg: WorkerHello) -> Reconciled:
    outcome, _ = await orch.registry.ask(msg)
    assert isinstance(outcome, Outcome) and isinstance(outcome.result, Reconciled)
    if outcome.durable is not None:
        await outcome.durable
    return outcome.result


def greet(orch: Orchestrator, worker_id: str, outbox: Outbox, done: Reconciled) -> None:
    """After a (re)connection: stop what was given away, send again what never arrived.

    The outbox is attached before the worker's hello is decided, so a dispatch made while
    it registers is queued behind the greeting, never lost between the two."""
    for job_id, attempt in done.stop:
        outbox.send({"type": "job_cancel", "job_id": job_id, "attempt": attempt,
                     "reason": "this attempt was given to another worker"})
    for job_id, attempt, reason in done.cancel:  # asked while the worker was away
        outbox.send({"type": "job_cancel", "job_id": job_id, "attempt": attempt,
                     "reason": reason})
    for job_id, attempt in done.resend:
        outbox.send(orch.hub.run_message(job_id, attempt, outbox.transport))


# --- eventq's own agent: one websocket -----------------------------------------------


class AgentGpu(msgspec.Struct, forbid_unknown_fields=True):
    index: b.GpuIndex
    name: b.Model
    memory_gb: b.MemoryGb
    foreign_memory_percent: b.Percent = 0.0


class AgentHello(msgspec.Struct, forbid_unknown_fields=True, tag="hello", tag_field="type"):
    """Every field bounded (``eventq/http/bounds.py``): a hello is refused whole, before
    anything is recorded, rather than put a GPU the allocator cannot hold in the log."""

    gpus: Annotated[list[AgentGpu], msgspec.Meta(max_length=b.GPUS)]
    simulated: bool = False
    labels: b.Labels = {}
    #: [job id, attempt] of every attempt the agent still runs.
    running: b.Running = []
    name: b.Model | None = None
    #: On a time-limited allocation: take only jobs known to end before this (epoch s).
    accepts_until: b.Epoch | None = None
    #: The agent's SIGTERM-to-SIGKILL grace, for the lease's terms.
    grace_seconds: Annotated[float, msgspec.Meta(ge=0, le=86_400)] | None = None

    def __post_init__(self) -> None:
        indices = {gpu.index for gpu in self.gpus}
        if len(indices) != len(self.gpus):
            raise ValueError("each GPU index may appear once in gpus")


class AgentStarted(msgspec.Struct, tag="started", tag_field="type"):
    job_id: b.JobId
    attempt: b.Attempt
    pid: b.Pid | None = None


class AgentExited(msgspec.Struct, tag="exited", tag_field="type"):
    job_id: b.JobId
    attempt: b.Attempt
    exit_code: b.ExitCode | None
    #: ``lost``: stopped by the agent because its lease lapsed.
    outcome: Literal["exited", "timeout", "cancelled", "start_failed", "lost"] = "exited"
    detail: b.Detail = ""


class AgentLog(msgspec.Struct, tag="log", tag_field="type"):
    job_id: b.JobId
    attempt: b.Attempt
    stream: str
    data: str


class AgentHeartbeat(msgspec.Struct, tag="heartbeat", tag_field="type"):
    running: b.Running = []
    #: Its number: answered with ``{"type": "lease", "beat": n}``, which renews the lease.
    beat: Annotated[int, msgspec.Meta(ge=0, le=2**62)] | None = None


class AgentProgress(msgspec.Struct, tag="progress", tag_field="type"):
    job_id: b.JobId
    attempt: b.Attempt
    progress: Any = None


AgentMessage = AgentStarted | AgentExited | AgentLog | AgentHeartbeat | AgentProgress
_agent_decoder = msgspec.json.Decoder(AgentMessage)


@routes.get("/api/workers/ws")
async def agent_socket(request: web.Request) -> web.StreamResponse:
    orch, worker = request.app[ORCH], authenticate_worker(request)
    ws = web.WebSocketResponse(max_msg_size=8 * 2**20)
    await ws.prepare(request)
    opened_at = gcpause.freezes()
    if _keeps(orch):  # from its first step: a reconnection storm builds before welcomes
        gcpause.keep_soon()
    greeting = await _read_hello(ws)
    if greeting is None:
        return ws
    gpus = [ev.GpuInfo(g.index, g.name, g.memory_gb, g.foreign_memory_percent)
            for g in greeting.gpus]
    outbox = Outbox("ws", worker.token_sha256)
    orch.hub.attach(worker.worker_id, outbox)
    done = await hello(orch, WorkerHello(worker.worker_id, "ws", gpus, greeting.simulated,
                                         greeting.labels, None, list(greeting.running),
                                         greeting.accepts_until))
    terms = lease_terms(orch.heartbeat_timeout, greeting.grace_seconds or 10.0)
    try:
        await ws.send_json({"type": "welcome", "worker_id": worker.worker_id,
                            "heartbeat_seconds": terms.heartbeat, "keep": done.keep,
                            "stop": done.stop, "lease_seconds": terms.lease,
                            "fence_grace_seconds": terms.grace})
    except ConnectionResetError:  # it gave up waiting (a reconnection storm); it comes back
        orch.hub.detach(worker.worker_id, outbox)
        return ws
    greet(orch, worker.worker_id, outbox, done)
    writer = asyncio.get_running_loop().create_task(_write(ws, outbox))
    if _keeps(orch):  # and once welcomed: what its hello built lives on too
        gcpause.keep_soon()
    try:
        await _serve_agent(orch, worker.worker_id, ws, outbox)
    finally:
        orch.hub.detach(worker.worker_id, outbox)
        writer.cancel()
        if orch.long_lived:
            gcpause.connection_closed(opened_at)
    return ws


async def _read_hello(ws: web.WebSocketResponse) -> AgentHello | None:
    """The agent's first message; None once it has been told what was wrong with it."""
    try:
        first = await ws.receive(timeout=30)
        return msgspec.json.decode(first.data, type=AgentHello)
    except (TimeoutError, msgspec.DecodeError, TypeError, RecursionError) as exc:
        await ws.send_json({"type": "error", "error": f"expected a hello message first: "
                                                     f"{unreadable(exc)}"})
        await ws.close(code=4400)
        return None


async def _serve_agent(orch: Orchestrator, worker_id: str, ws: web.WebSocketResponse,
                       outbox: Outbox) -> None:
    async for msg in ws:
        if msg.type == WSMsgType.TEXT:
            await _agent_message(orch, worker_id, ws, outbox, msg.data)
        elif msg.type == WSMsgType.BINARY:
            await ws.send_json({"type": "error", "error": "send JSON text frames"})


def _keeps(orch: Orchestrator) -> bool:
    """A long-lived server with enough workers that freezing their connections pays."""
    return orch.long_lived and gcpause.worth_keeping(len(orch.hub.connections))


def unreadable(exc: Exception) -> str:
    """What was wrong with a message, in a line."""
    if isinstance(exc, RecursionError):
        return "it is nested too deeply to read"
    return str(exc) or type(exc).__name__


async def _write(ws: web.WebSocketResponse, outbox: Outbox) -> None:
    while (message := await outbox.queue.get()) is not None:
        await ws.send_json(message)
    await ws.close(code=4001, message=(outbox.closed or "closed").encode()[:120])


async def _agent_message(orch: Orchestrator, worker_id: str, ws: web.WebSocketResponse,
                         outbox: Outbox, raw: str) -> None:
    orch.registry.touch(worker_id)
    try:
        msg = _agent_decoder.decode(raw)
    except (msgspec.DecodeError, RecursionError) as exc:
        await ws.send_json({"type": "error", "error": f"bad message: {unreadable(exc)}"})
        return
    if isinstance(msg, AgentHeartbeat):
        renew_lease(orch, worker_id, outbox, msg.beat)
        if _keeps(orch):  # the connection's next read lives until its next heartbeat
            gcpause.keep_soon()
    elif isinstance(msg, AgentStarted):
        orch.scheduler.tell(AttemptReport(msg.job_id, msg.attempt, "started", node=worker_id,
                                          pid=msg.pid))
    elif isinstance(msg, AgentExited):
        orch.scheduler.tell(AttemptReport(msg.job_id, msg.attempt, "ended", node=worker_id,
                                          outcome=msg.outcome, exit_code=msg.exit_code,
                                          detail=msg.detail))
    elif isinstance(msg, AgentLog) and not orch.hub.append_log(
            worker_id, msg.job_id, msg.attempt, msg.stream, msg.data):
        await ws.send_json({"type": "error",
                            "error": f"attempt {msg.job_id}#{msg.attempt} is not this worker's"})


def renew_lease(orch: Orchestrator, worker_id: str, outbox: Outbox, beat: int | None) -> None:
    """Answer a heartbeat, renewing the lease, only while this connection is the worker's and
    the registry holds it online: an answer promises that the worker is not given up yet."""
    worker = orch.workers.by_id.get(worker_id)
    if beat is not None and worker is not None and worker.online \
            and orch.hub.connections.get(worker_id) is outbox:
        outbox.send({"type": "lease", "beat": beat})


# --- SimpleTuner's stock worker: REST + one SSE stream --------------------------------


class GpuInfoBody(msgspec.Struct):
    name: b.Model = "GPU"
    #: null from a worker that cannot tell (no torch, no nvidia-smi, Apple silicon).
    vram_gb: b.MemoryGb | None = None
    count: b.GpuCount = 0
    driver: b.Model | None = None
    accelerator: b.Model | None = None


class RegisterBody(msgspec.Struct):
    name: b.Model
    gpu_info: GpuInfoBody = msgspec.field(default_factory=GpuInfoBody)
    persistent: bool = False
    provider: b.Model | None = None
    labels: b.Labels | None = None
    current_job_id: b.JobId | None = None


@routes.post("/api/workers/register")
async def register(request: web.Request) -> web.Response:
    orch, worker = request.app[ORCH], authenticate_worker(request)
    body = decode_body(await request.read(), RegisterBody)
    info = body.gpu_info
    gpus = [ev.GpuInfo(i, info.name, info.vram_gb or 0.0) for i in range(info.count)]
    running: list[tuple[str, int]] = []
    current = orch.state.jobs.get(body.current_job_id or "")
    if current is not None:
        running = [(current.spec.job_id, current.attempt)]
    done = await hello(orch, WorkerHello(worker.worker_id, "sse", gpus, False,
                                         body.labels or {}, 1, running))
    resume = None
    if done.keep:
        job = orch.state.jobs[done.keep[0][0]]
        resume = {"job_id": job.spec.job_id, "config_name": job.spec.config_name,
                  "status": job.status}
    abandon = body.current_job_id if body.current_job_id and not done.keep else None
    request.app[PENDING][worker.worker_id] = done
    return web.json_response({"worker_id": worker.worker_id,
                              "sse_url": f"/api/workers/stream?worker_id={worker.worker_id}",
                              "resume_job": resume, "abandon_job": abandon})


@routes.get("/api/workers/stream")
async def stream(request: web.Request) -> web.StreamResponse:
    orch, worker = request.app[ORCH], authenticate_worker(request)
    _same_worker(worker, request.query.get("worker_id"))
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
    await response.prepare(request)
    outbox = Outbox("sse", worker.token_sha256)
    orch.hub.attach(worker.worker_id, outbox)
    opened_at = gcpause.freezes()
    done = request.app[PENDING].pop(worker.worker_id, None) or Reconciled([], [], [])
    # Dispatched since it registered, before this stream could carry it: not started yet.
    unsent = [(j, orch.state.jobs[j].attempt) for j in orch.state.node_active.get(
        worker.worker_id, {}) if orch.state.jobs[j].pid is None]
    greet(orch, worker.worker_id, outbox, Reconciled(done.keep, done.stop, unsent, done.cancel))
    if _keeps(orch):
        gcpause.keep_soon()
    number = 0
    try:
        while True:
            try:
                message = await asyncio.wait_for(outbox.queue.get(), PING_SECONDS)
            except TimeoutError:
                message = {"type": "ping"}
                orch.registry.touch(worker.worker_id)  # its stream is open and taking data
            if message is None:
                break
            number += 1
            await response.write(f"event: {message['type']}\nid: {number}\n"
                                 f"data: {json.dumps(message)}\n\n".encode())
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    finally:
        orch.hub.detach(worker.worker_id, outbox)
        if orch.long_lived:
            gcpause.connection_closed(opened_at)
    return response


class HeartbeatBody(msgspec.Struct):
    worker_id: b.WorkerId
    status: Literal["idle", "busy"]
    current_job_id: b.JobId | None = None
    job_progress: Any = None
    gpu_utilization: Any = None
    vram_used_gb: Any = None


@routes.post("/api/workers/heartbeat")
async def heartbeat(request: web.Request) -> web.Response:
    orch, worker = request.app[ORCH], authenticate_worker(request)
    body = decode_body(await request.read(), HeartbeatBody)
    _same_worker(worker, body.worker_id)
    if body.status == "idle":
        # The stock worker ignores a job sent while it was busy: an idle worker with a
        # dispatch it never started gets it again.
        for job_id in list(orch.state.node_active.get(worker.worker_id, {})):
            job = orch.state.jobs[job_id]
            if job.pid is None and job.stop_requested is None:
                orch.hub.send(worker.worker_id, orch.hub.run_message(job_id, job.attempt, "sse"))
    return web.json_response({"success": True})


class StatusBody(msgspec.Struct):
    status: Literal["starting", "training", "running", "completed", "failed", "cancelled"]
    progress: Annotated[Any, msgspec.Meta()] = None
    error: b.Detail | None = None


@routes.post("/api/workers/job/{job_id}/status")
async def job_status(request: web.Request) -> web.Response:
    orch, worker = request.app[ORCH], authenticate_worker(request)
    body = decode_body(await request.read(), StatusBody)
    job_id = request.match_info["job_id"]
    job = orch.state.jobs.get(job_id)
    if job is None:
        raise ApiError(404, f"no job {job_id}")
    if job.node != worker.worker_id:
        raise ApiError(403, f"job {job_id} is not this worker's")
    if not job.active:
        raise ApiError(409, f"job {job_id}'s attempt {job.attempt} has already ended "
                            f"({job.status}); it cannot become {body.status}")
    if body.status in ("starting", "training", "running"):
        report = AttemptReport(job_id, job.attempt, "started", node=worker.worker_id)
        await _reported(orch, report)
        return web.json_response({"success": True})
    code = {"completed": 0, "failed": 1, "cancelled": -15}[body.status]
    report = AttemptReport(job_id, job.attempt, "ended", node=worker.worker_id,
                           exit_code=code, detail=body.error or body.status)
    outbox = orch.hub.connections.get(worker.worker_id)
    if outbox is None or outbox.transport != "sse":
        await _reported(orch, report)
        return web.json_response({"success": True})
    with outbox.held():  # its next job goes out once the worker can take it
        await _reported(orch, report)
        reply = web.json_response({"success": True})
        await reply.prepare(request)
        await reply.write_eof()
        await _until_closed(request)
    return reply


async def _reported(orch: Orchestrator, report: AttemptReport) -> None:
    outcome: Outcome = await orch.scheduler.ask(report)
    if outcome.durable is not None:
        await outcome.durable


async def _until_closed(request: web.Request) -> None:
    """Wait until the worker has closed the connection of the report it made.

    The stock worker makes each report with a client of its own, closes it once the reply
    is read, and only then forgets its job: a job sent before would be ignored."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + REPORT_CLOSE_WAIT
    while loop.time() < give_up:
        transport = request.transport
        if transport is None or transport.is_closing():
            await asyncio.sleep(REPORT_SETTLE)  # the few steps from its close to forgetting
            return
        await asyncio.sleep(REPORT_POLL)


class DisconnectBody(msgspec.Struct):
    worker_id: b.WorkerId


@routes.post("/api/workers/disconnect")
async def disconnect(request: web.Request) -> web.Response:
    orch, worker = request.app[ORCH], authenticate_worker(request)
    _same_worker(worker, decode_body(await request.read(), DisconnectBody).worker_id)
    outcome, _ = await orch.registry.ask(WorkerGone(worker.worker_id, "the worker disconnected"))
    if outcome.durable is not None:
        await outcome.durable
    return web.json_response({"success": True})


@routes.get("/api/workers/queue")
async def has_jobs(request: web.Request) -> web.Response:
    orch, worker = request.app[ORCH], authenticate_worker(request)
    _same_worker(worker, request.query.get("worker_id"))
    views = {v.name: v for v in orch.scheduler.node_views()}
    node = views.get(worker.worker_id)
    fits = node is not None and any(
        policy.matches(job.spec, node) and job.spec.gpus <= node.allocatable
        and policy.fits_budget(job.spec, node, orch.clock.now())
        for job in orch.state.with_status("pending"))
    return web.json_response({"has_jobs": fits})
