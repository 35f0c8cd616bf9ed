"""The past: the queue, GPUs and workers as they were right after any event, and which
attempt held which GPU when.

A ``Frame`` is the state right after one event: the jobs not yet finished (one frozen row
each), every node's GPUs and their holders, the workers, the limits. ``History`` takes one
every ``every`` events (at least as many as there are open jobs, so that snapshots share
most rows) from the live read models, which have folded that event already, and keeps it as
a snapshot. A snapshot copies the last one's rows (one dict copy, in C) and builds rows
only for the jobs the events since then named, so the append that takes it waits for that
copy (60-90 ms at a million open jobs), not for a row per open job (1.5 s); a start's
replay, which names more ended jobs than there are open ones, builds a row per open job
instead, whichever is fewer. The state at seq S is the last snapshot at or before S with the
events after it folded in by ``fold_step``, a light fold of its own, from the log: a few
thousand events at most, however long the log. Finished jobs are not copied into
snapshots: each is recorded once, as it ends, in ``finished``, which a question reads back
from S. Snapshots are thinned past ``keep`` of them (or ``rows`` job rows in all): every
other one goes and the spacing doubles, so memory stays bounded.

What promises this keeps: a snapshot is what the scheduler, the allocator and the registry
held at its seq, and ``fold_step`` changes a frame as their folds change them, field by
field; ``tests/test_history.py`` checks both at every event of real logs against
``eventq.replay.fold``.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgspec

from eventq import events as ev
from eventq.actors.allocator import GpuTable
from eventq.actors.scheduler_state import (
    ACTIVE,
    PARKED,
    JobState,
    SchedulerState,
    is_gated,
    submitted_reasons,
)
from eventq.actors.workers_state import Workers
from eventq.log import Record

#: Events a snapshot is taken after at the least.
EVERY = 4096
#: Snapshots kept at most; past it every other one is dropped.
KEEP = 512
#: Job rows held by all snapshots together at most (a long queue makes them large).
ROWS = 500_000
#: The statuses of a job that has not ended.
OPEN = ("waiting", "pending", *ACTIVE, *PARKED)
_OPEN = frozenset(OPEN)


class JobRow(msgspec.Struct, frozen=True, gc=False):
    """One job as it was: replaced on every change, so a snapshot can share it."""

    spec: ev.JobSpec
    #: Its submission's seq: queue order within a priority.
    order: int
    status: str
    queued_at: float
    attempt: int = 0
    #: An attempt is alive (dispatched or running, also while a cancel takes effect).
    active: bool = False
    node: str | None = None
    gpus: tuple[int, ...] = ()
    reasons: tuple[ev.Reason, ...] = ()
    started_at: float | None = None
    finished_at: float | None = None
    exit_code: int | None = None
    error: str | None = None


class NodeRow(msgspec.Struct, frozen=True, gc=False):
    """A node's GPUs and who holds each: (job, attempt) by GPU index."""

    gpus: tuple[int, ...]
    held: dict[int, tuple[str, int]]


class WorkerRow(msgspec.Struct, frozen=True, gc=False):
    name: str
    online: bool = False
    draining: bool = False
    offline_reason: str | None = None


_replace = msgspec.structs.replace


@dataclass
class Finished:
    """Every job as it ended, in seq order: appended once per end, never copied."""

    seqs: list[int] = field(default_factory=list)
    rows: list[JobRow] = field(default_factory=list)
    #: job id -> the seq of the purge that removed it from the read models.
    purged: dict[str, int] = field(default_factory=dict)

    def add(self, seq: int, row: JobRow) -> None:
        self.seqs.append(seq)
        self.rows.append(row)

    def last_before(self, job_id: str, seq: int) -> JobRow | None:
        """The job's row as it last ended before ``seq`` (a retry takes it back)."""
        for i in range(bisect.bisect_left(self.seqs, seq) - 1, -1, -1):
            if self.rows[i].spec.job_id == job_id:
                return self.rows[i]
        return None

    def newest(self, at: int, skip: Iterable[str], most: int) -> list[JobRow]:
        """Up to ``most`` jobs finished at ``at``, the latest first: each once, as it last
        ended by then, unless it is open again (``skip``) or purged by then."""
        seen, out = set(skip), list[JobRow]()
        for i in range(bisect.bisect_right(self.seqs, at) - 1, -1, -1):
            if len(out) >= most:
                break
            row = self.rows[i]
            job_id = row.spec.job_id
            purged = self.purged.get(job_id)
            if job_id in seen or (purged is not None and purged <= at):
                continue
            seen.add(job_id)
            out.append(row)
        return out


@dataclass
class Frame:
    """The state right after ``seq``: open jobs, nodes, workers, limits."""

    seq: int = 0
    time: float = 0.0
    #: The latest event time up to ``seq`` (times may step back with the wall clock).
    high: float = 0.0
    #: Open jobs by id. No reader relies on their order: ``History.now`` lists them by
    #: status, a snapshot and a fold keep each row's place and add new ones last;
    #: ``http/history.py`` sorts them.
    jobs: dict[str, JobRow] = field(default_factory=dict)
    nodes: dict[str, NodeRow] = field(default_factory=dict)
    workers: dict[str, WorkerRow] = field(default_factory=dict)
    limits: ev.Limits = field(default_factory=ev.Limits)

    def copy(self) -> Frame:
        return Frame(self.seq, self.time, self.high, dict(self.jobs), dict(self.nodes),
                     dict(self.workers), self.limits)

    def active_on(self, node: str) -> int:
        return sum(1 for row in self.jobs.values() if row.active and row.node == node)


#: What a fold does with a job that ends, or one that comes back from its end.
@dataclass
class Ends:
    finished: Finished
    #: Live: the fold records ends (``Finished.add``); a tail fold reads them only.
    record: bool


Step = Callable[[Frame, Any, Record, Ends], None]


def _job(frame: Frame, job_id: str) -> JobRow | None:
    return frame.jobs.get(job_id)


def _set(frame: Frame, job_id: str, **changes: Any) -> None:
    row = frame.jobs.get(job_id)
    if row is not None:
        frame.jobs[job_id] = _replace(row, **changes)


def _end(frame: Frame, job_id: str, r: Record, ends: Ends, **changes: Any) -> None:
    row = frame.jobs.pop(job_id, None)
    if row is not None and ends.record:
        ends.finished.add(r.seq, _replace(row, finished_at=r.time, **changes))


def _submitted(frame: Frame, e: ev.JobSubmitted, r: Record, ends: Ends) -> None:
    spec = e.job
    frame.jobs[spec.job_id] = JobRow(spec, r.seq, "waiting" if is_gated(spec) else "pending",
                                     r.time, reasons=submitted_reasons(e))


def _back(frame: Frame, e: ev.JobApproved | ev.JobReleased | ev.JobReady, r: Record,
          ends: Ends) -> None:
    row = frame.jobs.get(e.job_id)
    if row is None:
        return
    gated = isinstance(e, ev.JobApproved) and is_gated(row.spec)
    frame.jobs[e.job_id] = _replace(row, status="waiting" if gated else "pending", reasons=())


def _parked(frame: Frame, e: ev.JobBlocked | ev.JobHeld, r: Record, ends: Ends) -> None:
    reason = ev.Reason("approval", e.reason) if isinstance(e, ev.JobBlocked) else \
        ev.Reason("held", f"held since seq {r.seq}")
    _set(frame, e.job_id, status="blocked" if isinstance(e, ev.JobBlocked) else "held",
         reasons=(reason,))


def _priority(frame: Frame, e: ev.PriorityChanged, r: Record, ends: Ends) -> None:
    row = frame.jobs.get(e.job_id)
    if row is not None:
        spec = _replace(row.spec, priority_override=e.priority_override)
        frame.jobs[e.job_id] = _replace(row, spec=spec)


def _reasons(frame: Frame, e: ev.JobReasonsChanged, r: Record, ends: Ends) -> None:
    _set(frame, e.job_id, reasons=tuple(e.reasons))


def _dispatched(frame: Frame, e: ev.AttemptDispatched, r: Record, ends: Ends) -> None:
    _set(frame, e.job_id, status="dispatched", attempt=e.attempt, active=True, node=e.node,
         gpus=tuple(e.gpus), reasons=(), started_at=r.time, exit_code=None)


def _started(frame: Frame, e: ev.AttemptStarted, r: Record, ends: Ends) -> None:
    row = frame.jobs.get(e.job_id)
    if row is not None and row.status == "dispatched":
        frame.jobs[e.job_id] = _replace(row, status="running")


def _attempt_ended(frame: Frame, e: ev.AttemptEnded, r: Record, ends: Ends) -> None:
    _set(frame, e.job_id, active=False, exit_code=e.exit_code)


def _requeued(frame: Frame, e: ev.JobRequeued, r: Record, ends: Ends) -> None:
    row = frame.jobs.get(e.job_id) or ends.finished.last_before(e.job_id, r.seq)
    if row is not None:  # a retry brings a finished job back
        frame.jobs[e.job_id] = _replace(row, status="pending", node=None, gpus=(),
                                        error=e.reason, finished_at=None)


def _rejected(frame: Frame, e: ev.JobRejected, r: Record, ends: Ends) -> None:
    _end(frame, e.job_id, r, ends, status="rejected", reasons=tuple(e.reasons))


def _completed(frame: Frame, e: ev.JobCompleted, r: Record, ends: Ends) -> None:
    _end(frame, e.job_id, r, ends, status="completed")


def _failed(frame: Frame, e: ev.JobFailed, r: Record, ends: Ends) -> None:
    _end(frame, e.job_id, r, ends, status="failed", error=e.reason)


def _cancelled(frame: Frame, e: ev.JobCancelled, r: Record, ends: Ends) -> None:
    _end(frame, e.job_id, r, ends, status="cancelled")


def _purged(frame: Frame, e: ev.JobsPurged, r: Record, ends: Ends) -> None:
    if ends.record:
        for job_id in e.job_ids:
            ends.finished.purged[job_id] = r.seq


def _inventory(frame: Frame, e: ev.NodeInventoryReported, r: Record, ends: Ends) -> None:
    old = frame.nodes.get(e.node)
    frame.nodes[e.node] = NodeRow(tuple(sorted(g.index for g in e.gpus)),
                                  old.held if old else {})


def _allocated(frame: Frame, e: ev.GpusAllocated, r: Record, ends: Ends) -> None:
    node = frame.nodes.get(e.node) or NodeRow((), {})
    held = dict(node.held)
    for gpu in e.gpus:
        held[gpu] = (e.job_id, e.attempt)
    frame.nodes[e.node] = NodeRow(node.gpus, held)


def _released(frame: Frame, e: ev.GpusReleased, r: Record, ends: Ends) -> None:
    node = frame.nodes.get(e.node)
    if node is None:
        return
    held = {gpu: h for gpu, h in node.held.items()
            if not (gpu in e.gpus and h == (e.job_id, e.attempt))}
    frame.nodes[e.node] = NodeRow(node.gpus, held)


def _limits(frame: Frame, e: ev.LimitsChanged, r: Record, ends: Ends) -> None:
    frame.limits = e.limits


def _worker(frame: Frame, e: ev.Event, r: Record, ends: Ends) -> None:
    if isinstance(e, ev.WorkerCreated):
        frame.workers[e.worker_id] = WorkerRow(e.name)
        return
    worker_id = ev.event_worker_id(e) or ""
    row = frame.workers.get(worker_id)
    if row is None:
        return
    if isinstance(e, ev.WorkerConnected):
        frame.workers[worker_id] = _replace(row, online=True, offline_reason=None)
    elif isinstance(e, ev.WorkerDraining):
        frame.workers[worker_id] = _replace(row, draining=True)
    elif isinstance(e, ev.WorkerLost):
        frame.workers[worker_id] = _replace(row, online=False, offline_reason=e.reason)
    elif isinstance(e, ev.WorkerRemoved):
        del frame.workers[worker_id]
        frame.nodes.pop(worker_id, None)


STEPS: dict[type, Step] = {
    ev.JobSubmitted: _submitted, ev.JobReady: _back, ev.JobApproved: _back,
    ev.JobReleased: _back, ev.JobBlocked: _parked, ev.JobHeld: _parked,
    ev.PriorityChanged: _priority, ev.JobReasonsChanged: _reasons,
    ev.AttemptDispatched: _dispatched, ev.AttemptStarted: _started,
    ev.AttemptEnded: _attempt_ended, ev.JobRequeued: _requeued, ev.JobRejected: _rejected,
    ev.JobCompleted: _completed, ev.JobFailed: _failed, ev.JobCancelled: _cancelled,
    ev.JobsPurged: _purged, ev.NodeInventoryReported: _inventory,
    ev.GpusAllocated: _allocated, ev.GpusReleased: _released, ev.LimitsChanged: _limits,
    ev.WorkerCreated: _worker, ev.WorkerConnected: _worker, ev.WorkerDraining: _worker,
    ev.WorkerLost: _worker, ev.WorkerRemoved: _worker,
}


def fold_step(frame: Frame, record: Record, ends: Ends) -> None:
    """One event into ``frame``; the frame moves to its seq whatever its type."""
    step = STEPS.get(type(record.event))
    if step is not None:
        step(frame, record.event, record, ends)
    frame.seq = record.seq
    frame.time = t = record.time
    if t > frame.high:
        frame.high = t


# --- the GPUs over time --------------------------------------------------------------------

#: What became of an attempt that held GPUs (``running`` while it holds them).
Outcome = str


class Bar(msgspec.Struct, gc=False):
    """One attempt's hold on a node's GPUs, from allocation to release (``end`` and
    ``status`` are set as it ends)."""

    job_id: str
    attempt: int
    user: str
    priority: int
    node: str
    gpus: tuple[int, ...]
    start: float
    end: float | None = None
    status: Outcome = "running"


def outcome(e: ev.AttemptEnded) -> Outcome:
    if e.outcome == "exited":
        return "completed" if e.exit_code == 0 else "failed"
    return e.outcome


@dataclass
class Bars:
    """Every hold on GPUs, in the order they began; the open ones by (job, attempt): an
    attempt holds GPUs of one node."""

    bars: list[Bar] = field(default_factory=list)
    starts: list[float] = field(default_factory=list)
    open: dict[tuple[str, int], Bar] = field(default_factory=dict)
    #: The longest hold that has ended: a query for a window looks back this far.
    longest: float = 0.0

    def allocated(self, e: ev.GpusAllocated, r: Record, spec: ev.JobSpec | None) -> None:
        user, priority = (spec.user, spec.effective_base) if spec is not None else ("", 0)
        bar = Bar(e.job_id, e.attempt, user, priority, e.node, tuple(e.gpus), r.time)
        start = r.time
        if self.starts and self.starts[-1] > start:  # kept sorted if the wall clock steps back
            start = self.starts[-1]
        self.bars.append(bar)
        self.starts.append(start)
        self.open[(e.job_id, e.attempt)] = bar

    def ended(self, e: ev.AttemptEnded) -> None:
        bar = self.open.get((e.job_id, e.attempt))
        if bar is not None:
            bar.status = outcome(e)

    def released(self, e: ev.GpusReleased, r: Record) -> None:
        bar = self.open.pop((e.job_id, e.attempt), None)
        if bar is None:
            return
        bar.end = max(r.time, bar.start)
        if e.reason == "orphaned" and bar.status == "running":
            bar.status = "orphaned"
        self.longest = max(self.longest, bar.end - bar.start)

    def between(self, since: float, until: float) -> list[Bar]:
        """Holds that overlap [since, until], in the order they began."""
        hi = bisect.bisect_right(self.starts, until)
        lo = bisect.bisect_left(self.starts, since - self.longest)
        out = [b for b in self.bars[lo:hi] if b.end is None or b.end >= since]
        seen = {id(b) for b in out}
        early = [b for b in self.open.values()
                 if id(b) not in seen and b.start <= until]
        return sorted(early, key=lambda b: b.start) + out


# --- the live model ------------------------------------------------------------------------


def row_of(job: JobState) -> JobRow:
    """A job as the scheduler holds it, as the history's fold would have it."""
    return JobRow(job.spec, job.order, job.status, job.queued_at, job.attempt, job.active,
                  job.node, job.gpus, job.reasons, job.dispatched_at, job.finished_at,
                  job.exit_code, job.error)


@dataclass
class History:
    """Snapshots of the live read models every ``every`` events, every finished job and
    every hold on GPUs.

    The scheduler's, the allocator's and the registry's folds already hold the state at
    every event: a snapshot is their projection, taken after they have folded the event
    (``History`` is subscribed after them). So the append path pays for a time, a seq, the
    id of the job an event changes and, for a few event types, a row or a bar; the light
    fold (``fold_step``) runs only when a question needs the events after a snapshot.

    A snapshot rebuilds only the rows of the jobs in ``changed`` (or of every open job,
    where those are fewer). That holds because a ``JobState`` (all ``row_of`` reads) is
    written by ``SchedulerState.evolve`` alone, and each event it folds changes at most the
    jobs it names: ``JobSubmitted`` its
    ``job.job_id``, ``JobsPurged`` its ``job_ids``, every other job event its ``job_id``;
    ``LimitsChanged`` and ``SettingsChanged`` change no job (``_step_for``,
    ``tests/test_history.py`` fails on a new event type the scheduler folds that is none
    of these).
    """

    #: Every event moves it to its seq and time, even one it does nothing else with.
    READS: ClassVar[frozenset[type]] = frozenset(ev.EVENT_TYPES.values())
    #: Each event type's step, for the log to call straight (``eventq.log.Fold``).
    STEPS: ClassVar[dict[type, Callable[[History, Any, Record], None]]]

    state: SchedulerState
    gpus: GpuTable
    workers: Workers
    every: int = EVERY
    keep: int = KEEP
    rows: int = ROWS
    finished: Finished = field(default_factory=Finished)
    bars: Bars = field(default_factory=Bars)
    #: Snapshots in seq order, with their seqs and ``high`` times (both ascending).
    snapshots: list[Frame] = field(default_factory=list)
    snapshot_seqs: list[int] = field(default_factory=list)
    snapshot_highs: list[float] = field(default_factory=list)
    #: The seq from which the next snapshot is taken.
    next_snapshot: int = 0
    seq: int = 0
    time: float = 0.0
    #: The latest event time so far (times may step back with the wall clock).
    high: float = 0.0
    #: Jobs whose row may differ from the last snapshot's, in the order first named (a dict,
    #: so that a snapshot adds new jobs in a fixed order, as a fold from it would).
    changed: dict[str, None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.snapshots.append(Frame())
        self.snapshot_seqs.append(0)
        self.snapshot_highs.append(0.0)
        self.next_snapshot = self.every
        self.changed = dict.fromkeys(self.state.jobs)  # a state folded before: in no snapshot

    def evolve(self, record: Record) -> None:
        """One event, live: on the append path, so it does as little as it can."""
        History.STEPS.get(type(record.event), History._moved)(self, record.event, record)

    def _moved(self, e: ev.Event, record: Record) -> None:
        """Every event, after what its type records: the history is at its seq and time,
        and a snapshot is taken when one is due."""
        self.seq = seq = record.seq
        self.time = t = record.time
        if t > self.high:
            self.high = t
        if seq >= self.next_snapshot:
            self._snapshot()

    def now(self) -> Frame:
        """The state at the latest event, from the live read models: a row per open job."""
        return self._frame(self._open_rows())

    def _open_rows(self) -> dict[str, JobRow]:
        state = self.state
        return {job_id: row_of(state.jobs[job_id])
                for status in OPEN for job_id in state.by_status.get(status, ())}

    def _frame(self, jobs: dict[str, JobRow]) -> Frame:
        """``jobs`` with the nodes, workers and limits as they are now (a few of each)."""
        nodes = {name: NodeRow(tuple(sorted(n.gpus)), dict(n.held))
                 for name, n in self.gpus.nodes.items()}
        workers = {w.worker_id: WorkerRow(w.name, w.online, w.draining, w.offline_reason)
                   for w in self.workers.by_id.values()}
        return Frame(self.seq, self.time, self.high, jobs, nodes, workers, self.state.limits)

    def _snapshot(self) -> None:
        last, state = self.snapshots[-1].jobs, self.state
        # Whichever builds fewer rows: a start's log names many jobs between snapshots
        # that have ended since (most of a million events are ended jobs'), the live path
        # a few among many open ones.
        open_jobs = sum(len(state.by_status.get(status, ())) for status in OPEN)
        jobs = self._jobs_since(last) if len(self.changed) < open_jobs else self._open_jobs(last)
        self.changed = {}
        frame = self._frame(jobs)
        self.snapshots.append(frame)
        self.snapshot_seqs.append(frame.seq)
        self.snapshot_highs.append(frame.high)
        if len(self.snapshots) > self.keep or \
                sum(len(f.jobs) for f in self.snapshots) > self.rows:
            self._thin()
        # The spacing bounds the rows all snapshots hold (a new one shares the unchanged
        # rows, yet its dict holds an entry per open job); the stall no longer grows with
        # it: a snapshot builds rows only for the jobs named since the last one, or fewer.
        self.next_snapshot = frame.seq + max(self.every, len(frame.jobs))

    def _jobs_since(self, last: dict[str, JobRow]) -> dict[str, JobRow]:
        """``last`` with the jobs named since it changed as the scheduler holds them now:
        an open one's row (the old one kept where equal, so snapshots share it), an ended
        or purged one gone. What ``now`` would build, without a row per open job."""
        jobs, held = dict(last), self.state.jobs
        for job_id in self.changed:
            job = held.get(job_id)
            if job is None or job.status not in _OPEN:
                jobs.pop(job_id, None)
                continue
            row = row_of(job)
            if last.get(job_id) != row:
                jobs[job_id] = row
        return jobs

    def _open_jobs(self, last: dict[str, JobRow]) -> dict[str, JobRow]:
        """A row per open job, ``last``'s kept where equal (so snapshots share it)."""
        jobs = self._open_rows()
        for job_id, row in jobs.items():
            if last.get(job_id) == row:
                jobs[job_id] = last[job_id]
        return jobs

    def _thin(self) -> None:
        """Every other snapshot goes (the empty log's and the newest stay), and they are
        taken half as often from now on: the spacing stays even along the log."""
        kept = [*range(0, len(self.snapshots) - 1, 2), len(self.snapshots) - 1]
        self.snapshots = [self.snapshots[i] for i in kept]
        self.snapshot_seqs = [self.snapshot_seqs[i] for i in kept]
        self.snapshot_highs = [self.snapshot_highs[i] for i in kept]
        self.every *= 2

    def base_for(self, at: int, at_time: float | None) -> Frame:
        """A copy of the latest snapshot from which folding forward reaches ``at`` (and,
        with ``at_time``, stops at the first event later than it)."""
        i = bisect.bisect_right(self.snapshot_seqs, at) - 1
        if at_time is not None:
            i = min(i, bisect.bisect_right(self.snapshot_highs, at_time) - 1)
        return self.snapshots[max(i, 0)].copy()

    def fold_tail(self, frame: Frame, records: Iterable[Record], at_time: float | None) -> bool:
        """Fold ``records`` (the next ones after ``frame.seq``) into a copy ``base_for``
        gave; False once one is later than ``at_time``: the frame is then complete. Ends
        are read from ``finished``, never added to it (they were, live)."""
        ends = Ends(self.finished, record=False)
        for record in records:
            if at_time is not None and record.time > at_time:
                return False
            fold_step(frame, record, ends)
        return True

    # --- what the live path records -----------------------------------------------------------

    def _named(self, e: Any, r: Record) -> None:
        """An event the scheduler folds into the job it names (``job_id``)."""
        self.changed[e.job_id] = None
        self._moved(e, r)

    def _submitted(self, e: ev.JobSubmitted, r: Record) -> None:
        self.changed[e.job.job_id] = None
        self._moved(e, r)

    def _allocated(self, e: ev.GpusAllocated, r: Record) -> None:
        job = self.state.jobs.get(e.job_id)
        self.bars.allocated(e, r, job.spec if job is not None else None)
        self._moved(e, r)

    def _ended(self, e: ev.AttemptEnded, r: Record) -> None:
        self.bars.ended(e)
        self._named(e, r)

    def _released(self, e: ev.GpusReleased, r: Record) -> None:
        self.bars.released(e, r)
        self._moved(e, r)

    def _finished(self, e: ev.JobCompleted | ev.JobFailed | ev.JobCancelled | ev.JobRejected,
                  r: Record) -> None:
        job = self.state.jobs.get(e.job_id)
        if job is not None:
            self.finished.add(r.seq, row_of(job))
        self._named(e, r)

    def _purged(self, e: ev.JobsPurged, r: Record) -> None:
        changed = self.changed
        for job_id in e.job_ids:
            self.finished.purged[job_id] = r.seq
            changed[job_id] = None
        self._moved(e, r)


#: What the live path records besides the seq and time (``_moved``), by event type.
_LIVE: dict[type, Callable[[History, Any, Record], None]] = {
    ev.JobSubmitted: History._submitted, ev.GpusAllocated: History._allocated,
    ev.AttemptEnded: History._ended, ev.GpusReleased: History._released,
    ev.JobCompleted: History._finished, ev.JobFailed: History._finished,
    ev.JobCancelled: History._finished, ev.JobRejected: History._finished,
    ev.JobsPurged: History._purged}
#: Events the scheduler folds that change no job.
CHANGES_NO_JOB: frozenset[type] = frozenset({ev.LimitsChanged, ev.SettingsChanged})


def _step_for(kind: type) -> Callable[[History, Any, Record], None]:
    """The live step of ``kind``: a job event the scheduler folds marks its job changed."""
    step = _LIVE.get(kind)
    if step is not None:
        return step
    if kind in SchedulerState.READS and "job_id" in getattr(kind, "__struct_fields__", ()):
        return History._named
    return History._moved


History.STEPS = {kind: _step_for(kind) for kind in History.READS}
