"""One line for each action the server takes, written once the log holds it.

An operator reads these lines (journald, Loki, a file) to answer "what happened at 14:03":
each says what was done, to which job or worker, by whom, where, and how it ended. They are
written from the log's durable records, not from the handlers, so a line stands for what
the log holds, once: nothing a crash lost before its commit, and nothing twice (a start's
replay writes none). Each line's ``event`` is the event's stored type, as ``eventq replay
show --type`` names it, ``seq`` its place in the log, ``by`` who did it, and its time the
event's own.

``Orchestrator.start`` subscribes it after the local node, so writing a commit's lines never
delays the processes it starts. One request that records more than ``BULK`` events of one
kind (a set of 10,000 jobs, ``cancel --all``) gets one line for them, with their count and
first and last job, instead of a line each; the requests a commit groups keep theirs.
"""

from __future__ import annotations

import logging
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from itertools import groupby
from typing import Any, TextIO

from eventq import events as ev
from eventq import serverlog
from eventq.actors.scheduler_state import SchedulerState
from eventq.actors.workers_state import Workers
from eventq.log import Record

#: More events of one kind than this in one commit are told in one line.
BULK = 20
Fields = dict[str, Any]
Describe = Callable[["ActionLog", Any], Fields]
#: Ends of an attempt that an operator should look at.
TROUBLE = frozenset({"timeout", "lost", "start_failed"})


class ActionLog:
    """A durable subscriber of the log that writes one structured line per action."""

    def __init__(self, state: SchedulerState, workers: Workers,
                 stream: TextIO | None = None) -> None:
        self.state, self.workers = state, workers
        self.lines = serverlog.Lines(stream or sys.stderr)
        #: The kinds it reads: every kind at info, only those that may go wrong above it.
        self.reads = frozenset(DESCRIBE) if self.lines.enabled(logging.INFO) else MAY_WARN
        #: (job, attempt) -> (node, GPUs) of each live attempt, for the line of its end
        #: (the job itself may be requeued by then, in the same commit).
        self.placed: dict[tuple[str, int], tuple[str, list[int]]] = {
            (job.spec.job_id, job.attempt): (job.node, list(job.gpus))
            for job in state.jobs.values() if job.active and job.node is not None}
        #: worker id -> name, kept past the worker's removal.
        self.names: dict[str, str] = {w.worker_id: w.name for w in workers.by_id.values()}
        self._stamp = (0.0, serverlog.iso(0.0))

    def on_durable(self, records: Sequence[Record]) -> None:
        if len(records) <= BULK:
            for record in records:
                self._tell(record)
        else:  # a commit of many requests: each request's events apart
            for _, appended in groupby(records, key=lambda r: (r.time, r.principal)):
                self._tell_append(list(appended))
        self.lines.flush()

    def _tell_append(self, records: list[Record]) -> None:
        """The events of one append (one request, one pass): more than BULK of a kind are
        one line for them all."""
        many = Counter(type(r.event) for r in records) if len(records) > BULK else None
        told: set[type] = set()
        for record in records:
            kind = type(record.event)
            if many is None or many[kind] <= BULK:
                self._tell(record)
                continue
            self.place(record.event)
            if kind not in told:
                told.add(kind)
                self._tell_many([r for r in records if type(r.event) is kind])

    def _tell(self, record: Record) -> None:
        fields = DESCRIBE[type(record.event)](self, record.event)
        level = fields.pop("level", "info")
        self.lines.write(level, record.type, self._iso(record.time), seq=record.seq,
                         by=record.principal, **fields)

    def _iso(self, t: float) -> str:
        """The events of one append share their time: format it once."""
        if self._stamp[0] != t:
            self._stamp = (t, serverlog.iso(t))
        return self._stamp[1]

    def place(self, e: ev.Event) -> None:
        """Follow attempts' placements whether or not their lines are written one by one."""
        if isinstance(e, ev.AttemptDispatched):
            self.placed[(e.job_id, e.attempt)] = (e.node, e.gpus)
        elif isinstance(e, ev.AttemptEnded):
            self.placed.pop((e.job_id, e.attempt), None)

    def _tell_many(self, records: list[Record]) -> None:
        jobs = [job_id for r in records if (job_id := ev.event_job_id(r.event))]
        self.lines.write("info", records[0].type, self._iso(records[0].time),
                         count=len(records), seq=records[0].seq, last_seq=records[-1].seq,
                         by=",".join(sorted({r.principal for r in records})),
                         first_job_id=jobs[0] if jobs else None,
                         last_job_id=jobs[-1] if jobs else None)

    # --- what each line holds ----------------------------------------------------------

    def job(self, job_id: str) -> Fields:
        found = self.state.jobs.get(job_id)
        return {"job_id": job_id, "user": found.spec.user if found else None}

    def attempt(self, job_id: str, attempt: int) -> Fields:
        node, gpus = self.placed.get((job_id, attempt), (None, None))
        return {**self.job(job_id), "attempt": attempt, "node": node, "gpus": gpus,
                **self.worker_name(node)}

    def worker_name(self, node: str | None) -> Fields:
        if node is None or node == "local":
            return {}
        worker = self.workers.by_id.get(node)
        if worker is not None:
            self.names[node] = worker.name
        return {"worker": self.names.get(node)}

    def worker(self, worker_id: str) -> Fields:
        return {"worker_id": worker_id, **self.worker_name(worker_id)}


def _submitted(a: ActionLog, e: ev.JobSubmitted) -> Fields:
    job = e.job
    return {"job_id": job.job_id, "user": job.user, "name": job.name, "gpus": job.gpus,
            "target": job.target, "team": job.team}


def _dispatched(a: ActionLog, e: ev.AttemptDispatched) -> Fields:
    a.place(e)
    return a.attempt(e.job_id, e.attempt)


def _started(a: ActionLog, e: ev.AttemptStarted) -> Fields:
    return {**a.attempt(e.job_id, e.attempt), "pid": e.pid, "adopted": e.adopted}


def _ended(a: ActionLog, e: ev.AttemptEnded) -> Fields:
    fields = {**a.attempt(e.job_id, e.attempt), "outcome": e.outcome,
              "exit_code": e.exit_code, "detail": e.detail or None}
    a.place(e)
    trouble = e.outcome in TROUBLE
    return {**fields, "level": "warning"} if trouble else fields


def _stop(a: ActionLog, e: ev.AttemptStopRequested) -> Fields:
    return {**a.attempt(e.job_id, e.attempt), "reason": e.reason}


def _requeued(a: ActionLog, e: ev.JobRequeued) -> Fields:
    return {**a.job(e.job_id), "next_attempt": e.next_attempt, "reason": e.reason}


def _failed(a: ActionLog, e: ev.JobFailed) -> Fields:
    return {**a.job(e.job_id), "reason": e.reason, "level": "warning"}


def _rejected(a: ActionLog, e: ev.JobRejected) -> Fields:
    return {**a.job(e.job_id), "reasons": [f"{r.code}: {r.detail}" for r in e.reasons]}


def _job_only(a: ActionLog, e: ev.Event) -> Fields:
    return a.job(getattr(e, "job_id", ""))


def _blocked(a: ActionLog, e: ev.JobBlocked) -> Fields:
    return {**a.job(e.job_id), "reason": e.reason}


def _priority(a: ActionLog, e: ev.PriorityChanged) -> Fields:
    return {**a.job(e.job_id), "priority_override": e.priority_override}


def _purged(a: ActionLog, e: ev.JobsPurged) -> Fields:
    return {"count": len(e.job_ids), "older_than_days": e.older_than_days}


def _stale(a: ActionLog, e: ev.StaleReportIgnored) -> Fields:
    return {**a.job(e.job_id), "attempt": e.attempt, "current_attempt": e.current_attempt,
            "report": e.report, "level": "warning"}


def _worker_event(a: ActionLog, e: ev.Event) -> Fields:
    return a.worker(ev.event_worker_id(e) or "")


def _worker_created(a: ActionLog, e: ev.WorkerCreated) -> Fields:
    a.names[e.worker_id] = e.name
    return {**a.worker(e.worker_id), "worker_type": e.worker_type, "labels": e.labels}


def _worker_connected(a: ActionLog, e: ev.WorkerConnected) -> Fields:
    return {**a.worker(e.worker_id), "transport": e.transport}


def _worker_lost(a: ActionLog, e: ev.WorkerLost) -> Fields:
    return {**a.worker(e.worker_id), "reason": e.reason, "level": "warning"}


def _rotated(a: ActionLog, e: ev.WorkerTokenRotated) -> Fields:
    return {**a.worker(e.worker_id), "keep_running": e.keep_running}


def _user(a: ActionLog, e: ev.UserCreated | ev.UserUpdated) -> Fields:
    return {"name": e.name, "user_level": str(e.level), "team": e.team}


def _user_deleted(a: ActionLog, e: ev.UserDeleted) -> Fields:
    return {"name": e.name}


def _token(a: ActionLog, e: ev.TokenIssued | ev.TokenRevoked) -> Fields:
    every = isinstance(e, ev.TokenRevoked) and e.token_sha256 is None
    return {"name": e.name, **({"every_token": True} if every else {})}


def _limits(a: ActionLog, e: ev.LimitsChanged) -> Fields:
    return {"limits": {f: getattr(e.limits, f) for f in e.limits.__struct_fields__}}


def _settings(a: ActionLog, e: ev.SettingsChanged) -> Fields:
    return {"approval_cost_threshold": e.approval_cost_threshold}


def _inventory(a: ActionLog, e: ev.NodeInventoryReported) -> Fields:
    return {"node": e.node, "gpus": len(e.gpus), "simulated": e.simulated,
            "nvml_error": e.nvml_error, **a.worker_name(e.node)}


def _server(a: ActionLog, e: ev.ServerStarted) -> Fields:
    return {"pid": e.pid, "version": e.version}


#: Every event an operator's line is written for. Not here: job_reasons_changed (the queue's
#: bookkeeping), gpus_allocated and gpus_released (the dispatch and the end say it).
DESCRIBE: dict[type, Describe] = {
    ev.ServerStarted: _server,
    ev.NodeInventoryReported: _inventory,
    ev.UserCreated: _user,
    ev.UserUpdated: _user,
    ev.UserDeleted: _user_deleted,
    ev.TokenIssued: _token,
    ev.TokenRevoked: _token,
    ev.LimitsChanged: _limits,
    ev.SettingsChanged: _settings,
    ev.WorkerCreated: _worker_created,
    ev.WorkerTokenRotated: _rotated,
    ev.WorkerConnected: _worker_connected,
    ev.WorkerDraining: _worker_event,
    ev.WorkerLost: _worker_lost,
    ev.WorkerRemoved: _worker_event,
    ev.JobSubmitted: _submitted,
    ev.JobReady: _job_only,
    ev.JobRejected: _rejected,
    ev.JobBlocked: _blocked,
    ev.JobApproved: _job_only,
    ev.JobHeld: _job_only,
    ev.JobReleased: _job_only,
    ev.PriorityChanged: _priority,
    ev.JobsPurged: _purged,
    ev.AttemptDispatched: _dispatched,
    ev.AttemptStarted: _started,
    ev.AttemptStopRequested: _stop,
    ev.AttemptEnded: _ended,
    ev.JobRequeued: _requeued,
    ev.JobCompleted: _job_only,
    ev.JobFailed: _failed,
    ev.JobCancelled: _job_only,
    ev.StaleReportIgnored: _stale,
}
#: What may write a warning, and the dispatches whose placement its lines name: all that
#: is read above --log-level info.
MAY_WARN = frozenset({ev.AttemptDispatched, ev.AttemptEnded, ev.JobFailed, ev.WorkerLost,
                      ev.StaleReportIgnored})
