"""What a batch system did while one job waited, told from the provider's events: for
``eventq replay why`` ("waited 40 s for Slurm to start a worker on gpu07")."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from eventq import events as ev
from eventq.cli.output import duration

#: The provider's events, and the connections that show when its workers came.
READS = (ev.WorkersRequested, ev.WorkersRequestSubmitted, ev.WorkersRequestFailed,
         ev.RequestedWorkerChanged, ev.RequestedWorkersCancelled, ev.WorkerConnected)


@dataclass
class Asked:
    """One request, as far as the story needs it."""

    provider: str
    asked_at: float
    for_jobs: tuple[str, ...]
    workers: list[str]
    batch_id: str | None = None
    #: task -> (state, detail, node)
    tasks: dict[int, tuple[str, str, str | None]] = field(default_factory=dict)

    def task_name(self, task: int) -> str:
        return f"{self.batch_id or '?'}_{task}"


@dataclass
class Provisions:
    """Every request, and the steps of those made for ``job_id``."""

    job_id: str
    asked: dict[str, Asked] = field(default_factory=dict)
    #: worker id -> (request id, task)
    tasks_of: dict[str, tuple[str, int]] = field(default_factory=dict)
    #: worker id -> when it first connected, and the node it said it runs on
    came: dict[str, tuple[float, str | None]] = field(default_factory=dict)
    #: The worker each dispatch went to, when a provider started it.
    waits: list[dict[str, Any]] = field(default_factory=list)

    def step(self, e: ev.Event, t: float) -> tuple[str, str] | None:
        """(provider, what it did) when ``e`` is a step of a request made for this job."""
        if isinstance(e, ev.WorkersRequested):
            self.asked[e.request_id] = Asked(e.provider, t, tuple(e.for_jobs), list(e.workers))
            self.tasks_of.update((w, (e.request_id, i)) for i, w in enumerate(e.workers))
            return self._mine(e.request_id, f"asked for {len(e.workers)} worker"
                              f"{'s' if len(e.workers) > 1 else ''} (request {e.request_id}: "
                              f"{e.asks})")
        if isinstance(e, ev.WorkerConnected):
            if e.worker_id in self.tasks_of:
                self.came.setdefault(e.worker_id, (t, e.labels.get(f"{self._provider(e)}_node")))
            return None
        asked = self.asked.get(getattr(e, "request_id", ""))
        if asked is None:
            return None
        request_id: str = getattr(e, "request_id", "")
        return self._mine(request_id, self._told(asked, e, t))

    def _told(self, asked: Asked, e: ev.Event, t: float) -> str:
        if isinstance(e, ev.WorkersRequestSubmitted):
            asked.batch_id = e.batch_id
            return f"submitted as {asked.provider} job {e.batch_id}"
        if isinstance(e, ev.WorkersRequestFailed):
            return f"the request failed: {e.error}"
        if isinstance(e, ev.RequestedWorkersCancelled):
            names = ", ".join(asked.task_name(i) for i in e.tasks)
            return f"cancelled {asked.provider} job {names}: {e.reason}"
        assert isinstance(e, ev.RequestedWorkerChanged)
        asked.tasks[e.task] = (e.state, e.detail, e.node)
        name = f"{asked.provider} job {asked.task_name(e.task)}"
        if e.state == "pending":
            return f"{name} pending: {e.detail}"
        if e.state == "running":
            return f"{name} started on node {e.node or '?'}, " \
                   f"{duration(t - asked.asked_at)} after the request"
        return f"{name} ended ({e.detail})"

    def _provider(self, e: ev.WorkerConnected) -> str:
        return self.asked[self.tasks_of[e.worker_id][0]].provider

    def _mine(self, request_id: str, detail: str) -> tuple[str, str] | None:
        asked = self.asked[request_id]
        return (asked.provider, detail) if self.job_id in asked.for_jobs else None

    def dispatched(self, node: str, t: float) -> str:
        """How the worker a dispatch went to came, if a provider started it."""
        found = self.tasks_of.get(node)
        if found is None:
            return ""
        asked, task = self.asked[found[0]], found[1]
        came, said = self.came.get(node, (t, None))
        where = said or asked.tasks.get(task, ("", "", None))[2]
        self.waits.append({"provider": asked.provider, "request_id": found[0],
                           "task": asked.task_name(task), "node": where,
                           "seconds": came - asked.asked_at,
                           "for_this_job": self.job_id in asked.for_jobs})
        return f", the worker {asked.provider} started as job {asked.task_name(task)}" + \
            (f" on {where}" if where else "")

    def pending(self) -> list[str]:
        """What the requests made for this job are still waiting for."""
        out = []
        for asked in self.asked.values():
            if self.job_id not in asked.for_jobs:
                continue
            for task, (state, detail, _) in sorted(asked.tasks.items()):
                if state == "pending":
                    out.append(f"{asked.provider} job {asked.task_name(task)} pending: {detail}")
        return out


def wait_line(wait: dict[str, Any]) -> str:
    """``waited 40s for Slurm to start a worker on gpu07 (slurm job 123_4)``."""
    where = f" on {wait['node']}" if wait["node"] else ""
    if not wait["for_this_job"]:
        # Asked for another waiting job; whichever worker connects first takes the queue's
        # head, so a job often runs on a worker another job's request brought.
        return (f"ran on a worker {wait['provider'].capitalize()} started{where} "
                f"({wait['provider']} job {wait['task']}, asked for another waiting job, "
                f"{duration(wait['seconds'])} from that request to its connection)")
    return (f"waited {duration(wait['seconds'])} for {wait['provider'].capitalize()} to start "
            f"a worker{where} ({wait['provider']} job {wait['task']}, from the request to "
            "its worker's connection)")
