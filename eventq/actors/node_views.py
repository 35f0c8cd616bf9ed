"""Placement views of the nodes, kept between decisions and rebuilt only where events
touched them: a fleet of a thousand workers costs a decision nothing extra."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from eventq import events as ev
from eventq.actors.allocator import GpuTable
from eventq.actors.scheduler_state import SchedulerState
from eventq.actors.workers_state import Workers
from eventq.log import Record
from eventq.policy import NodeView

_BY_NODE = (ev.NodeInventoryReported, ev.GpusAllocated, ev.GpusReleased, ev.AttemptDispatched)
_BY_WORKER = (ev.WorkerCreated, ev.WorkerConnected, ev.WorkerDraining, ev.WorkerLost,
              ev.WorkerRemoved, ev.WorkerTokenRotated)


class NodeViews:
    """Read-only inputs of the policy, per node; only nodes an event names are rebuilt."""

    READS: ClassVar[frozenset[type]] = frozenset({*_BY_NODE, ev.AttemptEnded, *_BY_WORKER,
                                                  ev.LimitsChanged})

    def __init__(self, state: SchedulerState, gpu_table: GpuTable) -> None:
        self.state, self.gpu_table = state, gpu_table
        self.workers: Workers | None = None
        self._views: dict[str, NodeView | None] = {}
        self._dirty: set[str] = set()
        self._all = True

    def evolve(self, record: Record) -> None:
        self._mark(record.event, record)

    def _mark(self, e: ev.Event, record: Record) -> None:
        """Mark what changed; the rebuild waits for the next decision."""
        if self._all:  # every node is rebuilt anyway (as through a whole start's replay)
            return
        if isinstance(e, _BY_NODE):
            self._dirty.add(e.node)
        elif isinstance(e, ev.AttemptEnded):
            job = self.state.jobs.get(e.job_id)
            if job is not None and job.node:
                self._dirty.add(job.node)
        elif isinstance(e, _BY_WORKER):
            self._dirty.add(e.worker_id)
        elif isinstance(e, ev.LimitsChanged):
            self._all = True  # the busy threshold changes what is allocatable everywhere

    #: Each event type's step, for the log to call straight (``eventq.log.Fold``).
    STEPS: ClassVar[dict[type, Callable[[NodeViews, Any, Record], None]]] = dict.fromkeys(
        READS, _mark)

    def current(self) -> list[NodeView]:
        if self._all:
            self._dirty |= set(self.gpu_table.nodes) | set(self._views)
            self._all = False
        for name in self._dirty:
            view = self._build(name)
            if view is None and name not in self.gpu_table.nodes:
                self._views.pop(name, None)
            else:
                self._views[name] = view
        self._dirty.clear()
        return [v for v in self._views.values() if v is not None]

    def _build(self, name: str) -> NodeView | None:
        """The node's view, or None when it may take no attempt (gone, offline, draining)."""
        node = self.gpu_table.nodes.get(name)
        if node is None:
            return None
        worker = None if node.local or self.workers is None else self.workers.by_id.get(name)
        if not node.local and (worker is None or self.workers is None
                               or not self.workers.placeable(name)):
            return None
        allocatable = self.gpu_table.allocatable(name)
        active = self.state.node_active.get(name, {})
        view = NodeView(name, node.local, allocatable - node.held.keys(), len(allocatable),
                        [(end, gpus, job_id) for job_id, (end, gpus) in active.items()])
        if worker is not None:
            view.labels, view.max_jobs = worker.labels, worker.max_jobs
            view.accepts_until = worker.accepts_until
            idle = max(worker.since, self.state.node_idle_since.get(name, 0.0))
            view.idle_since = None if active else idle
        return view
