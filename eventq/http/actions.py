"""People acting on queued jobs: cancel, approve, reject, priority, hold, release, and the
admin's process and cleanup (seed 000 routes, SPEC 8 roles)."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from aiohttp import web

from eventq import events as ev
from eventq.actors.scheduler import Cancel, CancelMany, Cleanup, JobAction, Process
from eventq.actors.scheduler_state import JobState
from eventq.http import bounds as b
from eventq.http.common import (
    ORCH,
    ApiError,
    current_user,
    decode_body,
    require_admin,
    require_owner,
)
from eventq.http.queue import int_param, settle
from eventq.server import Orchestrator

routes = web.RouteTableDef()


def _job(request: web.Request) -> JobState:
    job_id = request.match_info["job_id"]
    job = request.app[ORCH].state.jobs.get(job_id)
    if job is None:
        raise ApiError(404, f"no job {job_id}")
    return job


def _reply(orch: Orchestrator, job_id: str, **extra: Any) -> web.Response:
    job = orch.state.jobs[job_id]
    return web.json_response({"success": True, "job_id": job_id, "status": job.status, **extra})


@routes.post("/api/queue/{job_id}/cancel")
async def cancel(request: web.Request) -> web.Response:
    orch, job = request.app[ORCH], _job(request)
    user = require_owner(request, job.spec.user, "cancel it")
    attempt, was_active = job.attempt, job.active
    await settle(await orch.scheduler.ask(Cancel(job.spec.job_id, user.principal)))
    if was_active:
        await orch.node.wait_ended(job.spec.job_id, attempt, orch.grace_seconds + 2)
    return _reply(orch, job.spec.job_id, process_stopped=not job.active, was_running=was_active)


CANCELLABLE = {"pending", "waiting", "blocked", "held", "dispatched", "running"}
#: Seed 000's words: ``pending`` and ``queued`` are every job that waits to start, in the
#: queue (``pending``) or before it (``waiting``: dependencies, a begin time), as in
#: ``GET /api/queue?status=``.
STATUS_WORDS = {"queued": ("pending", "waiting"), "pending": ("pending", "waiting")}
CancelStatus = Annotated[str, msgspec.Meta(extra_json_schema={
    "enum": sorted(CANCELLABLE | STATUS_WORDS.keys())})]


class CancelFilter(msgspec.Struct, forbid_unknown_fields=True):
    """``POST /api/queue/cancel``: every job in these states (yours, or all for an admin)."""

    status: Annotated[list[CancelStatus], msgspec.Meta(max_length=16)] = msgspec.field(
        default_factory=lambda: sorted(CANCELLABLE))
    user: Annotated[str, msgspec.Meta(max_length=64)] | None = None


@routes.post("/api/queue/cancel")
async def cancel_many(request: web.Request) -> web.Response:
    orch, user = request.app[ORCH], current_user(request)
    body = decode_body(await request.read(), CancelFilter)
    wanted = sorted({each for s in body.status for each in STATUS_WORDS.get(s, (s,))})
    if unknown := [s for s in wanted if s not in CANCELLABLE]:
        raise ApiError(422, f"cannot cancel jobs by status {unknown}; use {sorted(CANCELLABLE)}",
                       "status")
    only = body.user
    if user.level != ev.Level.ADMIN:
        if only not in (None, user.name):
            raise ApiError(403, "only admins may cancel other users' jobs", "user")
        only = user.name
    outcome = await orch.scheduler.ask(CancelMany(user.principal, wanted, only))
    await settle(outcome)
    ids = [e.job_id for e in outcome.events if isinstance(e, ev.JobCancelled)]
    return web.json_response({"success": True, "cancelled": len(ids), "job_ids": ids})


async def _act(request: web.Request, action: str, **kw: Any) -> web.Response:
    orch, job = request.app[ORCH], _job(request)
    user = current_user(request)
    await settle(await orch.scheduler.ask(JobAction(job.spec.job_id, user.principal, action,
                                                    **kw)))
    return _reply(orch, job.spec.job_id)


@routes.post("/api/queue/{job_id}/approve")
async def approve(request: web.Request) -> web.Response:
    require_admin(request)
    return await _act(request, "approve")


@routes.post("/api/queue/{job_id}/reject")
async def reject(request: web.Request) -> web.Response:
    require_admin(request)
    reason = request.query.get("reason", "")
    if not reason.strip():  # the submitter is owed the why (SPEC: "reject (with a reason)")
        raise ApiError(422, "a rejection needs a reason: ?reason=...", "reason")
    try:
        reason = msgspec.convert(reason, b.RejectReason).strip()
    except msgspec.ValidationError as e:
        raise ApiError(422, f"reason: {e}", "reason") from None
    return await _act(request, "reject", reason=reason)


class PriorityBody(msgspec.Struct, forbid_unknown_fields=True):
    #: The override; null returns the job to its level's priority.
    priority: Annotated[int, msgspec.Meta(ge=0, le=1000)] | None


@routes.post("/api/queue/{job_id}/priority")
async def priority(request: web.Request) -> web.Response:
    if current_user(request).level not in (ev.Level.ADMIN, ev.Level.LEAD):
        raise ApiError(403, "only leads and admins may override priority")
    body = decode_body(await request.read(), PriorityBody)
    return await _act(request, "priority", priority=body.priority)


@routes.post("/api/queue/{job_id}/hold")
async def hold(request: web.Request) -> web.Response:
    require_owner(request, _job(request).spec.user, "hold it")
    return await _act(request, "hold")


@routes.post("/api/queue/{job_id}/release")
async def release(request: web.Request) -> web.Response:
    require_owner(request, _job(request).spec.user, "release it")
    return await _act(request, "release")


@routes.post("/api/queue/{job_id}/retry")
async def retry(request: web.Request) -> web.Response:
    """Requeue a failed or cancelled job as its next attempt."""
    require_owner(request, _job(request).spec.user, "retry it")
    return await _act(request, "retry")


@routes.post("/api/queue/process")
async def process(request: web.Request) -> web.Response:
    require_admin(request)
    orch = request.app[ORCH]
    before = orch.scheduler.dispatched
    await settle(await orch.scheduler.ask(Process()))
    return web.json_response({"success": True, "dispatched": orch.scheduler.dispatched - before,
                              "queue_depth": orch.state.waiting_count()})


@routes.post("/api/queue/cleanup")
async def cleanup(request: web.Request) -> web.Response:
    user = require_admin(request)
    days = int_param(request, "days", 30, 1, 365)
    outcome = await request.app[ORCH].scheduler.ask(Cleanup(user.principal, days))
    await settle(outcome)
    deleted = sum(len(e.job_ids) for e in outcome.events if isinstance(e, ev.JobsPurged))
    return web.json_response({"success": True, "deleted": deleted, "days": days})

