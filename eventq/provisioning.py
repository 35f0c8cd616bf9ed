"""How many workers to ask a batch system for, and which of those asked are no longer needed:
pure functions of the queue, the nodes and the open requests (no I/O, no clock).

What it promises (SPEC 12): workers are asked only for waiting jobs that no connected worker
can take and that a new worker could (target, labels, GPUs, time budget), and only as many as
those jobs need, packed as the policy itself would place them; a task asked for and not yet
connected counts as the worker it will be, so a demand is never asked twice while its request
waits; and the provider's workers never number more than its ``max_workers``. It uses the
scheduling policy (``eventq.policy.plan``) unchanged, so limits and priorities hold as they
hold for real nodes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from eventq import events as ev
from eventq.actors.requests_state import Request, Requests, Task, TaskState
from eventq.events import JobSpec, Limits, Reason
from eventq.policy import (
    Counts,
    NodeView,
    Waiting,
    expected_runtime,
    fits_budget,
    matches,
    plan,
)
from eventq.provider import Observed, Offer, Sighting

#: Reasons that a new worker cannot lift.
LIMIT_CODES = frozenset({"global_limit", "user_limit", "team_limit"})
#: Names of the workers a plan imagines; no worker id or ``local`` looks like them.
NEW = "+new"


@dataclass
class Demand:
    """What the queue needs of the provider now."""

    #: Workers to ask for now, and the jobs they are for.
    new_workers: int = 0
    for_jobs: list[str] = field(default_factory=list)
    #: Tasks still waiting in the batch system that no job needs any more.
    surplus: list[Task] = field(default_factory=list)
    #: What the provider is doing for each job it serves (a ``no_worker`` reason).
    notes: dict[str, Reason] = field(default_factory=dict)


@dataclass(frozen=True)
class Queue:
    """The scheduler's view, as the policy reads it."""

    waiting: Callable[[], Iterator[Waiting]]
    counts: Counts
    limits: Limits
    #: Nodes that may take attempts now (local, connected workers).
    nodes: list[NodeView]
    now: float


def worker_view(name: str, offer: Offer, now: float) -> NodeView:
    """A worker of the offer, as it will be when it connects."""
    until = None if offer.budget is None else now + offer.budget
    return NodeView(name, False, set(range(offer.gpus)), offer.gpus, labels=dict(offer.labels),
                    accepts_until=until)


def coming(requests: Requests, present: set[str]) -> list[Task]:
    """Tasks whose worker may still come: asked for, not cancelled, and neither connected
    nor connected once and lost since (those already started first, then the oldest)."""
    tasks = [t for t in requests.open_tasks()
             if t.cancelled is None and t.worker_id not in present]
    return sorted(tasks, key=lambda t: (t.state is not TaskState.RUNNING, t.since, t.index))


def assess(queue: Queue, requests: Requests, present: set[str], offer: Offer,
           held: Reason | None = None) -> Demand:
    """The demand now. ``present``: workers connected now, or once (a worker lost is no
    worker to wait for); ``held``: why no request may be made now (a failure's backoff),
    said to the jobs that wait for one instead."""
    tasks = {t.worker_id: t for t in coming(requests, present)}
    expected = [worker_view(w, offer, queue.now) for w in tasks]
    specs: dict[str, JobSpec] = {}
    first = plan(_noting(queue.waiting(), specs), queue.counts, queue.limits,
                 queue.nodes + expected, queue.now)
    demand = Demand()
    served = {p.node for p in first.placements if p.node in tasks}
    for p in first.placements:
        if p.node in tasks:
            demand.notes[p.job_id] = task_note(requests.request_of(tasks[p.node]),
                                               tasks[p.node], offer)
    demand.surplus = [t for w, t in tasks.items()
                      if w not in served and t.state is TaskState.PENDING]
    fresh = worker_view(NEW, offer, queue.now)
    wanting = []
    for job_id, reasons in first.reasons.items():
        spec = specs[job_id]
        if LIMIT_CODES & {r.code for r in reasons} or not matches(spec, fresh):
            continue
        note = misfit(spec, fresh, offer, queue.now)
        if note is not None:
            demand.notes[job_id] = note
        else:
            wanting.append(job_id)
    if wanting:
        _ask(demand, queue, requests, expected, offer, wanting, held)
    return demand


def _ask(demand: Demand, queue: Queue, requests: Requests, expected: list[NodeView],
         offer: Offer, wanting: list[str], held: Reason | None) -> None:
    """Place the jobs that want a worker on as few new ones as the policy packs them on."""
    room = offer.max_workers - len(requests.open_tasks())
    if held is not None or room <= 0:
        note = held or Reason("no_worker", f"{offer.name}: {len(requests.open_tasks())} of "
                                           f"{offer.max_workers} workers asked for "
                                           f"({offer.max_source})")
        demand.notes.update((job_id, note) for job_id in wanting)
        return
    extra = [worker_view(f"{NEW}{i}", offer, queue.now) for i in range(min(room, len(wanting)))]
    second = plan(queue.waiting(), queue.counts, queue.limits, queue.nodes + expected + extra,
                  queue.now)
    on_new = [p for p in second.placements if p.node.startswith(NEW)]
    demand.new_workers = len({p.node for p in on_new})
    demand.for_jobs = [p.job_id for p in on_new]
    asking = Reason("no_worker", f"{offer.name}: asking for a worker")
    demand.notes.update((job_id, asking) for job_id in demand.for_jobs)
    if len(extra) == room:  # jobs left over wait for the cap
        left = set(wanting) - set(demand.for_jobs) - {p.job_id for p in second.placements}
        capped = Reason("no_worker", f"{offer.name}: {offer.max_workers} of "
                                     f"{offer.max_workers} workers asked for "
                                     f"({offer.max_source})")
        demand.notes.update((job_id, capped) for job_id in left
                            if LIMIT_CODES.isdisjoint(r.code for r in
                                                      second.reasons.get(job_id, [])))


def could_serve(spec: JobSpec, offer: Offer, now: float) -> bool:
    """Could a new worker of the offer take this job (target, labels, GPUs, time budget)?"""
    fresh = worker_view(NEW, offer, now)
    return matches(spec, fresh) and misfit(spec, fresh, offer, now) is None


def misfit(spec: JobSpec, worker: NodeView, offer: Offer, now: float) -> Reason | None:
    """Why a new worker of the offer could not take the job, if it could not."""
    if spec.gpus > offer.gpus:
        return Reason("no_worker", f"{offer.name} workers have {offer.gpus} GPUs "
                                   f"({offer.gpus_source}); the job needs {spec.gpus}")
    if not fits_budget(spec, worker, now):
        runtime = expected_runtime(spec)
        need = "an unknown time (give it max_runtime or estimated_runtime)" \
            if runtime is None else f"{runtime:.0f}s"
        return Reason("no_worker", f"{offer.name} workers have {offer.budget or 0:.0f}s for "
                                   f"jobs ({offer.budget_source}); the job needs {need}")
    return None


def task_note(request: Request, task: Task, offer: Offer) -> Reason:
    """What the provider is doing for a job one of its tasks will serve."""
    name = f"{offer.name} job {request.task_name(task)}"
    if task.state is TaskState.REQUESTED:
        return Reason("no_worker", f"{offer.name}: asking for a worker")
    if task.state is TaskState.RUNNING:
        where = f" on node {task.node}" if task.node else ""
        return Reason("no_worker", f"{name} starting{where}")
    return Reason("no_worker", f"{name} pending: {task.detail or 'queued'}")


def _noting(waiting: Iterator[Waiting], specs: dict[str, JobSpec]) -> Iterator[Waiting]:
    for job in waiting:
        specs[job.spec.job_id] = job.spec
        yield job


def observed_changes(requests: list[Request], seen: dict[str, Sighting]) -> list[ev.Event]:
    """What the batch system's answer changes: a request a crash left without its batch id
    is found by its name (or judged never submitted), and each task whose state, reason or
    node moved is recorded. A task the batch system no longer lists has ended."""
    out: list[ev.Event] = []
    for request in requests:
        sighting = seen.get(request.request_id)
        if request.batch_id is None:
            if sighting is None:
                out.append(ev.WorkersRequestFailed(
                    request_id=request.request_id,
                    error="not in the batch system's queue after a restart: never submitted"))
                continue
            out.append(ev.WorkersRequestSubmitted(request_id=request.request_id,
                                                  batch_id=sighting.batch_id))
        for task in request.tasks:
            if task.state is TaskState.ENDED:
                continue
            now = _task_seen(sighting, task.index)
            if (now.state, now.detail, now.node) != (task.state.value, task.detail, task.node):
                out.append(ev.RequestedWorkerChanged(request_id=request.request_id,
                                                     task=task.index, state=now.state,
                                                     detail=now.detail, node=now.node))
    return out


def _task_seen(sighting: Sighting | None, index: int) -> Observed:
    if sighting is not None:
        found = sighting.tasks.get(index) or sighting.others
        if found is not None:
            return found
    return Observed("ended", "no longer listed")
