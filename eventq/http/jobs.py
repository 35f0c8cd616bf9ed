"""``/api/jobs/{id}``: one job and its audit trail, read from the log."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
from aiohttp import web

from eventq import events as ev
from eventq import jobenv
from eventq.http.common import ORCH, ApiError, current_user
from eventq.log import Record
from eventq.redact import redact_body, redact_env

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
    """An event as the API shows it: a job's secret-looking values redacted."""
    body = msgspec.to_builtins(record.event)
    body.pop("type", None)
    return {"seq": record.seq, "time": record.time, "principal": record.principal,
            "type": record.type, "body": redact_body(record.type, body)}


def environment(data_dir: Path, spec: ev.JobSpec) -> dict[str, Any]:
    """A job's declared variables (redacted), its directory, and how many variables the
    submitter exported to a run on this machine (read from its environment file)."""
    if spec.env_sha256 is None:
        return {"env": redact_env(spec.env), "cwd": spec.cwd}
    try:
        kept = jobenv.read(data_dir, spec.env_sha256)
    except jobenv.EnvUnreadable as exc:
        return {"env": None, "cwd": spec.cwd, "env_error": str(exc)}
    return {"env": redact_env(kept.env), "cwd": spec.cwd or kept.cwd,
            "exported_env": len(kept.exported)}


@routes.get("/api/jobs/{job_id}")
async def get_job(request: web.Request) -> web.Response:
    job_id = _own_job(request)
    orch = request.app[ORCH]
    record = orch.queue.job(job_id)
    assert record is not None
    record.update(environment(orch.data_dir, orch.state.jobs[job_id].spec))
    return web.json_response(record)


@routes.get("/api/jobs/{job_id}/events")
async def job_events(request: web.Request) -> web.Response:
    job_id = _own_job(request)
    orch = request.app[ORCH]
    await orch.log.flush()
    records = await orch.log.read(job_id=job_id)
    return web.json_response({"job_id": job_id, "events": [record_dict(r) for r in records]})
