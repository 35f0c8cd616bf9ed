"""The past, for the web page: the state at any event (``GET /api/replay/state``), the GPUs
over time (``GET /api/gpus/timeline``) and a job's reasons over time
(``GET /api/jobs/{job_id}/reasons``).

The state at a seq is the latest snapshot of ``projections/history.py`` at or before it
with the events after it folded in, read from the log (never a fold from seq 1); the
timeline is that model's record of every hold on GPUs; a job's reasons are folded from its
own events, read by the log's by-job index.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from aiohttp import web

from eventq import events as ev
from eventq.actors.scheduler_state import PARKED, submitted_reasons
from eventq.http.bounds import LAST_EPOCH
from eventq.http.common import ORCH, ApiError, require_owner
from eventq.http.queue import int_param
from eventq.http.stream import LAST_SEQ
from eventq.log import Record
from eventq.policy import effective_priority
from eventq.projections.history import Bar, Frame, JobRow
from eventq.projections.queue import GATED, RUNNING, WAITING
from eventq.redact import redact_text
from eventq.server import Orchestrator

routes = web.RouteTableDef()

#: Rows of the log read at a time while folding the events after a snapshot.
TAIL_PAGE = 2000
_NUMBER = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?")


def epoch_param(request: web.Request, name: str) -> float | None:
    """An epoch time in seconds, spelled as JSON spells a number."""
    raw = request.query.get(name)
    if raw is None:
        return None
    value = float(raw) if _NUMBER.fullmatch(raw) else None
    if value is None or not 0 <= value <= LAST_EPOCH:
        raise ApiError(422, f"{name} must be epoch seconds between 0 and {LAST_EPOCH:.0f}", name)
    return value


# --- the state at an event -------------------------------------------------------------------


async def state_at(orch: Orchestrator, at: int, at_time: float | None) -> Frame:
    """The frame right after ``at``, or, with ``at_time``, right before the first event
    later than it (as ``eventq.replay.fold`` stops)."""
    history = orch.history
    if at >= history.seq and (at_time is None or at_time >= history.high):
        return history.now()
    frame = history.base_for(at, at_time)
    if frame.seq >= at:
        return frame
    await orch.log.flush()  # the events after the snapshot are read from the file
    while frame.seq < at:
        page = await orch.log.read(from_seq=frame.seq + 1, to_seq=at, limit=TAIL_PAGE)
        if not page or not history.fold_tail(frame, page, at_time):
            break
    return frame


def reasons_of(row: JobRow) -> list[dict[str, str]]:
    return [{"code": r.code, "detail": r.detail} for r in row.reasons]


def job_row(row: JobRow, frame: Frame, position: int | None = None) -> dict[str, Any]:
    """A job as ``GET /api/queue`` lists it, as it was at the frame."""
    spec = row.spec
    out: dict[str, Any] = {
        "job_id": spec.job_id, "name": spec.name, "user": spec.user, "team": spec.team,
        "status": row.status, "priority": spec.effective_base,
        "effective_priority": effective_priority(spec, row.queued_at, frame.time,
                                                 frame.limits),
        "gpus": spec.gpus, "allocated_gpus": list(row.gpus), "node": row.node,
        "target": spec.target, "attempt": row.attempt, "max_attempts": spec.max_attempts,
        "queued_at": row.queued_at, "started_at": row.started_at,
        "completed_at": row.finished_at, "exit_code": row.exit_code, "error": row.error,
        "reasons": reasons_of(row)}
    if position is not None:
        out["position"] = position
    return out


def open_rows(frame: Frame) -> list[dict[str, Any]]:
    """Running jobs, waiting jobs in queue order (with their place), then those waiting
    for dependencies or a begin time, then blocked and held ones: ``/api/queue``'s groups.
    Within a group other than the waiting, by status in the group's order, then as they
    were submitted: one order whether a snapshot or the live folds built the frame."""
    rows = frame.jobs.values()
    waiting = sorted((r for r in rows if r.status in WAITING), key=lambda r: (
        -effective_priority(r.spec, r.queued_at, frame.time, frame.limits), r.order))
    out = [job_row(r, frame) for r in _in_order(rows, RUNNING)]
    out += [job_row(r, frame, place) for place, r in enumerate(waiting, start=1)]
    for statuses in (GATED, PARKED):
        out += [job_row(r, frame) for r in _in_order(rows, statuses)]
    return out


def _in_order(rows: Iterable[JobRow], statuses: tuple[str, ...]) -> list[JobRow]:
    return sorted((r for r in rows if r.status in statuses),
                  key=lambda r: (statuses.index(r.status), r.order))


def gpu_rows(frame: Frame) -> list[dict[str, Any]]:
    out = []
    for node, row in sorted(frame.nodes.items()):
        for index in sorted({*row.gpus, *row.held}):
            holder = row.held.get(index)
            out.append({"node": node, "index": index,
                        "job_id": holder[0] if holder else None,
                        "attempt": holder[1] if holder else None})
    return out


def worker_status(frame: Frame, worker_id: str) -> str:
    """As ``Workers.status`` says it."""
    worker = frame.workers[worker_id]
    if not worker.online and worker.offline_reason:
        return "offline"
    if worker.draining:
        return "draining"
    if not worker.online:
        return "connecting"
    return "busy" if frame.active_on(worker_id) else "idle"


@routes.get("/api/replay/state")
async def replay_state(request: web.Request) -> web.Response:
    orch = request.app[ORCH]
    head = orch.log.head_seq
    at = int_param(request, "at", head, 0, LAST_SEQ)
    at_time = epoch_param(request, "time")
    finished = int_param(request, "finished", 50, 0, 10_000)
    if at > head:
        raise ApiError(404, f"no event {at} yet: the log's last is {head}", "at")
    state = await state_at(orch, at, at_time)
    done = orch.history.finished.newest(state.seq, state.jobs, finished)
    return web.json_response({
        "seq": state.seq, "time": state.time if state.seq else None, "head_seq": head,
        "jobs": open_rows(state) + [job_row(r, state) for r in done],
        "gpus": gpu_rows(state),
        "workers": [{"worker_id": w, "name": state.workers[w].name,
                     "status": worker_status(state, w)} for w in sorted(state.workers)]})


# --- the GPUs over time ----------------------------------------------------------------------


def bar_dict(bar: Bar) -> dict[str, Any]:
    return {"job_id": bar.job_id, "attempt": bar.attempt, "user": bar.user,
            "priority": bar.priority, "node": bar.node, "gpus": list(bar.gpus),
            "start": bar.start, "end": bar.end, "status": bar.status}


def lanes(orch: Orchestrator, bars: Iterable[Bar]) -> list[dict[str, Any]]:
    """Every GPU of every node known now, and any other a bar shows; local first."""
    found = {(node, gpu) for node, row in orch.gpu_table.nodes.items() for gpu in row.gpus}
    found |= {(bar.node, gpu) for bar in bars for gpu in bar.gpus}
    ordered = sorted(found, key=lambda lane: (lane[0] != "local", lane[0], lane[1]))
    return [{"node": node, "gpu": gpu} for node, gpu in ordered]


@routes.get("/api/gpus/timeline")
async def gpu_timeline(request: web.Request) -> web.Response:
    orch = request.app[ORCH]
    now = orch.clock.now()
    until = epoch_param(request, "until")
    until = now if until is None else until
    since = epoch_param(request, "since")
    since = until - 3600.0 if since is None else since
    limit = int_param(request, "limit", 10_000, 1, 100_000)
    bars = orch.history.bars.between(since, until) if since <= until else []
    shown = bars[-limit:]
    return web.json_response({"now": now, "since": since, "until": until,
                              "lanes": lanes(orch, shown), "bars": [bar_dict(b) for b in shown],
                              "truncated": len(shown) < len(bars)})


# --- a job's reasons over time ----------------------------------------------------------------

#: Events after which a job waits on nothing recorded: back in the queue, placed, or ended.
_CLEARS = (ev.JobApproved, ev.JobReleased, ev.JobReady, ev.AttemptDispatched, ev.JobRequeued,
           ev.JobCompleted, ev.JobFailed, ev.JobCancelled, ev.JobRejected)


def reasons_after(record: Record) -> tuple[ev.Reason, ...] | None:
    """The job's reasons once ``record`` is applied; None if it does not change them."""
    e = record.event
    if isinstance(e, ev.JobSubmitted):
        return submitted_reasons(e)
    if isinstance(e, ev.JobReasonsChanged):
        return tuple(e.reasons)
    if isinstance(e, ev.JobBlocked):
        return (ev.Reason("approval", e.reason),)
    if isinstance(e, ev.JobHeld):
        return (ev.Reason("held", "held until released"),)
    if isinstance(e, _CLEARS):
        return ()
    return None


def reason_history(records: Iterable[Record]) -> list[dict[str, Any]]:
    """Each set of reasons the job had, from the event that set it to the one that
    changed it (``until`` null: it still holds)."""
    out: list[dict[str, Any]] = []
    current: tuple[ev.Reason, ...] = ()
    for r in records:
        reasons = reasons_after(r)
        if reasons is None or reasons == current:
            continue
        if current:
            out[-1].update(until=r.time, until_seq=r.seq, until_event=r.type)
        current = reasons
        if reasons:
            out.append({
                "codes": [x.code for x in reasons],
                "detail": "; ".join(redact_text(x.detail) for x in reasons),
                "reasons": [{"code": x.code, "detail": redact_text(x.detail)} for x in reasons],
                "from": r.time, "until": None, "seq": r.seq, "event": r.type,
                "until_seq": None, "until_event": None})
    return out


@routes.get("/api/jobs/{job_id}/reasons")
async def job_reasons(request: web.Request) -> web.Response:
    orch, job_id = request.app[ORCH], request.match_info["job_id"]
    job = orch.state.jobs.get(job_id)
    if job is None:
        raise ApiError(404, f"no job {job_id}")
    require_owner(request, job.spec.user, "see it")
    await orch.log.flush()
    records = await orch.log.read(job_id=job_id, limit=1_000_000)
    return web.json_response({"job_id": job_id, "history": reason_history(records)})
