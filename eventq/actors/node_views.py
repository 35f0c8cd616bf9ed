"""Placement views of the nodes, kept between decisions and rebuilt only where events
touched them, with the order placement tries them in: a fleet of 10,000 workers costs a
decision nothing per worker."""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Callable
from typing import Any, ClassVar

from eventq import events as ev
from eventq.actors.allocator import GpuTable
from eventq.actors.scheduler_state import SchedulerState
from eventq.actors.workers_state import Workers
from eventq.log import Record
from eventq.policy import NodeOrder, NodeView, local_order, node_order

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
        #: The views that are not None, in ``_views``' order, and each one's position.
        self._list: list[NodeView] = []
        self._at: dict[str, int] = {}
        self.order = NodeOrder([], [], [])

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
        """The views (read-only, valid until the next call) in the order of ``order``'s
        positions; a change that keeps the same nodes moves one node in the order."""
        if self._all:
            self._dirty |= set(self.gpu_table.nodes) | set(self._views)
            self._all = False
        joined_or_left = False
        for name in self._dirty:
            view = self._build(name)
            if view is None and name not in self.gpu_table.nodes:
                self._views.pop(name, None)
            else:
                self._views[name] = view
            if (view is None) != (name not in self._at):
                joined_or_left = True
            elif view is not None and not joined_or_left:
                self._replace(self._at[name], view)
        self._dirty.clear()
        if joined_or_left:
            self._list = [v for v in self._views.values() if v is not None]
            self._at = {v.name: i for i, v in enumerate(self._list)}
            self.order = node_order(self._list)
        return self._list

    def _replace(self, at: int, view: NodeView) -> None:
        old, self._list[at] = self._list[at], view
        order = self.order
        if view.local:
            order.local[:] = local_order(self._list, order.local)
            return
        if old.idle_since is None:
            del order.busy[bisect_left(order.busy, at)]
        else:
            del order.idle[bisect_left(order.idle, (old.idle_since, at))]
        if view.idle_since is None:
            insort(order.busy, at)
        else:
            insort(order.idle, (view.idle_since, at))

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
