"""Remote workers as the registry knows them, folded from events.

Liveness (the time of the last heartbeat) is kept beside the fold, in memory: a
heartbeat that changes nothing is not an event, so the log stays bounded.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from eventq import events as ev
from eventq.auth import TokenIndex
from eventq.log import Record


class WorkerStatus(enum.StrEnum):
    """What a worker is doing, as ``GET /api/admin/workers`` shows it."""

    CONNECTING = "connecting"  #: created, or known from before a restart; not yet heard from
    IDLE = "idle"  #: connected, running nothing
    BUSY = "busy"  #: connected, running at least one attempt
    DRAINING = "draining"  #: finishing its attempts; takes no new one
    OFFLINE = "offline"  #: lost or gone


@dataclass
class Worker:
    worker_id: str
    name: str
    worker_type: str
    admin_labels: dict[str, str]
    token_sha256: str
    created_at: float
    online: bool = False
    draining: bool = False
    transport: str | None = None
    reported_labels: dict[str, str] = field(default_factory=dict)
    max_jobs: int | None = None
    accepts_until: float | None = None
    #: When it came online or last lost, for "idle longest" and ephemeral clean-up.
    since: float = 0.0
    offline_reason: str | None = None
    #: Attempts ever dispatched to it (an ephemeral worker takes one).
    jobs_taken: int = 0
    #: The provider (``slurm``) that started it for one allocation, if any.
    provider: str | None = None

    @property
    def one_job(self) -> bool:
        """An ephemeral worker an admin made runs one job; a provider's runs jobs for as long
        as its allocation lasts (its idle timeout and time budget end it)."""
        return self.worker_type == "ephemeral" and self.provider is None

    @property
    def labels(self) -> dict[str, str]:
        """Reported labels merged under the admin's: the admin's always win."""
        return {**self.reported_labels, **self.admin_labels}


_WORKER_EVENTS = frozenset({ev.WorkerCreated, ev.WorkerTokenRotated, ev.WorkerConnected,
                            ev.WorkerDraining, ev.WorkerLost, ev.WorkerRemoved})


@dataclass
class Workers:
    READS: ClassVar[frozenset[type]] = _WORKER_EVENTS | {ev.AttemptDispatched}

    by_id: dict[str, Worker] = field(default_factory=dict)
    #: Worker name -> id: a name is taken or not without a walk over the fleet.
    by_name: dict[str, str] = field(default_factory=dict)
    #: Each worker's token hash -> its id.
    tokens: TokenIndex = field(default_factory=TokenIndex)

    def _dispatched(self, e: ev.AttemptDispatched, record: Record) -> None:
        taker = self.by_id.get(e.node)
        if taker is not None:
            taker.jobs_taken += 1

    #: Each event type's step, for the log to call straight (``eventq.log.Fold``): the one
    #: a start passes 100,000s of; the rest go through ``evolve``.
    STEPS: ClassVar[dict[type, Callable[[Workers, Any, Record], None]]] = {
        ev.AttemptDispatched: _dispatched}

    def evolve(self, record: Record) -> None:
        e, t = record.event, record.time
        if type(e) is ev.AttemptDispatched:
            self._dispatched(e, record)
            return
        if type(e) not in _WORKER_EVENTS:
            return
        if isinstance(e, ev.WorkerCreated):
            self.by_id[e.worker_id] = Worker(e.worker_id, e.name, e.worker_type, dict(e.labels),
                                             e.token_sha256, created_at=t, since=t,
                                             provider=e.provider)
            self.by_name[e.name] = e.worker_id
            self.tokens.add(e.token_sha256, e.worker_id)
            return
        worker = self.by_id.get(ev.event_worker_id(e) or "")
        if worker is None:
            return
        if isinstance(e, ev.WorkerTokenRotated):
            self.tokens.discard(worker.token_sha256)
            worker.token_sha256 = e.token_sha256
            self.tokens.add(e.token_sha256, worker.worker_id)
        elif isinstance(e, ev.WorkerConnected):
            worker.online, worker.transport, worker.since = True, e.transport, t
            worker.reported_labels, worker.max_jobs = dict(e.labels), e.max_jobs
            worker.accepts_until = e.accepts_until
            worker.offline_reason = None
        elif isinstance(e, ev.WorkerDraining):
            worker.draining = True
        elif isinstance(e, ev.WorkerLost):
            worker.online, worker.since, worker.offline_reason = False, t, e.reason
        elif isinstance(e, ev.WorkerRemoved):
            self.tokens.discard(worker.token_sha256)
            if self.by_name.get(worker.name) == worker.worker_id:
                del self.by_name[worker.name]
            del self.by_id[e.worker_id]

    def by_token(self, digest: str) -> Worker | None:
        """The worker a token hash belongs to (``TokenIndex.find``): a worker's connection
        costs the same with 10 workers or 10,000."""
        worker_id = self.tokens.find(digest)
        return None if worker_id is None else self.by_id.get(worker_id)

    def placeable(self, worker_id: str) -> bool:
        """May new attempts be placed on this node?"""
        worker = self.by_id.get(worker_id)
        return worker is not None and worker.online and not worker.draining \
            and not (worker.one_job and worker.jobs_taken)

    def status(self, worker_id: str, active_jobs: int) -> WorkerStatus:
        worker = self.by_id[worker_id]
        if not worker.online and worker.offline_reason:
            return WorkerStatus.OFFLINE
        if worker.draining:
            return WorkerStatus.DRAINING
        if not worker.online:
            return WorkerStatus.CONNECTING
        return WorkerStatus.BUSY if active_jobs else WorkerStatus.IDLE
