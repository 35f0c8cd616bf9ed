"""Requests for workers made of a batch system, folded from events.

A request is one array job; each of its tasks starts one worker, created before the request
left. A task stays here until its worker is removed, so the provisioner always knows which
worker records are still its own to end and remove.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import ClassVar

from eventq import events as ev
from eventq.log import Record


class TaskState(enum.StrEnum):
    """What is known of one task of a request."""

    REQUESTED = "requested"  #: recorded; the batch system has not said it took it (yet)
    PENDING = "pending"  #: waiting in the batch system's queue
    RUNNING = "running"  #: started on a node: its worker connects, or has
    ENDED = "ended"  #: over, whatever the way: its worker will not come (back)


@dataclass
class Task:
    request_id: str
    index: int
    worker_id: str
    since: float
    state: TaskState = TaskState.REQUESTED
    #: The batch system's reason while pending, its state once ended.
    detail: str = ""
    node: str | None = None
    #: Why eventq cancelled it, once it did.
    cancelled: str | None = None


@dataclass
class Request:
    request_id: str
    provider: str
    for_jobs: tuple[str, ...]
    requested_at: float
    tasks: list[Task]
    batch_id: str | None = None

    def task_name(self, task: Task) -> str:
        """How the batch system names the task: ``123_4``."""
        return f"{self.batch_id or '?'}_{task.index}"


_READS = frozenset({ev.WorkersRequested, ev.WorkersRequestSubmitted, ev.WorkersRequestFailed,
                    ev.RequestedWorkerChanged, ev.RequestedWorkersCancelled,
                    ev.WorkerRemoved})


@dataclass
class Requests:
    READS: ClassVar[frozenset[type]] = _READS

    by_id: dict[str, Request] = field(default_factory=dict)
    #: worker id -> the task it starts as.
    by_worker: dict[str, Task] = field(default_factory=dict)

    def evolve(self, record: Record) -> None:
        e, t = record.event, record.time
        if isinstance(e, ev.WorkersRequested):
            tasks = [Task(e.request_id, i, w, t) for i, w in enumerate(e.workers)]
            self.by_id[e.request_id] = Request(e.request_id, e.provider, tuple(e.for_jobs), t,
                                               tasks)
            self.by_worker.update((task.worker_id, task) for task in tasks)
        elif isinstance(e, ev.WorkerRemoved):
            self._forget(e.worker_id)
        elif (request := self.by_id.get(getattr(e, "request_id", ""))) is not None:
            self._apply(request, e, t)

    def _apply(self, request: Request, e: ev.Event, t: float) -> None:
        if isinstance(e, ev.WorkersRequestSubmitted):
            request.batch_id = e.batch_id
            for task in request.tasks:
                if task.state is TaskState.REQUESTED:
                    task.state, task.since = TaskState.PENDING, t
        elif isinstance(e, ev.WorkersRequestFailed):
            for task in request.tasks:
                task.state, task.detail, task.since = TaskState.ENDED, "refused", t
        elif isinstance(e, ev.RequestedWorkerChanged) and e.task < len(request.tasks):
            task = request.tasks[e.task]
            task.state, task.detail, task.node = TaskState(e.state), e.detail, e.node
            task.since = t
        elif isinstance(e, ev.RequestedWorkersCancelled):
            for index in e.tasks:
                if index < len(request.tasks):
                    request.tasks[index].cancelled = e.reason

    def _forget(self, worker_id: str) -> None:
        task = self.by_worker.pop(worker_id, None)
        if task is None:
            return
        request = self.by_id[task.request_id]
        if all(t.worker_id not in self.by_worker for t in request.tasks):
            del self.by_id[task.request_id]

    def tasks(self) -> list[Task]:
        return list(self.by_worker.values())

    def open_tasks(self) -> list[Task]:
        """Tasks that hold, or may yet hold, a place in the batch system."""
        return [t for t in self.by_worker.values() if t.state is not TaskState.ENDED]

    def request_of(self, task: Task) -> Request:
        return self.by_id[task.request_id]
