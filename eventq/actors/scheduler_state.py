"""The scheduler's state: jobs, the waiting order, running counts, limits.

Folded only from events by ``SchedulerState.evolve``; nothing else writes it.
Waiting jobs live in one sorted bucket per base priority, ordered by submission.
Aging never reorders a bucket (an older job of the same base has at least the
same boost), so the queue's order is a lazy k-way merge of the buckets by
(effective priority, submission order): no re-sort as time passes, and finding
the next job is O(log n). The same jobs are also kept in one stream per (base priority,
user, team, whether it needs GPUs), so that a pass can leave out the jobs of a user or team
at its limit, or every job needing GPUs once none is free, without walking them
(``iter_schedulable``).
"""

from __future__ import annotations

import bisect
import contextlib
import heapq
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import msgspec
from sortedcontainers import SortedList

from eventq import events as ev
from eventq.log import Record
from eventq.policy import Capped, Counts, effective_priority, expected_runtime
from eventq.shared import Reasons, share

ACTIVE = ("dispatched", "running")
TERMINAL = ("completed", "failed", "cancelled", "rejected")
#: Waiting for a person: an admin's approval, or the release of a hold.
PARKED = ("blocked", "held")
RUNTIME_HISTORY = 20
K = TypeVar("K")
V = TypeVar("V")


class JobState(msgspec.Struct, gc=False):
    """One job as the scheduler knows it."""

    spec: ev.JobSpec
    order: int
    queued_at: float
    status: str = "pending"
    #: The latest attempt's number (0: never dispatched; ``ev.FIRST_ATTEMPT`` next).
    attempt: int = 0
    #: An attempt is alive (dispatched or running, also while a cancel takes effect).
    active: bool = False
    node: str | None = None
    #: Tuples, not lists: an empty one is shared, and 100,000 waiting jobs hold many.
    gpus: tuple[int, ...] = ()
    dispatched_at: float | None = None
    expected_end: float | None = None
    pid: int | None = None
    exit_code: int | None = None
    stop_requested: str | None = None
    error: str | None = None
    reasons: tuple[ev.Reason, ...] = ()
    finished_at: float | None = None


#: (base priority, user, team, needs GPUs): the jobs a pass may leave out together.
Stream = tuple[int, str, str | None, bool]


def _stream(spec: ev.JobSpec) -> Stream:
    return spec.effective_base, spec.user, spec.team, spec.gpus > 0


def implied_reasons(spec: ev.JobSpec) -> tuple[ev.Reason, ...]:
    """What a gated job waits for, as its submission says it: not recorded again unless it
    changes (a 10,000-job pipeline costs no 10,000 extra events)."""
    if not spec.depends_on and spec.begin_at is None:  # most jobs: nothing built per job
        return ()
    out = [ev.Reason("dependency", f"waits for {dep}") for dep in spec.depends_on]
    if spec.begin_at is not None:
        out.append(ev.Reason("begin_time", f"not before {spec.begin_at:.0f}"))
    return tuple(out)


def submitted_reasons(e: ev.JobSubmitted) -> tuple[ev.Reason, ...]:
    """A job's reasons as its submission left them: those it carries (it waited from the
    start), else those it implies."""
    return implied_reasons(e.job) if e.reasons is None else tuple(e.reasons)


def is_gated(spec: ev.JobSpec) -> bool:
    """Does the job wait for dependencies or a begin time before it may queue?"""
    return bool(spec.depends_on) or spec.begin_at is not None


#: Events other owners act on.
IGNORED = frozenset({
    ev.ServerStarted, ev.WorkerCreated, ev.WorkerTokenRotated, ev.WorkerConnected,
    ev.WorkerDraining, ev.WorkerLost, ev.WorkerRemoved, ev.UserCreated, ev.UserUpdated,
    ev.UserDeleted, ev.TokenIssued, ev.TokenRevoked, ev.SessionOpened, ev.SessionEnded,
    ev.NodeInventoryReported, ev.GpusAllocated, ev.GpusReleased, ev.StaleReportIgnored,
    ev.ServerNotifyUrlSet, ev.NotificationDelivered, ev.NotificationFailed, ev.HookRan,
    ev.WorkersRequested, ev.WorkersRequestSubmitted, ev.WorkersRequestFailed,
    ev.RequestedWorkerChanged, ev.RequestedWorkersCancelled})


@dataclass
class SchedulerState:
    #: What ``evolve`` acts on: every event but the ignored ones.
    READS: ClassVar[frozenset[type]] = frozenset(ev.EVENT_TYPES.values()) - IGNORED
    #: Each event type's step, for the log to call straight (``eventq.log.Fold``).
    STEPS: ClassVar[dict[type, Callable[[SchedulerState, Any, Record], None]]]

    jobs: dict[str, JobState] = field(default_factory=dict)
    #: status -> job ids in that status (insertion-ordered), kept by ``_status``.
    by_status: dict[str, dict[str, None]] = field(default_factory=dict)
    #: status -> its job ids sorted, and (status, user) -> the same for one user: the
    #: jobs table (``GET /api/jobs``) pages by submission from these (ids grow with the
    #: clock) without sorting every job per request.
    ids_by_status: dict[str, SortedList] = field(default_factory=dict)
    ids_by_user_status: dict[tuple[str, str], SortedList] = field(default_factory=dict)
    #: user -> jobs not yet finished.
    open_by_user: Counter[str] = field(default_factory=Counter)
    #: Waiting jobs that may run on the local node, and waiting jobs needing no GPU.
    waiting_local: int = 0
    waiting_cpu: int = 0
    buckets: dict[int, SortedList] = field(default_factory=dict)
    #: The same orders by (base priority, user, team): what ``iter_schedulable`` merges.
    streams: dict[Stream, SortedList] = field(default_factory=dict)
    by_order: dict[int, str] = field(default_factory=dict)
    counts: Counts = field(default_factory=Counts)
    #: node -> job id -> (expected end, GPU count) of its active attempts.
    node_active: dict[str, dict[str, tuple[float | None, int]]] = field(default_factory=dict)
    #: What the log last recorded; a log that recorded none keeps the limits it ran under.
    limits: ev.Limits = ev.UNRECORDED_LIMITS
    limits_recorded: bool = False
    approval_cost_threshold: float | None = None
    runtimes: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    #: job name -> ids of the jobs with that name (``depends_on`` may use unique names).
    by_name: dict[str, list[str]] = field(default_factory=dict)
    #: job id -> the jobs that depend on it.
    dependants: dict[str, set[str]] = field(default_factory=dict)
    #: node -> when its last attempt ended (for "the worker idle longest").
    node_idle_since: dict[str, float] = field(default_factory=dict)
    #: Equal reasons of waiting jobs, one tuple (``eventq/shared.py``).
    shared_reasons: Reasons = field(default_factory=Reasons)
    _replaying: bool = False
    #: (user, name) -> ``runtimes[(user, name)]`` in ascending order: each dispatch of a
    #: job without an estimate takes its median (a start, 100,000 times).
    _ranked: dict[tuple[str, str], list[float]] = field(default_factory=dict)

    # --- the waiting order ---------------------------------------------------------------

    def sort_key(self, job: JobState, now: float) -> tuple[int, int]:
        """Queue order: higher effective priority first, then submission order."""
        return (-effective_priority(job.spec, job.queued_at, now, self.limits), job.order)

    @contextlib.contextmanager
    def replaying(self) -> Iterator[None]:
        """While a replay folds the whole log, the waiting order is kept only as a set
        (``by_order``); the sorted buckets, streams and ids by status are built once at the
        end, not kept sorted through every submission and dispatch since the log began."""
        self._replaying = True
        try:
            yield
        finally:
            self._replaying = False
            grouped: dict[int, list[int]] = {}
            streams: dict[Stream, list[int]] = {}
            for order, job_id in self.by_order.items():
                spec = self.jobs[job_id].spec
                grouped.setdefault(spec.effective_base, []).append(order)
                streams.setdefault(_stream(spec), []).append(order)
            self.buckets = {base: SortedList(orders) for base, orders in grouped.items()}
            self.streams = {key: SortedList(orders) for key, orders in streams.items()}
            self._build_indexes()

    def _build_indexes(self) -> None:
        """The sorted ids by status and user, at once: ids mostly come in order, which
        a sort takes in one run, where keeping them sorted event by event costs twice."""
        by_user: dict[tuple[str, str], list[str]] = {}
        for status, ids in self.by_status.items():
            for job_id in ids:
                by_user.setdefault((status, self.jobs[job_id].spec.user), []).append(job_id)
        self.ids_by_status = {s: SortedList(ids) for s, ids in self.by_status.items() if ids}
        self.ids_by_user_status = {key: SortedList(ids) for key, ids in by_user.items()}

    def _enqueue(self, job: JobState) -> None:
        self.by_order[job.order] = job.spec.job_id
        if job.spec.target != "worker":
            self.waiting_local += 1
        if job.spec.gpus == 0:
            self.waiting_cpu += 1
        if self._replaying:
            return
        base = job.spec.effective_base
        bucket = self.buckets.get(base)
        if bucket is None:
            bucket = self.buckets[base] = SortedList()
        bucket.add(job.order)
        key = _stream(job.spec)
        stream = self.streams.get(key)
        if stream is None:
            stream = self.streams[key] = SortedList()
        stream.add(job.order)

    def _dequeue(self, job: JobState) -> None:
        if job.order not in self.by_order:
            return
        del self.by_order[job.order]
        if job.spec.target != "worker":
            self.waiting_local -= 1
        if job.spec.gpus == 0:
            self.waiting_cpu -= 1
        if self._replaying:
            return
        bucket = self.buckets[job.spec.effective_base]
        bucket.discard(job.order)
        if not bucket:
            del self.buckets[job.spec.effective_base]
        key = _stream(job.spec)
        stream = self.streams[key]
        stream.discard(job.order)
        if not stream:
            del self.streams[key]

    def iter_waiting(self, now: float) -> Iterator[JobState]:
        """Waiting jobs, highest effective priority first, FIFO within a priority."""
        def bucket_jobs(bucket: SortedList) -> Iterator[JobState]:
            for order in bucket:
                yield self.jobs[self.by_order[order]]
        return heapq.merge(*(bucket_jobs(b) for b in self.buckets.values()),
                           key=lambda j: self.sort_key(j, now))

    def iter_schedulable(self, now: float, capped: Capped) -> Iterator[JobState]:
        """``iter_waiting``'s order, leaving out, from the moment ``capped`` holds them,
        the jobs of users and teams at their limit: their whole stream is dropped at once."""
        heap: list[tuple[tuple[int, int], int, Stream, Iterator[int]]] = []
        for tag, (stream, orders) in enumerate(self.streams.items()):
            walk = iter(orders)
            first = self.jobs[self.by_order[next(walk)]]
            heap.append((self.sort_key(first, now), tag, stream, walk))
        heapq.heapify(heap)
        while heap:
            key, tag, stream, walk = heap[0]
            if capped.holds(stream[1], stream[2], stream[3]):
                heapq.heappop(heap)
                continue
            job = self.jobs[self.by_order[key[1]]]
            following = next(walk, None)
            if following is None:
                heapq.heappop(heap)
            else:
                after = self.sort_key(self.jobs[self.by_order[following]], now)
                heapq.heapreplace(heap, (after, tag, stream, walk))
            yield job

    def waiting_count(self) -> int:
        return len(self.by_order)

    def position(self, job_id: str, now: float) -> int | None:
        """1-based place in the queue, by binary search in each bucket."""
        job = self.jobs.get(job_id)
        if job is None or job.order not in self.by_order:
            return None
        target = self.sort_key(job, now)
        ahead = 0
        for base, bucket in self.buckets.items():
            if base == job.spec.effective_base:
                # Its own bucket is in queue order already: everything before it is ahead.
                ahead += bucket.index(job.order)
                continue
            ahead += self._ahead_in(bucket, target, now)
        return ahead + 1

    def _ahead_in(self, bucket: SortedList, target: tuple[int, int], now: float) -> int:
        """How many of another bucket's jobs sort before ``target``. A bucket is in queue
        order too (its oldest job the most aged), so most often it lies wholly ahead or
        wholly behind, which its two ends tell; otherwise a binary search."""
        def key(i: int) -> tuple[int, int]:
            return self.sort_key(self.jobs[self.by_order[bucket[i]]], now)

        if key(0) >= target:
            return 0
        if key(-1) < target:
            return len(bucket)
        lo, hi = 1, len(bucket) - 1  # key(lo - 1) < target <= key(hi)
        while lo < hi:
            mid = (lo + hi) // 2
            if key(mid) < target:
                lo = mid + 1
            else:
                hi = mid
        return lo

    # --- evolve ----------------------------------------------------------------------

    def evolve(self, record: Record) -> None:
        handler = _HANDLERS.get(type(record.event))
        if handler is None:
            if type(record.event) in IGNORED:
                return
            raise TypeError(f"scheduler has no evolve step for {record.type}")
        handler(self, record.event, record)

    def _on_limits(self, e: ev.LimitsChanged, r: Record) -> None:
        self.limits, self.limits_recorded = e.limits, True

    def _on_submitted(self, e: ev.JobSubmitted, r: Record) -> None:
        spec = share(e.job)
        gated = is_gated(spec)
        job = JobState(spec=spec, order=r.seq, queued_at=r.time,
                       status="waiting" if gated else "pending",
                       reasons=self.shared_reasons(submitted_reasons(e)))
        self.jobs[spec.job_id] = job
        _member(self.by_status, job.status)[spec.job_id] = None
        if not self._replaying:
            self._index(job, job.status, add=True)
        self.open_by_user[spec.user] += 1
        for dep in spec.depends_on:
            self.dependants.setdefault(dep, set()).add(spec.job_id)
        named = self.by_name.get(spec.name)
        if named is None:
            self.by_name[spec.name] = [spec.job_id]
        else:
            named.append(spec.job_id)
        if not gated:
            self._enqueue(job)

    def _on_ready(self, e: ev.JobReady, r: Record) -> None:
        job = self.jobs[e.job_id]
        self._status(job, "pending")
        job.reasons = ()
        self._enqueue(job)

    def _on_settings(self, e: ev.SettingsChanged, r: Record) -> None:
        self.approval_cost_threshold = e.approval_cost_threshold

    def _on_rejected(self, e: ev.JobRejected, r: Record) -> None:
        job = self.jobs[e.job_id]
        self._dequeue(job)
        self._status(job, "rejected")
        job.reasons, job.finished_at = tuple(e.reasons), r.time

    def _on_blocked(self, e: ev.JobBlocked, r: Record) -> None:
        job = self.jobs[e.job_id]
        self._dequeue(job)
        self._status(job, "blocked")
        job.reasons = (ev.Reason("approval", e.reason),)

    def _on_held(self, e: ev.JobHeld, r: Record) -> None:
        job = self.jobs[e.job_id]
        self._dequeue(job)
        self._status(job, "held")
        job.reasons = (ev.Reason("held", f"held since seq {r.seq}"),)

    def _on_back_to_queue(self, e: ev.JobApproved | ev.JobReleased, r: Record) -> None:
        job = self.jobs[e.job_id]
        job.reasons = ()
        if isinstance(e, ev.JobApproved) and is_gated(job.spec):
            self._status(job, "waiting")  # a gated job always joins through JobReady
            return
        self._status(job, "pending")
        self._enqueue(job)

    def _on_priority(self, e: ev.PriorityChanged, r: Record) -> None:
        job = self.jobs[e.job_id]
        waiting = job.order in self.by_order
        self._dequeue(job)
        job.spec = msgspec.structs.replace(job.spec, priority_override=e.priority_override)
        if waiting:
            self._enqueue(job)

    def _on_purged(self, e: ev.JobsPurged, r: Record) -> None:
        for job_id in e.job_ids:
            job = self.jobs.pop(job_id, None)
            if job is not None:
                self.by_status[job.status].pop(job_id, None)
                if not self._replaying:
                    self._index(job, job.status, add=False)
                for dep in job.spec.depends_on:
                    self.dependants.get(dep, set()).discard(job_id)
                self.dependants.pop(job_id, None)
                named = self.by_name.get(job.spec.name, [])
                if job_id in named:
                    named.remove(job_id)

    def unmet(self, job: JobState) -> list[JobState]:
        """The dependencies of ``job`` that have not completed."""
        return [d for dep in job.spec.depends_on
                if (d := self.jobs.get(dep)) is not None and d.status != "completed"]

    def _on_reasons(self, e: ev.JobReasonsChanged, r: Record) -> None:
        self.jobs[e.job_id].reasons = self.shared_reasons(tuple(e.reasons))

    def _on_dispatched(self, e: ev.AttemptDispatched, r: Record) -> None:
        job = self.jobs[e.job_id]
        self._dequeue(job)
        spec = job.spec
        runtime = expected_runtime(spec)
        if runtime is None:
            runtime = self._median_runtime((spec.user, spec.name))
        self._status(job, "dispatched")
        job.attempt, job.active, job.node, job.gpus = e.attempt, True, e.node, tuple(e.gpus)
        job.dispatched_at, job.reasons, job.pid, job.exit_code = r.time, (), None, None
        job.stop_requested = None
        job.expected_end = None if runtime is None else r.time + runtime
        self._count(job, +1)

    def _median_runtime(self, key: tuple[str, str]) -> float | None:
        ranked = self._ranked.get(key)
        if not ranked:
            return None
        middle = len(ranked) // 2
        return ranked[middle] if len(ranked) % 2 else (ranked[middle - 1] + ranked[middle]) / 2

    def _add_runtime(self, key: tuple[str, str], runtime: float) -> None:
        """Keep the latest ``RUNTIME_HISTORY`` runtimes, and the same in order."""
        history, ranked = self.runtimes.get(key), self._ranked.get(key)
        if history is None or ranked is None:
            history, ranked = self.runtimes[key], self._ranked[key] = [], []
        history.append(runtime)
        bisect.insort(ranked, runtime)
        if len(history) > RUNTIME_HISTORY:
            del ranked[bisect.bisect_left(ranked, history.pop(0))]

    def _on_started(self, e: ev.AttemptStarted, r: Record) -> None:
        job = self.jobs[e.job_id]
        job.pid = e.pid
        if job.status == "dispatched":
            self._status(job, "running")

    def _on_stop_requested(self, e: ev.AttemptStopRequested, r: Record) -> None:
        self.jobs[e.job_id].stop_requested = e.reason

    def _on_ended(self, e: ev.AttemptEnded, r: Record) -> None:
        job = self.jobs[e.job_id]
        self._count(job, -1)
        if job.node and not self.node_active.get(job.node):
            self.node_idle_since[job.node] = r.time
        job.active, job.exit_code = False, e.exit_code
        if e.outcome == "exited" and e.exit_code == 0 and job.dispatched_at is not None:
            self._add_runtime((job.spec.user, job.spec.name), r.time - job.dispatched_at)

    def _on_requeued(self, e: ev.JobRequeued, r: Record) -> None:
        job = self.jobs[e.job_id]
        self._status(job, "pending")
        job.node, job.gpus, job.error = None, (), e.reason
        job.finished_at = None
        self._enqueue(job)

    def _on_completed(self, e: ev.JobCompleted, r: Record) -> None:
        job = self.jobs[e.job_id]
        self._status(job, "completed")
        job.finished_at = r.time

    def _on_failed(self, e: ev.JobFailed, r: Record) -> None:
        job = self.jobs[e.job_id]
        self._status(job, "failed")
        job.error, job.finished_at = e.reason, r.time

    def _on_cancelled(self, e: ev.JobCancelled, r: Record) -> None:
        job = self.jobs[e.job_id]
        self._dequeue(job)
        self._status(job, "cancelled")
        job.finished_at = r.time

    def _status(self, job: JobState, status: str) -> None:
        """Every status change goes through here, so the index stays exact."""
        job_id, by_status = job.spec.job_id, self.by_status
        by_status[job.status].pop(job_id, None)
        members = by_status.get(status)
        if members is None:
            members = by_status[status] = {}
        members[job_id] = None
        if not self._replaying:
            self._index(job, job.status, add=False)
            self._index(job, status, add=True)
        ended, ends = job.status in TERMINAL, status in TERMINAL
        if ended != ends:
            self.open_by_user[job.spec.user] += 1 if ended else -1
        job.status = status

    def _index(self, job: JobState, status: str, add: bool) -> None:
        """Keep the sorted ids by status (and user); not while replaying, where every caller
        leaves them to ``_build_indexes`` (a call less per event of a start)."""
        job_id = job.spec.job_id
        _keep(self.ids_by_status, status, job_id, add)
        _keep(self.ids_by_user_status, (status, job.spec.user), job_id, add)

    def with_status(self, *statuses: str, newest_first: bool = False) -> Iterator[JobState]:
        """Jobs in these states, without scanning every job."""
        for status in statuses:
            ids = self.by_status.get(status, {})
            for job_id in reversed(ids) if newest_first else ids:
                yield self.jobs[job_id]

    def status_counts(self) -> dict[str, int]:
        return {s: len(ids) for s, ids in self.by_status.items() if ids}

    def _count(self, job: JobState, delta: int) -> None:
        spec, node, counts = job.spec, job.node or "", self.counts
        counts.total += delta
        counts.by_user[spec.user] += delta
        if spec.team:
            counts.by_team[spec.team] += delta
        if node == "local":
            counts.local_jobs += delta
            counts.local_gpus += delta * spec.gpus
        active = _member(self.node_active, node)
        if delta > 0:
            active[spec.job_id] = (job.expected_end, spec.gpus)
        else:
            active.pop(spec.job_id, None)

    def snapshot(self) -> dict[str, Any]:
        """Comparable state, for the live == replayed check."""
        return {
            "jobs": {k: msgspec.to_builtins(v) for k, v in sorted(self.jobs.items())},
            "waiting": {p: list(b) for p, b in sorted(self.buckets.items())},
            "streams": sorted((str(k), list(b)) for k, b in self.streams.items()),
            "by_status": {s: sorted(ids) for s, ids in sorted(self.by_status.items()) if ids},
            "ids_by_status": {s: list(ids) for s, ids in sorted(self.ids_by_status.items())},
            "ids_by_user_status": {f"{s}/{u}": list(ids) for (s, u), ids
                                   in sorted(self.ids_by_user_status.items())},
            "dependants": {d: sorted(js) for d, js in sorted(self.dependants.items()) if js},
            "open_by_user": dict(sorted((+self.open_by_user).items())),
            "waiting_local": self.waiting_local,
            "waiting_cpu": self.waiting_cpu,
            "counts": [self.counts.total, +self.counts.by_user, +self.counts.by_team,
                       self.counts.local_jobs, self.counts.local_gpus],
            "node_active": {n: dict(sorted(a.items()))
                            for n, a in sorted(self.node_active.items()) if a},
            "limits": msgspec.to_builtins(self.limits),
        }


def _member(index: dict[K, dict[V, Any]], key: K) -> dict[V, Any]:
    """``index[key]``, a new dict if there is none (``setdefault`` builds one every call)."""
    members = index.get(key)
    if members is None:
        members = index[key] = {}
    return members


def _keep(index: dict[K, SortedList], key: K, job_id: str, add: bool) -> None:
    """Add ``job_id`` to the sorted ids under ``key``, or take it out (and an empty list)."""
    ids = index.get(key)
    if add:
        if ids is None:
            ids = index[key] = SortedList()
        ids.add(job_id)
    elif ids is not None:
        ids.discard(job_id)
        if not ids:
            del index[key]


_HANDLERS: dict[type, Callable[[SchedulerState, Any, Record], None]] = {
    ev.LimitsChanged: SchedulerState._on_limits,
    ev.JobSubmitted: SchedulerState._on_submitted,
    ev.JobRejected: SchedulerState._on_rejected,
    ev.JobReasonsChanged: SchedulerState._on_reasons,
    ev.AttemptDispatched: SchedulerState._on_dispatched,
    ev.AttemptStarted: SchedulerState._on_started,
    ev.AttemptStopRequested: SchedulerState._on_stop_requested,
    ev.AttemptEnded: SchedulerState._on_ended,
    ev.JobRequeued: SchedulerState._on_requeued,
    ev.JobCompleted: SchedulerState._on_completed,
    ev.JobFailed: SchedulerState._on_failed,
    ev.JobCancelled: SchedulerState._on_cancelled,
    ev.SettingsChanged: SchedulerState._on_settings,
    ev.JobBlocked: SchedulerState._on_blocked,
    ev.JobReady: SchedulerState._on_ready,
    ev.JobApproved: SchedulerState._on_back_to_queue,
    ev.JobHeld: SchedulerState._on_held,
    ev.JobReleased: SchedulerState._on_back_to_queue,
    ev.PriorityChanged: SchedulerState._on_priority,
    ev.JobsPurged: SchedulerState._on_purged,
}
SchedulerState.STEPS = _HANDLERS
