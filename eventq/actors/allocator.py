"""The allocator: the single owner of which GPU is held by which attempt.

Its state is folded only from events (``GpuTable.evolve``); ``decide_allocate``
and ``decide_release`` are pure. The actor runs decide and append in one step
with no await between them, so two requests can never be granted the same GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import msgspec

from eventq import events as ev
from eventq.actors.runtime import Actor
from eventq.log import EventLog, Record
from eventq.policy import NodeView

Holder = tuple[str, int]  # (job id, attempt)


@dataclass
class NodeGpus:
    gpus: dict[int, ev.GpuInfo]
    simulated: bool
    nvml_error: str | None
    local: bool
    held: dict[int, Holder] = field(default_factory=dict)


_GPU_EVENTS = frozenset({ev.NodeInventoryReported, ev.GpusAllocated, ev.GpusReleased,
                         ev.LimitsChanged, ev.WorkerRemoved})


@dataclass
class GpuTable:
    """Every node's GPUs and who holds each one."""

    READS: ClassVar[frozenset[type]] = _GPU_EVENTS
    #: Each event type's step, for the log to call straight (``eventq.log.Fold``).
    STEPS: ClassVar[dict[type, Callable[[GpuTable, Any, Record], None]]]

    nodes: dict[str, NodeGpus] = field(default_factory=dict)
    busy_percent: float = ev.UNRECORDED_LIMITS.gpu_busy_memory_percent
    #: Attempt -> the nodes it was allocated GPUs on (what it still holds is in ``held``):
    #: a release finds them without a walk over 10,000 workers.
    holdings: dict[Holder, list[str]] = field(default_factory=dict)

    def evolve(self, record: Record) -> None:
        # By exact type: a whole start passes every allocation and release through here.
        step = _STEPS.get(type(record.event))
        if step is not None:
            step(self, record.event, record)

    def _inventory(self, e: ev.NodeInventoryReported, _r: Record) -> None:
        old = self.nodes.get(e.node)
        self.nodes[e.node] = NodeGpus({g.index: g for g in e.gpus}, e.simulated,
                                      e.nvml_error, e.node == "local",
                                      old.held if old else {})

    def _allocated(self, e: ev.GpusAllocated, _r: Record) -> None:
        node, holder = self.nodes[e.node], (e.job_id, e.attempt)
        for gpu in e.gpus:
            node.held[gpu] = holder
        where = self.holdings.get(holder)
        if where is None:
            self.holdings[holder] = [e.node]
        elif e.node not in where:
            where.append(e.node)

    def _released(self, e: ev.GpusReleased, _r: Record) -> None:
        held, holder = self.nodes[e.node].held, (e.job_id, e.attempt)
        for gpu in e.gpus:
            if held.get(gpu) == holder:
                del held[gpu]
        if not self._holds_any(holder):
            self.holdings.pop(holder, None)

    def _holds_any(self, holder: Holder) -> bool:
        """Does the attempt still hold a GPU anywhere? (``held_by`` without its lists.)"""
        for name in self.holdings.get(holder, ()):
            node = self.nodes.get(name)
            if node is not None and holder in node.held.values():
                return True
        return False

    def _limits(self, e: ev.LimitsChanged, _r: Record) -> None:
        self.busy_percent = e.limits.gpu_busy_memory_percent

    def _worker_removed(self, e: ev.WorkerRemoved, _r: Record) -> None:
        self.nodes.pop(e.worker_id, None)

    def allocatable(self, node: str) -> set[int]:
        """GPUs eventq may use on ``node``: held by eventq, or not busy with foreign work."""
        n = self.nodes[node]
        return {i for i, g in n.gpus.items()
                if i in n.held or g.foreign_memory_percent <= self.busy_percent}

    def free(self, node: str) -> set[int]:
        return self.allocatable(node) - self.nodes[node].held.keys()

    def held_by(self, job_id: str, attempt: int) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for name in self.holdings.get((job_id, attempt), ()):
            node = self.nodes.get(name)  # gone with its worker: nothing held there
            gpus = sorted(g for g, h in node.held.items() if h == (job_id, attempt)) \
                if node is not None else []
            if gpus:
                out[name] = gpus
        return out

    def views(self) -> list[NodeView]:
        return [NodeView(name, n.local, self.free(name), len(self.allocatable(name)))
                for name, n in self.nodes.items()]

    def snapshot(self) -> dict[str, object]:
        return {name: {"gpus": sorted(n.gpus), "held": dict(sorted(n.held.items()))}
                for name, n in sorted(self.nodes.items())}


class Allocate(msgspec.Struct, frozen=True):
    job_id: str
    attempt: int
    node: str
    count: int
    device_ids: list[int] | None = None
    any_gpu: bool = False


class Release(msgspec.Struct, frozen=True):
    job_id: str
    attempt: int
    reason: Literal["ended", "orphaned"] = "ended"


_STEPS: dict[type, Callable[[GpuTable, Any, Record], None]] = {
    ev.NodeInventoryReported: GpuTable._inventory, ev.GpusAllocated: GpuTable._allocated,
    ev.GpusReleased: GpuTable._released, ev.LimitsChanged: GpuTable._limits,
    ev.WorkerRemoved: GpuTable._worker_removed}
GpuTable.STEPS = _STEPS


class ReportInventory(msgspec.Struct, frozen=True):
    node: str
    gpus: list[ev.GpuInfo]
    simulated: bool
    nvml_error: str | None = None


AllocatorMsg = Allocate | Release | ReportInventory


def decide_allocate(table: GpuTable, cmd: Allocate) -> ev.GpusAllocated | None:
    """Pick exactly ``count`` free GPUs (preferred ids first), or None if they are not free."""
    if cmd.node not in table.nodes:
        return None
    free = table.free(cmd.node)
    preferred = [g for g in cmd.device_ids or [] if g in free]
    if cmd.device_ids and not cmd.any_gpu and len(preferred) < len(cmd.device_ids):
        return None
    chosen = (preferred + sorted(free - set(preferred)))[: cmd.count]
    if len(chosen) < cmd.count:
        return None
    return ev.GpusAllocated(job_id=cmd.job_id, attempt=cmd.attempt, node=cmd.node,
                            gpus=sorted(chosen))


def decide_release(table: GpuTable, cmd: Release) -> list[ev.GpusReleased]:
    return [ev.GpusReleased(job_id=cmd.job_id, attempt=cmd.attempt, node=node, gpus=gpus,
                            reason=cmd.reason)
            for node, gpus in table.held_by(cmd.job_id, cmd.attempt).items()]


def decide_inventory(table: GpuTable, cmd: ReportInventory) -> ev.NodeInventoryReported | None:
    """Record an inventory only when what can be allocated changes (the log stays bounded).

    Memory use moves all the time; only crossing the busy threshold matters.
    """
    def signature(gpus: list[ev.GpuInfo]) -> list[tuple[int, str, float, bool]]:
        return sorted((g.index, g.name, g.memory_gb,
                       g.foreign_memory_percent > table.busy_percent) for g in gpus)

    current = table.nodes.get(cmd.node)
    if current is not None and current.simulated == cmd.simulated \
            and current.nvml_error == cmd.nvml_error \
            and signature(list(current.gpus.values())) == signature(cmd.gpus):
        return None
    return ev.NodeInventoryReported(node=cmd.node, gpus=cmd.gpus, simulated=cmd.simulated,
                                    nvml_error=cmd.nvml_error)


class Allocator(Actor[AllocatorMsg]):
    """Answers Allocate with the GpusAllocated event (or None) and Release with releases."""

    name = "allocator"

    def __init__(self, log: EventLog, table: GpuTable) -> None:
        super().__init__()
        self.log, self.table = log, table

    async def receive(self, message: AllocatorMsg) -> object:
        if isinstance(message, Allocate):
            granted = decide_allocate(self.table, message)
            if granted is not None:
                self.log.append("system", [granted])
            return granted
        if isinstance(message, Release):
            released = decide_release(self.table, message)
            if released:
                self.log.append("system", released)
            return released
        inventory = decide_inventory(self.table, message)
        if inventory is not None:
            self.log.append("system", [inventory])
        return inventory
