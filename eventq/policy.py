"""The scheduling policy (SPEC 4) as pure functions: no I/O, no clock, no mutation of inputs.

``plan`` walks waiting jobs in priority order and returns the ones to place now,
with every reason that holds each job it looked at. A job that fails a check is
skipped and the next is tried, except that the highest job held only by GPUs gets
a reservation (EASY backfilling): lower jobs may use that node's GPUs only if they
end before its shadow time or use only the extra GPUs.
"""

from __future__ import annotations

import datetime
import math
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from itertools import chain
from operator import itemgetter
from typing import Protocol

from eventq.events import JobSpec, Limits, Reason
from eventq.timefmt import relative

URGENT = 30
#: Jobs examined per pass at most; the rest wait with reason ``priority``.
SCAN_DEPTH = 2000
#: Once nothing more can start (global limit full, no free GPU or slot anywhere),
#: this many more jobs are still examined so that their reasons stay current.
REASON_DEPTH = 100


class Waiting(Protocol):
    """A waiting job as the policy sees it."""

    @property
    def spec(self) -> JobSpec: ...

    @property
    def queued_at(self) -> float: ...


def effective_priority(spec: JobSpec, queued_at: float, now: float, limits: Limits) -> int:
    """Override or level priority, plus the aging boost (capped at Urgent)."""
    base = spec.effective_base
    if base >= URGENT or limits.starvation_threshold_minutes <= 0:
        return base
    waited = max(0.0, now - queued_at) / (limits.starvation_threshold_minutes * 60)
    return max(base, min(URGENT, base + limits.aging_boost * math.floor(waited)))


@dataclass
class NodeView:
    """One node's GPUs at the moment of planning."""

    name: str
    local: bool
    free: set[int]
    #: GPUs eventq may ever use here (not busy with foreign processes).
    allocatable: int
    #: (expected end or None, GPU count, job id) of each active attempt.
    ends: list[tuple[float | None, int, str]] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    #: Jobs it runs at once at most (a SimpleTuner stock worker: 1); None: as GPUs allow.
    max_jobs: int | None = None
    #: Since when it has been idle (None while busy): the idle longest is chosen first.
    idle_since: float | None = None
    #: A worker with a time budget takes only jobs known to end before this.
    accepts_until: float | None = None

    @property
    def jobs(self) -> int:
        return len(self.ends)


@dataclass
class Counts:
    """Active attempts, for the limits."""

    total: int = 0
    by_user: Counter[str] = field(default_factory=Counter)
    by_team: Counter[str] = field(default_factory=Counter)
    local_jobs: int = 0
    local_gpus: int = 0


@dataclass(frozen=True)
class Placement:
    job_id: str
    node: str
    gpus: int


@dataclass(frozen=True)
class Reservation:
    """GPUs held for the highest job that lacks them."""

    job_id: str
    node: str
    needs: int
    shadow: float | None
    #: Job whose unknown end makes the shadow unknown.
    waits_for: str | None
    extra: int


@dataclass
class Capped:
    """Users and teams a pass found at their limit.

    Counts only grow within a pass, so every later job of a capped user or team is held by
    the same limit: once the walk has examined ``REASON_DEPTH`` jobs (whose reasons stay
    current), the waiting order may leave those jobs out (``skipping``). A sweep of a
    million jobs from one user at its limit then costs a pass nothing, and a job of
    another user behind it is still reached.
    """

    users: set[str] = field(default_factory=set)
    teams: set[str] = field(default_factory=set)
    #: No node has a free GPU and the reservation is taken: no job needing GPUs can start
    #: in this pass, nor change what it reserves.
    gpus_taken: bool = False
    skipping: bool = False

    def note(self, spec: JobSpec, reasons: list[Reason]) -> None:
        for reason in reasons:
            if reason.code == "user_limit":
                self.users.add(spec.user)
            elif reason.code == "team_limit" and spec.team:
                self.teams.add(spec.team)

    def holds(self, user: str, team: str | None, needs_gpus: bool) -> bool:
        return self.skipping and (user in self.users or team in self.teams
                                  or (needs_gpus and self.gpus_taken))


#: How many waiting jobs need no GPU, when the caller does not know: assume always one more.
UNKNOWN = 1 << 62


@dataclass
class Plan:
    placements: list[Placement] = field(default_factory=list)
    reasons: dict[str, list[Reason]] = field(default_factory=dict)
    reservation: Reservation | None = None
    #: True when the walk stopped early (global limit or scan depth).
    truncated: bool = False


def matches(spec: JobSpec, node: NodeView) -> bool:
    """Target, then labels (every key's fnmatch glob matches the worker's label).

    A job that needs no GPU stays on the local node unless it asks for a worker (target
    ``worker``, or worker labels): it gains nothing by travelling, and a remote worker gets
    only the environment a job declares."""
    if node.local:
        return spec.target != "worker"
    if spec.gpus == 0 and spec.target == "auto" and not spec.worker_labels:
        return False
    return spec.target != "local" and labels_match(spec.worker_labels, node.labels)


def labels_match(wanted: dict[str, str], labels: dict[str, str]) -> bool:
    """Every key's fnmatch glob matches the worker's label (SPEC 6)."""
    return not wanted or all(fnmatchcase(labels.get(k, ""), glob) for k, glob in wanted.items())


class NodeOrder:
    """Positions in a list of nodes, in the order placement tries them (SPEC 6): workers
    idle the longest first, then busy workers, then the local node(s) likewise.

    ``NodeViews`` keeps one up to date between decisions, so a placement among 10,000 idle
    workers looks at the first one that fits instead of sorting all of them."""

    def __init__(self, idle: list[tuple[float, int]], busy: list[int], local: list[int]
                 ) -> None:
        #: (idle since, position) of the idle workers, in order; ties in list order.
        self.idle = idle
        #: Positions of the busy workers, in list order.
        self.busy = busy
        self.local = local

    def workers(self) -> Iterator[int]:
        return chain(map(itemgetter(1), self.idle), self.busy)


def node_order(nodes: Sequence[NodeView]) -> NodeOrder:
    """The order placement tries ``nodes`` in, made at once (see ``NodeOrder``)."""
    idle = [(n.idle_since, i) for i, n in enumerate(nodes)
            if not n.local and n.idle_since is not None]
    idle.sort()
    busy = [i for i, n in enumerate(nodes) if not n.local and n.idle_since is None]
    return NodeOrder(idle, busy, local_order(nodes, (i for i, n in enumerate(nodes) if n.local)))


def local_order(nodes: Sequence[NodeView], positions: Iterable[int]) -> list[int]:
    """The local nodes' positions, idle the longest first, then busy (in list order)."""
    local = list(positions)
    idle = sorted((nodes[i].idle_since or 0.0, i) for i in local
                  if nodes[i].idle_since is not None)
    return [i for _, i in idle] + [i for i in local if nodes[i].idle_since is None]


def fitting(spec: JobSpec, nodes: Sequence[NodeView], order: NodeOrder) -> Iterator[int]:
    """Positions of the nodes that fit the job's target and labels and could ever hold its
    GPU count, in ``order``: workers first, then the local node (``auto``). Lazy: a
    placement stops at the first node that takes the job."""
    gpus = spec.gpus
    if spec.worker_labels or (gpus == 0 and spec.target == "auto"):
        return (i for i in chain(order.workers(), order.local)
                if matches(spec, nodes[i]) and gpus <= nodes[i].allocatable)
    parts: list[Iterable[int]] = []
    if spec.target != "local":  # ``matches`` without labels, decided once for all workers
        parts.append(order.workers())
    if spec.target != "worker":
        parts.append(order.local)
    return (i for i in chain.from_iterable(parts) if gpus <= nodes[i].allocatable)


def fitting_nodes(spec: JobSpec, nodes: Sequence[NodeView], order: NodeOrder | None = None
                  ) -> list[NodeView]:
    """The nodes of ``fitting``, all of them."""
    return [nodes[i] for i in fitting(spec, nodes, order or node_order(nodes))]


def fits_budget(spec: JobSpec, node: NodeView, now: float) -> bool:
    """Does the job surely end before a time-limited worker's allocation does?"""
    if node.accepts_until is None:
        return True
    runtime = expected_runtime(spec)
    return runtime is not None and now + runtime <= node.accepts_until


def _raise_with(flag: str) -> str:
    """How an admin lifts a limit: a person must never have to guess (SPEC 4)."""
    return f" (raise with `eventq queue limits {flag} N`)"


def limit_reasons(spec: JobSpec, counts: Counts, limits: Limits) -> list[Reason]:
    """Checks 1-3 of SPEC 4: global, user, team."""
    out = []
    if counts.total >= limits.max_concurrent:
        out.append(Reason("global_limit", f"{counts.total} of {limits.max_concurrent} running"
                                          + _raise_with("--max")))
    running = counts.by_user[spec.user]
    if running >= limits.user_max_concurrent:
        out.append(Reason("user_limit", f"{spec.user} runs {running} of "
                                        f"{limits.user_max_concurrent}"
                                        + _raise_with("--per-user")))
    if limits.enable_fair_share and spec.team:
        team = counts.by_team[spec.team]
        if team >= limits.team_max_concurrent:
            out.append(Reason("team_limit", f"team {spec.team} runs {team} of "
                                            f"{limits.team_max_concurrent}"
                                            + _raise_with("--per-team")))
    return out


def local_jobs_full(counts: Counts, limits: Limits) -> bool:
    """Is the local job limit reached? Without one, only the local GPUs bound the node."""
    cap = limits.local_job_max_concurrent
    return cap is not None and counts.local_jobs >= cap


def local_reasons(spec: JobSpec, counts: Counts, limits: Limits) -> list[Reason]:
    """Check 4 of SPEC 4, for placement on the local node."""
    out = []
    if local_jobs_full(counts, limits):
        out.append(Reason("local_limit", f"local runs {counts.local_jobs} of "
                                         f"{limits.local_job_max_concurrent} jobs"
                                         + _raise_with("--local-jobs")))
    cap = limits.local_gpu_max_concurrent
    if cap is not None and counts.local_gpus + spec.gpus > cap:
        out.append(Reason("local_limit", f"local GPUs in use {counts.local_gpus} + "
                                         f"{spec.gpus} needed > {cap}"
                                         + _raise_with("--local-gpus")))
    return out


def gpus_fit(spec: JobSpec, node: NodeView) -> bool:
    if spec.device_ids and node.local and not spec.any_gpu:
        return set(spec.device_ids) <= node.free
    return len(node.free) >= spec.gpus


def gpu_reason(spec: JobSpec, node: NodeView) -> Reason:
    if spec.device_ids and node.local and not spec.any_gpu:
        held = sorted(set(spec.device_ids) - node.free)
        return Reason("gpus", f"needs GPUs {spec.device_ids}; {held} not free on {node.name}")
    return Reason("gpus", f"needs {spec.gpus}, node {node.name} has {len(node.free)} free")


def shadow(node: NodeView, needs: int, job_id: str) -> Reservation:
    """When ``needs`` GPUs will be free on ``node``, walking active attempts' ends."""
    free = len(node.free)
    known = sorted((e for e in node.ends if e[0] is not None), key=lambda e: e[0] or 0.0)
    unknown = [e for e in node.ends if e[0] is None]
    for end, gpus, _ in known:
        free += gpus
        if free >= needs:
            return Reservation(job_id, node.name, needs, end, None, free - needs)
    waits_for = unknown[0][2] if unknown else None
    return Reservation(job_id, node.name, needs, None, waits_for, 0)


def expected_runtime(spec: JobSpec) -> float | None:
    return spec.max_runtime if spec.max_runtime is not None else spec.estimated_runtime


class _Pass:
    """The working state of one planning pass.

    It reads the caller's counts and nodes and copies what it changes before it changes
    it: the counts and the list at its first placement, a node when a job is placed on it.
    Most looks at one job place nothing, and copy nothing; a placement among 10,000
    workers copies one node, not 10,000.
    """

    def __init__(self, counts: Counts, limits: Limits, nodes: list[NodeView], now: float,
                 cpu_jobs_waiting: int = UNKNOWN, order: NodeOrder | None = None):
        self.counts, self.limits, self.nodes, self.now = counts, limits, nodes, now
        #: Made here when the caller keeps none: copies take their original's position.
        self.order = order if order is not None else node_order(nodes)
        #: Waiting jobs needing no GPU that the walk has not reached yet: once none is
        #: left, a node with no free GPU can take nothing more in this pass.
        self.cpu_left = cpu_jobs_waiting
        self.plan = Plan()
        self._copied = False
        #: ids of the nodes in ``self.nodes`` that are the pass's own copies.
        self._owned: set[int] = set()
        #: Once ``settle`` holds: the reasons found for each job shape.
        self.settled: dict[tuple[object, ...], list[Reason]] | None = None

    def _own(self, at: int) -> NodeView:
        """The pass's own copy of the node at ``at`` (made in its place in ``self.nodes``)."""
        node = self.nodes[at]
        if id(node) in self._owned:
            return node
        if not self._copied:
            self.counts = _copy_counts(self.counts)
            self.nodes = self.nodes.copy()  # the pointers only, at C speed
            self._copied = True
        mine = self.nodes[at] = _copy_node(node)
        self._owned.add(id(mine))
        return mine

    def saturated(self) -> bool:
        """Nothing more can start anywhere: the global limit is full, or no node can take
        a job (local slots taken, job slots full, or no free GPU and no CPU job waiting)."""
        if self.counts.total >= self.limits.max_concurrent:
            return True
        return not any(self._can_take(n) for n in self.nodes)

    def _can_take(self, node: NodeView) -> bool:
        if node.local and local_jobs_full(self.counts, self.limits):
            return False
        if node.max_jobs is not None and node.jobs >= node.max_jobs:
            return False
        return bool(node.free) or self.cpu_left > 0

    def consider(self, spec: JobSpec) -> None:
        settled = self.settled if spec.gpus else None
        if settled is None:
            self._consider(spec)
            return
        shape = _shape(spec)
        known = settled.get(shape)
        if known is not None:
            self.plan.reasons[spec.job_id] = list(known)
            return
        self._consider(spec)
        if spec.job_id in self.plan.reasons:
            settled[shape] = self.plan.reasons[spec.job_id]

    def settle(self) -> None:
        """From here on nothing needing a GPU can start and the reservation is made: what
        holds such a job depends only on its ``_shape``, so jobs of one shape share a look."""
        if self.settled is None and self.plan.reservation is not None and self.saturated():
            self.settled = {}

    def _consider(self, spec: JobSpec) -> None:
        reasons = limit_reasons(spec, self.counts, self.limits)
        walked: list[NodeView] = []
        node_reasons: list[Reason] = []
        for at in fitting(spec, self.nodes, self.order):
            node = self.nodes[at]
            walked.append(node)
            held = self._node_reasons(spec, node)
            if not held and not reasons:
                self._place(spec, at)
                return
            node_reasons = node_reasons or held
            if reasons and node_reasons:
                break  # held by a limit: no reservation, and the first node's reason is found
        if not walked:
            reasons.append(self._no_node(spec))
            self.plan.reasons[spec.job_id] = reasons
            return
        if not reasons and self.plan.reservation is None \
                and all(r.code == "gpus" for r in node_reasons):
            self._reserve(spec, walked)  # only the highest such job (EASY)
        self.plan.reasons[spec.job_id] = reasons + node_reasons

    def _node_reasons(self, spec: JobSpec, node: NodeView) -> list[Reason]:
        out = local_reasons(spec, self.counts, self.limits) if node.local else []
        if node.max_jobs is not None and node.jobs >= node.max_jobs:
            out.append(Reason("gpus", f"worker {node.name} runs {node.jobs} of "
                                      f"{node.max_jobs} jobs"))
            return out
        if not fits_budget(spec, node, self.now):
            runtime = expected_runtime(spec)
            left = (node.accepts_until or self.now) - self.now
            need = "an unknown time" if runtime is None else f"{runtime:.0f}s"
            out.append(Reason("no_worker", f"worker {node.name} has {max(0.0, left):.0f}s "
                                           f"left in its allocation; the job needs {need}"))
            return out
        if not gpus_fit(spec, node):
            out.append(gpu_reason(spec, node))
            return out
        res = self.plan.reservation
        if res is not None and res.node == node.name and spec.gpus > 0 \
                and not self._ends_before_shadow(spec, res) and spec.gpus > res.extra:
            when = "unknown" if res.shadow is None else f"{res.shadow - self.now:.0f}s"
            out.append(Reason("reserved", f"node {node.name}'s GPUs are held for job "
                                          f"{res.job_id} (needs {res.needs}, starts in {when})"))
        return out

    def _ends_before_shadow(self, spec: JobSpec, res: Reservation) -> bool:
        runtime = expected_runtime(spec)
        return res.shadow is not None and runtime is not None and self.now + runtime <= res.shadow

    def _no_node(self, spec: JobSpec) -> Reason:
        """Say which requirement nothing meets."""
        workers = [n for n in self.nodes if not n.local]
        if spec.target == "worker" or (spec.target == "auto" and workers):
            if not workers:
                return Reason("no_worker", "no worker is connected")
            labelled = [n for n in workers if matches(spec, n)]
            if not labelled:
                return Reason("no_worker", f"no connected worker has labels {spec.worker_labels}")
            most = max(n.allocatable for n in labelled)
            which = " with those labels" if spec.worker_labels else ""
            return Reason("no_worker", f"no connected worker{which} has {spec.gpus} GPUs "
                                       f"(most: {most})")
        most = max((n.allocatable for n in self.nodes), default=0)
        return Reason("gpus", f"needs {spec.gpus}; no node can offer that many (most: {most})")

    def _reserve(self, spec: JobSpec, fitting: list[NodeView]) -> None:
        options = [shadow(n, spec.gpus, spec.job_id) for n in fitting]
        known = [o for o in options if o.shadow is not None]
        self.plan.reservation = (min(known, key=lambda o: o.shadow or 0.0) if known
                                 else options[0])

    def _place(self, spec: JobSpec, at: int) -> None:
        node = self._own(at)
        self.plan.placements.append(Placement(spec.job_id, node.name, spec.gpus))
        taken = sorted(node.free)[: spec.gpus]
        if spec.device_ids and node.local:
            preferred = [g for g in spec.device_ids if g in node.free]
            rest = [g for g in sorted(node.free) if g not in preferred]
            taken = (preferred + rest)[: spec.gpus]
        node.free -= set(taken)
        runtime = expected_runtime(spec)
        node.ends.append((None if runtime is None else self.now + runtime, spec.gpus, spec.job_id))
        res = self.plan.reservation
        if res is not None and res.node == node.name and not self._ends_before_shadow(spec, res):
            # It uses extra GPUs: they are no longer extra for the jobs after it.
            self.plan.reservation = Reservation(res.job_id, res.node, res.needs, res.shadow,
                                                res.waits_for, res.extra - spec.gpus)
        self.counts.total += 1
        self.counts.by_user[spec.user] += 1
        if spec.team:
            self.counts.by_team[spec.team] += 1
        if node.local:
            self.counts.local_jobs += 1
            self.counts.local_gpus += spec.gpus


def fits_no_worker(reason: Reason) -> bool:
    """Is this the reason ``_no_node`` gives when no connected worker fits at all?"""
    return reason.code == "no_worker" and \
        reason.detail.startswith(("no worker is connected", "no connected worker"))


def plan(waiting: Iterator[Waiting], counts: Counts, limits: Limits,
         nodes: list[NodeView], now: float, scan_depth: int = SCAN_DEPTH,
         cpu_jobs_waiting: int = UNKNOWN, capped: Capped | None = None,
         order: NodeOrder | None = None) -> Plan:
    """Decide which waiting jobs start now. ``counts`` and ``nodes`` are copied, not changed.

    ``cpu_jobs_waiting``: how many waiting jobs need no GPU; once the walk has passed them
    all, it stops as soon as no node has a free GPU. ``capped``: filled as the walk finds
    users and teams at their limit, for a ``waiting`` order that leaves their jobs out.
    ``order``: of ``nodes``, when the caller keeps one (``NodeOrder``).
    """
    work = _Pass(counts, limits, nodes, now, cpu_jobs_waiting, order)
    capped = capped if capped is not None else Capped()
    after_full = REASON_DEPTH
    examined_held: list[JobSpec] = []
    restate = 0  # examined_held[:restate] were looked at before the latest placement
    for examined, job in enumerate(waiting):
        if work.saturated():
            after_full -= 1
            work.settle()
        if examined >= scan_depth or after_full < 0:
            work.plan.truncated = True
            break
        placed, reserved = len(work.plan.placements), work.plan.reservation is not None
        work.consider(job.spec)
        if job.spec.gpus == 0:
            work.cpu_left -= 1
        if len(work.plan.placements) > placed or reserved != (work.plan.reservation is not None):
            capped.gpus_taken = _gpus_taken(work)
        if len(work.plan.placements) > placed:
            restate = len(examined_held)
        else:
            examined_held.append(job.spec)
            capped.note(job.spec, work.plan.reasons.get(job.spec.job_id, []))
        capped.skipping = examined + 1 >= REASON_DEPTH
    _restate(work, examined_held[:restate], limits, now)
    return work.plan


def _restate(work: _Pass, looked_at: list[JobSpec], limits: Limits, now: float) -> None:
    """A placement later in the walk changes what holds the jobs looked at before it."""
    for spec in looked_at:
        final = explain(spec, work.counts, limits, work.nodes, work.plan.reservation, now,
                        work.order)
        if final:
            work.plan.reasons[spec.job_id] = final


def _shape(spec: JobSpec) -> tuple[object, ...]:
    """All of a job that what holds it depends on, once a pass is settled."""
    labels = tuple(sorted(spec.worker_labels.items())) if spec.worker_labels else ()
    return (spec.user, spec.team, spec.gpus, spec.target, labels,
            tuple(spec.device_ids or ()), spec.any_gpu, spec.max_runtime,
            spec.estimated_runtime)


def _gpus_taken(work: _Pass) -> bool:
    """No job needing GPUs can start in the rest of this pass, nor take the reservation
    (EASY): no node has a free GPU, and the highest job lacking them already holds it."""
    return work.plan.reservation is not None and not any(n.free for n in work.nodes)


def plan_one(spec: JobSpec, counts: Counts, limits: Limits, nodes: list[NodeView],
             reservation: Reservation | None, now: float, order: NodeOrder | None = None
             ) -> Plan:
    """Consider one job as if it were next, under the standing reservation.

    A newly queued job changes nothing for the jobs already waiting (it frees no
    resources), so placing it needs no walk of the whole queue.
    """
    work = _Pass(counts, limits, nodes, now, order=order)
    if reservation is not None and reservation.job_id != spec.job_id:
        work.plan.reservation = reservation
    work.consider(spec)
    return work.plan


def explain(spec: JobSpec, counts: Counts, limits: Limits, nodes: list[NodeView],
            reservation: Reservation | None, now: float, order: NodeOrder | None = None
            ) -> list[Reason]:
    """Every check holding one job now, as if it were next; [] means it could start."""
    return plan_one(spec, counts, limits, nodes, reservation, now, order).reasons.get(
        spec.job_id, [])


def _copy_counts(c: Counts) -> Counts:
    return Counts(c.total, Counter(c.by_user), Counter(c.by_team), c.local_jobs, c.local_gpus)


def _copy_node(n: NodeView) -> NodeView:
    return NodeView(n.name, n.local, set(n.free), n.allocatable, list(n.ends), n.labels,
                    n.max_jobs, n.idle_since, n.accepts_until)


# --- estimated starts --------------------------------------------------------------------

#: Waiting jobs given an estimate; deeper ones get None with a note.
ESTIMATE_DEPTH = 1000


@dataclass(frozen=True)
class Estimate:
    start: float | None
    note: str = ""
    #: The job (running, or projected to start first) whose end frees the last GPU this one
    #: needs: what the estimate rests on; "" when its GPUs are free now.
    waits_for: str = ""


INF = float("inf")


def _earliest(slots: list[tuple[float, str]], need: int, now: float) -> Estimate:
    """When ``need`` of these GPUs are free: the need-th earliest free time."""
    if need == 0:
        return Estimate(now)
    if need > len(slots):  # the rest are held with no attempt listed (a worker given up)
        return Estimate(None, "its GPUs are held by an attempt whose end is not known yet")
    time, holder = sorted(slots)[need - 1]
    if time == INF:
        return Estimate(None, f"waits for job {holder}, whose end is unknown", holder)
    return Estimate(max(now, time), waits_for=holder if time > now else "")


def estimate_starts(waiting: Iterable[JobSpec], nodes: list[NodeView],
                    now: float, depth: int = ESTIMATE_DEPTH) -> dict[str, Estimate]:
    """Project waiting jobs onto the GPUs' free times, job by job in priority order.

    Each GPU has the time it becomes free: now if free, a running attempt's expected end,
    or never known (its end is unknown). A job starts when enough of a fitting node's GPUs
    are free and then holds the earliest of them for its expected runtime. This is list
    scheduling: cheap (no holes are backfilled) and honest about what is unknown. Limits
    are not projected, so an estimate is the earliest the GPUs allow. A job's estimate
    depends only on the jobs ahead of it: the first ``depth`` are the same at any depth.
    """
    slots = {n.name: [(now, "")] * len(n.free) + [
        (INF if end is None or end <= now else end, job) for end, gpus, job in n.ends
        for _ in range(gpus)] for n in nodes}
    out: dict[str, Estimate] = {}
    order = node_order(nodes)
    for spec in waiting:
        if len(out) >= depth:
            break
        options = [(n.name, _earliest(slots[n.name], spec.gpus, now))
                   for n in fitting_nodes(spec, nodes, order)]
        known = [(name, e) for name, e in options if e.start is not None]
        if not known:
            out[spec.job_id] = options[0][1] if options else Estimate(None, "no node fits it")
            continue
        name, best = min(known, key=lambda o: o[1].start or 0.0)
        out[spec.job_id] = best
        runtime = expected_runtime(spec)
        until = INF if runtime is None else (best.start or now) + runtime
        taken = sorted(slots[name])
        slots[name] = [(until, spec.job_id)] * spec.gpus + taken[spec.gpus:]
    return out


# --- gates: dependencies and begin time ---------------------------------------------------

FAILED_ENDS = ("failed", "cancelled", "rejected")
#: A dependency that waits on a failed dependency of its own.
BLOCKED = "blocked"


def gate_codes(spec: JobSpec, unmet: list[tuple[str, str]], now: float) -> list[str]:
    """The codes ``gate_reasons`` would give, without writing their details."""
    codes = ["dependency_failed" if status in FAILED_ENDS or status == BLOCKED else "dependency"
             for _, status in unmet]
    if spec.begin_at is not None and spec.begin_at > now:
        codes.append("begin_time")
    return codes


def gate_reasons(spec: JobSpec, unmet: list[tuple[str, str]], now: float) -> list[Reason]:
    """Why a job is not yet in the queue: each unmet dependency (id, status), its begin time."""
    out = []
    for dep, status in unmet:
        if status in FAILED_ENDS:
            out.append(Reason("dependency_failed", f"dependency {dep} {status}; retry it or "
                                                   "cancel this job"))
        elif status == BLOCKED:
            out.append(Reason("dependency_failed", f"dependency {dep} waits on a failed job"))
        else:
            out.append(Reason("dependency", f"waits for {dep} ({status})"))
    if spec.begin_at is not None and spec.begin_at > now:
        when = datetime.datetime.fromtimestamp(spec.begin_at, datetime.UTC)
        out.append(Reason("begin_time", f"not before {when.isoformat(timespec='seconds')} "
                                        f"({relative(spec.begin_at, now)})"))
    return out
