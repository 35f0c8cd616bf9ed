"""``/api/jobs/{id}``: one job and its audit trail, read from the log."""

from __future__ import annotations

from typing import Any

import msgspec
from aiohttp import web

from eventq import events as ev
from eventq.http.app import ORCH, ApiError, current_user
from eventq.log import Record

routes = web.RouteTableDef()


def _own_job(request: web.Request) -> str:
    orch, user = request.app[ORCH], current_user(request)
    job_id = request.match_info["job_id"]
    job = orch.state.jobs.get(job_id)
    if job is None:
        raise ApiError(404, f"no job {job_id}")
    if job.spec.user != user.name and user.level != ev.Level.ADMIN:
        raise ApiError(403, "only the job's owner or an admin may see it")
    return job_id


def record_dict(record: Record) -> dict[str, Any]:
    body = msgspec.to_builtins(record.event)
    body.pop("type", None)
    return {"seq": record.seq, "time": record.time, "principal": record.principal,
            "type": record.type, "body": body}


@routes.get("/api/jobs/{job_id}")
async def get_job(request: web.Request) -> web.Response:
    job_id = _own_job(request)
    return web.json_response(request.app[ORCH].queue.job(job_id))


@routes.get("/api/jobs/{job_id}/events")
async def job_events(request: web.Request) -> web.Response:
    job_id = _own_job(request)
    orch = request.app[ORCH]
    await orch.log.flush()
    records = await orch.log.read(job_id=job_id)
    return web.json_response({"job_id": job_id, "events": [record_dict(r) for r in records]})
