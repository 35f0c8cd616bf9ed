"""The queue view: job records, positions, reasons and stats for the API and CLI.

It folds its own read model (timestamps, status counts, wait times) from the
event stream and reads the scheduler's ordered index read-only, never through
its mailbox, so a busy dashboard cannot slow dispatch. It is evolved in the same
append step as the actors, so a reply reads its own write.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from eventq import events as ev
from eventq.actors.allocator import GpuTable
from eventq.actors.scheduler import Scheduler
from eventq.actors.scheduler_state import PARKED, TERMINAL, JobState, SchedulerState
from eventq.log import Record
from eventq.policy import (
    ESTIMATE_DEPTH,
    Estimate,
    effective_priority,
    estimate_starts,
    gate_reasons,
)
from eventq.redact import redact_command, redact_value

WAITING = ("pending",)
#: Waiting for dependencies or a begin time, before joining the queue.
GATED = ("waiting",)
RUNNING = ("dispatched", "running")


#: First dispatches whose waits ``avg_wait_seconds`` averages (the latest).
WAITS_KEPT = 1000


@dataclass
class QueueView:
    #: Only what the scheduler's state does not keep: the wait before each first dispatch.
    #: A job's times are the state's (``JobState.queued_at``, ``dispatched_at``,
    #: ``finished_at``), which a retry clears as it should.
    READS: ClassVar[frozenset[type]] = frozenset({ev.AttemptDispatched})
    #: Each event type's step, for the log to call straight (``eventq.log.Fold``).
    STEPS: ClassVar[dict[type, Callable[[QueueView, Any, Record], None]]]

    state: SchedulerState
    gpu_table: GpuTable
    scheduler: Scheduler | None = None
    #: The latest waits from submission to first dispatch: a bounded deque, where a list
    #: cut at each dispatch moved ``WAITS_KEPT`` items every time.
    waits: deque[float] = field(default_factory=lambda: deque(maxlen=WAITS_KEPT))
    #: (head seq, second), how deep the queue was projected, and the estimates so far.
    _estimates: tuple[tuple[int, int], int, dict[str, Estimate]] | None = None
    #: Rendered listings by (head seq, second, query); only the latest few are kept.
    rendered: dict[tuple[Any, ...], bytes] = field(default_factory=dict)

    def remember(self, key: tuple[Any, ...], body: bytes) -> None:
        if len(self.rendered) >= 16:
            self.rendered.clear()
        self.rendered[key] = body

    def evolve(self, record: Record) -> None:
        # By exact type: a whole start passes 400,000 events through here.
        step = QueueView.STEPS.get(type(record.event))
        if step is not None:
            step(self, record.event, record)

    def _dispatched(self, e: ev.AttemptDispatched, record: Record) -> None:
        """Folded after the state (``Orchestrator._assemble``): the job is known."""
        if e.attempt == ev.FIRST_ATTEMPT:
            self.waits.append(record.time - self.state.jobs[e.job_id].queued_at)

    def now(self) -> float:
        assert self.scheduler is not None
        return self.scheduler.clock.now()

    def reasons(self, job: JobState, position: int | None = None) -> list[ev.Reason]:
        """Live reasons of a waiting job, with current details; the recorded ones otherwise."""
        if job.status in GATED:
            unmet = [(d.spec.job_id, "blocked" if d.status in GATED and any(
                r.code == "dependency_failed" for r in d.reasons) else d.status)
                for d in self.state.unmet(job)]
            return gate_reasons(job.spec, unmet, self.now())
        if job.status not in WAITING:
            return list(job.reasons)
        assert self.scheduler is not None
        return self.scheduler.explain(job, position)

    def estimate(self, job_id: str, position: int | None = None) -> Estimate:
        """Estimated start from the allocation timeline; recomputed when the log moves on,
        only as deep as the job's ``position`` (when known) needs: the first page of a
        listing projects about a page of jobs, not ``ESTIMATE_DEPTH``."""
        assert self.scheduler is not None
        if position is not None and position > ESTIMATE_DEPTH:
            return Estimate(None, f"more than {ESTIMATE_DEPTH} jobs ahead")
        now = self.now()
        key = (self.scheduler.log.head_seq, int(now))
        need = ESTIMATE_DEPTH if position is None else position
        cached = self._estimates
        if cached is None or cached[0] != key or cached[1] < need:
            deeper = 2 * cached[1] if cached is not None and cached[0] == key else 0
            depth = min(ESTIMATE_DEPTH, max(need, deeper, 64))
            waiting = (j.spec for j in self.state.iter_waiting(now))
            cached = self._estimates = (key, depth, estimate_starts(
                waiting, self.scheduler.node_views(), now, depth))
        found = cached[2].get(job_id)
        if found is None:
            return Estimate(None, f"more than {ESTIMATE_DEPTH} jobs ahead")
        return found

    def slot_frees(self, job: JobState, codes: set[str]) -> tuple[float, JobState] | None:
        """When every limit holding ``job`` has a free slot, and the job whose end frees the
        last of them: the earliest expected end of a running job counted by each limit, the
        latest of those; None if one is unknown."""
        running = list(self.state.with_status(*RUNNING))
        pools = {"global_limit": running,
                 "user_limit": [j for j in running if j.spec.user == job.spec.user],
                 "team_limit": [j for j in running if j.spec.team == job.spec.team],
                 "local_limit": [j for j in running if j.node == "local"]}
        frees = []
        for code, pool in pools.items():
            if code not in codes:
                continue
            ends = [(j.expected_end, j) for j in pool if j.expected_end is not None]
            if not ends:
                return None
            frees.append(min(ends, key=lambda e: e[0]))
        return max(frees, key=lambda e: e[0]) if frees else None

    def basis(self, holder_id: str, end: float | None, frees: str) -> dict[str, Any] | None:
        """What an estimate rests on: the job whose end frees what the waiting one needs,
        when that end is expected, and by which of its figures (its time limit, else its
        estimated runtime; neither: its end, and so the estimate, is unknown)."""
        holder = self.state.jobs.get(holder_id)
        if holder is None:
            return None
        spec = holder.spec
        by = "time_limit" if spec.max_runtime is not None else \
            "estimated_runtime" if spec.estimated_runtime is not None else None
        return {"kind": "job_ends", "job_id": holder_id, "name": spec.name,
                "status": holder.status, "end": end, "by": by, "frees": frees}

    def job(self, job_id: str, detail: bool = True,
            position: int | None = None) -> dict[str, Any] | None:
        """The API record of a job; ``position`` when the caller already knows it."""
        job = self.state.jobs.get(job_id)
        if job is None:
            return None
        spec = job.spec
        out: dict[str, Any] = {
            "job_id": job_id, "name": spec.name, "user": spec.user, "team": spec.team,
            "status": job.status, "priority": spec.effective_base,
            "effective_priority": effective_priority(spec, job.queued_at, self.now(),
                                                     self.state.limits),
            "gpus": spec.gpus, "allocated_gpus": job.gpus, "node": job.node,
            "target": spec.target, "attempt": job.attempt, "max_attempts": spec.max_attempts,
            "queued_at": job.queued_at, "started_at": job.dispatched_at,
            "completed_at": job.finished_at, "exit_code": job.exit_code, "error": job.error,
            "metadata": redact_value(spec.metadata) if spec.metadata else spec.metadata,
        }
        if job.status in PARKED or job.status in GATED:
            out["reasons"] = [{"code": r.code, "detail": r.detail} for r in self.reasons(job)]
        if spec.depends_on:
            out["depends_on"] = spec.depends_on
        if spec.begin_at is not None:
            out["begin_at"] = spec.begin_at
        if job.status in WAITING:
            out.update(self._waiting(job, position))
        elif job.status in GATED:
            out.update(self._gated(job))
        if detail:
            out["command"] = redact_command(spec.command)
            out["max_runtime"] = spec.max_runtime
            out["estimated_runtime"] = spec.estimated_runtime
            out["recorded_reasons"] = [{"code": r.code, "detail": r.detail} for r in job.reasons]
        return out

    def _waiting(self, job: JobState, position: int | None) -> dict[str, Any]:
        """A waiting job's place, reasons and estimated start, and what the estimate rests on."""
        job_id = job.spec.job_id
        if position is None:
            position = self.state.position(job_id, self.now())
        reasons = [{"code": r.code, "detail": r.detail} for r in self.reasons(job, position)]
        out: dict[str, Any] = {"position": position, "reasons": reasons}
        estimate = self.estimate(job_id, position)
        out["estimated_start"] = estimate.start
        basis = self.basis(estimate.waits_for, estimate.start, "gpus") \
            if estimate.waits_for else None
        if estimate.note:
            out["estimate_note"] = estimate.note
        elif reasons and estimate.start is not None and estimate.start <= self.now():
            # The GPUs are free; a limit holds it: a slot frees when a job in it ends.
            slot = self.slot_frees(job, {r["code"] for r in reasons})
            out["estimated_start"] = None if slot is None else slot[0]
            if slot is None:
                out["estimate_note"] = "as soon as the reasons above clear"
            else:
                basis = self.basis(slot[1].spec.job_id, slot[0], "slot")
        elif estimate.start is not None and not estimate.waits_for:
            basis = {"kind": "gpus_free"}
        if basis is not None:
            out["estimate_basis"] = basis
        return out

    def _gated(self, job: JobState) -> dict[str, Any]:
        """A job that waits only for its begin time: it starts no earlier than that."""
        if job.spec.begin_at is None or self.state.unmet(job):
            return {}
        return {"estimated_start": job.spec.begin_at, "estimate_basis": {"kind": "begin_at"}}

    def list(self, status: str | None = None, limit: int = 50,
             include_completed: bool = False, offset: int = 0) -> list[dict[str, Any]]:
        """Running jobs, then waiting jobs in queue order, then (optionally) finished ones;
        ``offset`` matching jobs are skipped first (pages of a long listing)."""
        wanted = _statuses(status, include_completed)
        out: list[dict[str, Any]] = []
        skip = offset
        groups = [
            (RUNNING, self.state.with_status(*RUNNING)),
            (WAITING, self.state.iter_waiting(self.now())),
            (GATED, self.state.with_status(*GATED)),
            (PARKED, self.state.with_status(*PARKED)),
            (TERMINAL, self.state.with_status(*TERMINAL, newest_first=True)),
        ]
        for statuses, jobs in groups:
            if not wanted.intersection(statuses):
                continue
            for place, job in enumerate(jobs, start=1):
                if len(out) >= limit:
                    return out
                if job.status in wanted:
                    if skip:
                        skip -= 1
                        continue
                    record = self.job(job.spec.job_id, detail=False,
                                      position=place if statuses == WAITING else None)
                    assert record is not None
                    out.append(record)
        return out

    def count(self, status: str | None = None, include_completed: bool = False) -> int:
        """How many jobs ``list`` would give without a limit."""
        wanted = _statuses(status, include_completed)
        return sum(n for s, n in self.state.status_counts().items() if s in wanted)

    def me(self, user: str) -> dict[str, Any]:
        """Seed 000's ``/api/queue/me``: the user's waiting, running and blocked jobs."""
        # The user's jobs from the sorted ids by status and user: not every job's.
        index = self.state.ids_by_user_status
        mine = [self.state.jobs[job_id] for status in (*WAITING, "held", *RUNNING, "blocked")
                for job_id in index.get((status, user), ())]
        mine.sort(key=lambda j: j.order)  # in submission order, as before
        pending = [j for j in mine if j.status in WAITING or j.status == "held"]
        running = [j for j in mine if j.status in RUNNING]
        positions = [p for j in pending
                     if (p := self.state.position(j.spec.job_id, self.now())) is not None]
        return {
            "user": user,
            "pending_count": len(pending), "running_count": len(running),
            "blocked_count": sum(1 for j in mine if j.status == "blocked"),
            "best_position": min(positions, default=None),
            "pending_jobs": [self.job(j.spec.job_id, detail=False) for j in pending],
            "running_jobs": [self.job(j.spec.job_id, detail=False) for j in running],
        }

    def position_of(self, job_id: str) -> dict[str, Any] | None:
        """Seed 000's position, with every reason and the estimated start."""
        record = self.job(job_id, detail=False)
        if record is None:
            return None
        keys = ("job_id", "status", "position", "reasons", "estimated_start", "estimate_note",
                "estimate_basis")
        optional = ("estimate_note", "estimate_basis")
        return {"queue_depth": self.state.waiting_count(),
                **{k: record.get(k) for k in keys if k in record or k not in optional}}

    def stats(self) -> dict[str, Any]:
        limits = self.state.limits
        local = self.local_block()
        return {
            "queue_depth": self.state.waiting_count(),
            "running": self.state.counts.total,
            "max_concurrent": limits.max_concurrent,
            "user_max_concurrent": limits.user_max_concurrent,
            "team_max_concurrent": limits.team_max_concurrent,
            "enable_fair_share": limits.enable_fair_share,
            "local_gpu_max_concurrent": limits.local_gpu_max_concurrent,
            "local_job_max_concurrent": limits.local_job_max_concurrent,
            "avg_wait_seconds": round(sum(self.waits) / len(self.waits), 3) if self.waits else 0.0,
            "by_status": self.state.status_counts(),
            "by_user": dict(+self.state.open_by_user),
            "local": local,
        }

    def local_block(self) -> dict[str, Any]:
        node = self.gpu_table.nodes.get("local")
        limits = self.state.limits
        allocated = sorted(node.held) if node else []
        available = sorted(self.gpu_table.free("local")) if node else []
        pending_local = self.state.waiting_local
        return {
            "running_jobs": self.state.counts.local_jobs, "pending_jobs": pending_local,
            "allocated_gpus": allocated, "available_gpus": available,
            "total_gpus": len(node.gpus) if node else 0,
            "simulated": node.simulated if node else False,
            "max_concurrent_gpus": limits.local_gpu_max_concurrent,
            "max_concurrent_jobs": limits.local_job_max_concurrent,
        }


STATUS_WORDS: dict[str, tuple[str, ...]] = {
    "queued": WAITING + GATED, "pending": WAITING + GATED, "waiting": GATED,
    "ready": WAITING, "running": RUNNING,
    "dispatched": ("dispatched",), "blocked": ("blocked",), "held": ("held",),
    **{t: (t,) for t in TERMINAL},
}


QueueView.STEPS = {ev.AttemptDispatched: QueueView._dispatched}


class UnknownStatus(ValueError):
    pass


def _statuses(status: str | None, include_completed: bool) -> set[str]:
    """API status words (seed 000: ``queued``/``pending`` mean waiting) to internal ones."""
    if status is None:
        return {*RUNNING, *WAITING, *GATED, *PARKED, *(TERMINAL if include_completed else ())}
    wanted: set[str] = set()
    for word in status.split(","):
        if word not in STATUS_WORDS:
            raise UnknownStatus(f"unknown status {word!r}; use one of {sorted(STATUS_WORDS)}")
        wanted.update(STATUS_WORDS[word])
    return wanted
