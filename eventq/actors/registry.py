"""The registry: the single owner of users, workers, their tokens, and workers' liveness.

Tokens are random, made at the edge, shown once, and only their SHA-256 is recorded.
A heartbeat only moves a worker's last-seen time (in memory): the log records a
worker's changes of state, never its heartbeats. Asks flow registry -> scheduler ->
allocator, never back.

It keeps the orchestrator's half of the lease (``eventq.leases``): a worker's attempts are
given up, and may run elsewhere, only once a full offline timeout has passed since it was
last heard from, whatever the reason it is given up for. A silent worker is lost then; a
worker removed by force, and attempts a worker comes back without, are lost one timeout
after that, since the agent that holds them may still be running them until its lease
lapses.
"""

from __future__ import annotations

import re
import secrets
from typing import Literal

import msgspec

from eventq import events as ev
from eventq.actors.allocator import Allocator, ReportInventory
from eventq.actors.runtime import Actor
from eventq.actors.scheduler import (
    CommandError,
    NodeLost,
    NodeReconnected,
    Outcome,
    Process,
    Scheduler,
)
from eventq.actors.scheduler_state import TERMINAL
from eventq.actors.workers_state import Worker, Workers
from eventq.auth import Users, new_token, token_hash
from eventq.clock import Clock
from eventq.log import EventLog
from eventq.sessions import EndSession, OpenSession, Sessions, decide_session

NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")


class AddUser(msgspec.Struct, frozen=True):
    principal: str
    name: str
    level: ev.Level
    team: str | None = None


class UpdateUser(msgspec.Struct, frozen=True):
    principal: str
    name: str
    level: ev.Level
    team: str | None = None


class DeleteUser(msgspec.Struct, frozen=True):
    principal: str
    name: str


class IssueToken(msgspec.Struct, frozen=True):
    principal: str
    name: str


class RevokeTokens(msgspec.Struct, frozen=True):
    """Revoke one token (by its hash) or, with None, every token of the user."""

    principal: str
    name: str
    token_sha256: str | None = None


class CreateWorker(msgspec.Struct, frozen=True):
    principal: str
    name: str
    worker_type: Literal["ephemeral", "persistent"] = "persistent"
    labels: dict[str, str] = {}


class RotateWorkerToken(msgspec.Struct, frozen=True):
    principal: str
    worker_id: str
    #: Hand the new token to the live agent instead of closing its connection.
    keep_running: bool = False


class DrainWorker(msgspec.Struct, frozen=True):
    principal: str
    worker_id: str


class RemoveWorker(msgspec.Struct, frozen=True):
    principal: str
    worker_id: str
    force: bool = False


class WorkerHello(msgspec.Struct, frozen=True):
    """A worker (re)connects: its GPUs, its labels, and the attempts it still runs."""

    worker_id: str
    transport: Literal["ws", "sse"]
    gpus: list[ev.GpuInfo]
    simulated: bool
    labels: dict[str, str] = {}
    max_jobs: int | None = None
    running: list[tuple[str, int]] = []
    accepts_until: float | None = None


class WorkerGone(msgspec.Struct, frozen=True):
    """Offline now: a goodbye, a heartbeat timeout, or a forced removal."""

    worker_id: str
    reason: str


class CheckAlive(msgspec.Struct, frozen=True):
    worker_id: str


class NewWorker(msgspec.Struct, frozen=True):
    """One worker a provider will start, made before its request leaves."""

    worker_id: str
    name: str
    labels: dict[str, str]
    token_sha256: str


class CreateWorkers(msgspec.Struct, frozen=True):
    """Workers for the tasks of one request to a batch system (``provider``)."""

    principal: str
    provider: str
    workers: list[NewWorker]


class AllocationEnded(msgspec.Struct, frozen=True):
    """The batch system ended the allocation a provider's worker ran in: it is offline now,
    and whatever it still ran is given up once a lease it held has surely lapsed."""

    worker_id: str
    reason: str


class LoseAttempts(msgspec.Struct, frozen=True):
    """A lease held on these attempts (all of a node's if None) has surely lapsed."""

    node: str
    reason: str
    attempts: list[tuple[str, int]] | None = None


WorkerMsg = (CreateWorker | RotateWorkerToken | DrainWorker | RemoveWorker | WorkerHello
             | WorkerGone | CheckAlive | LoseAttempts | CreateWorkers | AllocationEnded)
RegistryMsg = AddUser | UpdateUser | DeleteUser | IssueToken | RevokeTokens | OpenSession \
    | EndSession | WorkerMsg


def decide_user(users: Users, cmd: AddUser | UpdateUser, digest: str) -> list[ev.Event]:
    if isinstance(cmd, AddUser):
        if not NAME.match(cmd.name):
            raise CommandError(422, f"user name {cmd.name!r} must be 1-64 of a-z 0-9 _ . -")
        if cmd.name in users.by_name:
            raise CommandError(409, f"user {cmd.name} already exists")
        return [ev.UserCreated(name=cmd.name, level=cmd.level, team=cmd.team,
                               token_sha256=digest)]
    if cmd.name not in users.by_name:
        raise CommandError(404, f"no user {cmd.name}")
    return [ev.UserUpdated(name=cmd.name, level=cmd.level, team=cmd.team)]


def decide_delete(users: Users, cmd: DeleteUser, unfinished: int) -> list[ev.Event]:
    """A user goes only once nothing of theirs waits or runs: their jobs would otherwise
    belong to no one who could act on them (as ``sacctmgr`` refuses while jobs are active)."""
    if cmd.name not in users.by_name:
        raise CommandError(404, f"no user {cmd.name}")
    if cmd.principal == users.by_name[cmd.name].principal:
        raise CommandError(409, "you cannot delete yourself; another admin can")
    if unfinished:
        raise CommandError(409, f"user {cmd.name} has {unfinished} unfinished "
                                f"job{'s' if unfinished > 1 else ''}; cancel them or let "
                                "them finish first")
    return [ev.UserDeleted(name=cmd.name)]


def decide_token(users: Users, cmd: IssueToken | RevokeTokens, digest: str) -> list[ev.Event]:
    if cmd.name not in users.by_name:
        raise CommandError(404, f"no user {cmd.name}")
    if isinstance(cmd, IssueToken):
        return [ev.TokenIssued(name=cmd.name, token_sha256=digest)]
    if cmd.token_sha256 is not None and users.tokens.get(cmd.token_sha256) != cmd.name:
        raise CommandError(404, f"user {cmd.name} has no such token")
    return [ev.TokenRevoked(name=cmd.name, token_sha256=cmd.token_sha256)]


def _worker(workers: Workers, worker_id: str) -> Worker:
    worker = workers.by_id.get(worker_id)
    if worker is None:
        raise CommandError(404, f"no worker {worker_id}")
    return worker


def decide_created(workers: Workers, cmd: CreateWorkers) -> list[ev.Event]:
    """A provider's workers: ephemeral, each with the token its task will derive."""
    taken = workers.by_name
    if clash := [w.name for w in cmd.workers if w.name in taken or w.worker_id in workers.by_id]:
        raise CommandError(409, f"workers named {clash} already exist")
    return [ev.WorkerCreated(worker_id=w.worker_id, name=w.name, worker_type="ephemeral",
                             labels=dict(w.labels), token_sha256=w.token_sha256,
                             provider=cmd.provider) for w in cmd.workers]


def decide_worker_admin(workers: Workers, cmd: CreateWorker | RotateWorkerToken | DrainWorker,
                        digest: str, worker_id: str) -> list[ev.Event]:
    if isinstance(cmd, CreateWorker):
        if not NAME.match(cmd.name.lower()):
            raise CommandError(422, f"worker name {cmd.name!r} must be 1-64 of a-z 0-9 _ . -")
        if cmd.name in workers.by_name:
            raise CommandError(409, f"a worker named {cmd.name} already exists")
        return [ev.WorkerCreated(worker_id=worker_id, name=cmd.name, worker_type=cmd.worker_type,
                                 labels=dict(cmd.labels), token_sha256=digest)]
    worker = _worker(workers, cmd.worker_id)
    if isinstance(cmd, RotateWorkerToken):
        return [ev.WorkerTokenRotated(worker_id=worker.worker_id, token_sha256=digest,
                                      keep_running=cmd.keep_running)]
    return [] if worker.draining else [ev.WorkerDraining(worker_id=worker.worker_id)]


class Registry(Actor[RegistryMsg]):
    """Answers with (Outcome, token or None); a token is shown once and never stored."""

    name = "registry"

    def __init__(self, log: EventLog, users: Users, workers: Workers, scheduler: Scheduler,
                 allocator: Allocator, clock: Clock, heartbeat_timeout: float) -> None:
        super().__init__()
        self.log, self.users, self.workers = log, users, workers
        self.scheduler, self.allocator, self.clock = scheduler, allocator, clock
        self.heartbeat_timeout = heartbeat_timeout
        #: Browser sessions (``eventq.sessions``): opened and ended only here.
        self.sessions = Sessions()
        #: worker id -> last time heard from (liveness: in memory, never an event).
        self.last_seen: dict[str, float] = {}

    async def receive(self, message: RegistryMsg) -> tuple[Outcome, str | None]:
        token = None
        if isinstance(message, AddUser | IssueToken):
            token = new_token()
        elif isinstance(message, CreateWorker | RotateWorkerToken):
            token = new_token("wt")
        digest = token_hash(token) if token else ""
        if isinstance(message, AddUser | UpdateUser):
            events = decide_user(self.users, message, digest)
        elif isinstance(message, DeleteUser):
            events = decide_delete(self.users, message, self.unfinished_jobs(message.name))
        elif isinstance(message, IssueToken | RevokeTokens):
            events = decide_token(self.users, message, digest)
        elif isinstance(message, CreateWorker | RotateWorkerToken | DrainWorker):
            events = decide_worker_admin(self.workers, message, digest,
                                         f"w_{secrets.token_hex(6)}")
        elif isinstance(message, OpenSession | EndSession):
            principal, events = decide_session(self.users, self.sessions, message,
                                               self.clock.now())
            return Outcome(events, self.log.append(principal, events).durable), None
        elif isinstance(message, CreateWorkers):
            events = decide_created(self.workers, message)
        else:
            return await self._liveness(message), None
        appended = self.log.append(message.principal, events)
        return Outcome(events, appended.durable), token

    def unfinished_jobs(self, user: str) -> int:
        """How many of ``user``'s jobs wait, are held, blocked or run."""
        return sum(len(ids) for (status, owner), ids
                   in self.scheduler.state.ids_by_user_status.items()
                   if owner == user and status not in TERMINAL)

    async def _liveness(self, m: RemoveWorker | WorkerHello | WorkerGone | CheckAlive
                        | LoseAttempts | AllocationEnded) -> Outcome:
        if isinstance(m, WorkerHello):
            return await self._hello(m)
        if isinstance(m, RemoveWorker):
            return await self._remove(m)
        if isinstance(m, AllocationEnded):
            return self._allocation_ended(m)
        if isinstance(m, LoseAttempts):
            lost: Outcome = await self.scheduler.ask(NodeLost(m.node, m.reason, m.attempts))
            return lost
        worker = self.workers.by_id.get(m.worker_id)
        if worker is None or not worker.online:
            return Outcome([], None)
        if isinstance(m, CheckAlive):
            silent = self.clock.now() - self.last_seen.get(m.worker_id, 0.0)
            if silent < self.heartbeat_timeout:
                self._arm(m.worker_id)
                return Outcome([], None)
            return await self._gone(m.worker_id, f"no heartbeat for {silent:.0f}s")
        return await self._gone(m.worker_id, m.reason)

    async def _gone(self, worker_id: str, reason: str) -> Outcome:
        events: list[ev.Event] = [ev.WorkerLost(worker_id=worker_id, reason=reason)]
        self.log.append(f"worker:{worker_id}", events)
        lost: Outcome = await self.scheduler.ask(NodeLost(worker_id, reason))
        return Outcome([*events, *lost.events], lost.durable or self.log.flush_future())

    async def _hello(self, m: WorkerHello) -> Outcome:
        worker = _worker(self.workers, m.worker_id)
        self.touch(worker.worker_id)
        self.log.append(f"worker:{worker.worker_id}", [ev.WorkerConnected(
            worker_id=worker.worker_id, transport=m.transport, labels=dict(m.labels),
            max_jobs=m.max_jobs, accepts_until=m.accepts_until)])
        await self.allocator.ask(ReportInventory(worker.worker_id, m.gpus, m.simulated))
        outcome, reconciled = await self.scheduler.reconnect(
            NodeReconnected(worker.worker_id, list(m.running)))
        if reconciled.unlisted:
            self.lose_later(worker.worker_id, "worker_lost: the worker came back without it",
                            reconciled.unlisted)
        self._arm(worker.worker_id)
        await self.scheduler.ask(Process())
        return Outcome(outcome.events, self.log.flush_future(), reconciled)

    async def _remove(self, m: RemoveWorker) -> Outcome:
        worker = _worker(self.workers, m.worker_id)
        if worker.online and not m.force:
            raise CommandError(409, f"worker {worker.name} is online; drain it and wait, "
                                    "or remove it with force=true (its attempts fail)")
        events: list[ev.Event] = [ev.WorkerRemoved(worker_id=worker.worker_id)]
        appended = self.log.append(m.principal, events)
        if worker.online:  # its token works no more: its agent stops what it runs, and its
            # lease, renewed no more, lapses within one timeout
            self.lose_later(worker.worker_id, f"worker_lost: removed by {m.principal}")
        return Outcome(events, appended.durable)

    def _allocation_ended(self, m: AllocationEnded) -> Outcome:
        """Offline now; its attempts move only one timeout from now, as after a forced
        removal: what the batch system ended may not have ended every process it started."""
        worker = self.workers.by_id.get(m.worker_id)
        if worker is None or not worker.online:
            return Outcome([], None)
        events: list[ev.Event] = [ev.WorkerLost(worker_id=m.worker_id, reason=m.reason)]
        appended = self.log.append(f"worker:{m.worker_id}", events)
        if self.scheduler.state.node_active.get(m.worker_id):
            self.lose_later(m.worker_id, f"worker_lost: {m.reason}")
        return Outcome(events, appended.durable)

    def touch(self, worker_id: str) -> None:
        """A sign of life: a heartbeat, a report, a message."""
        self.last_seen[worker_id] = self.clock.now()

    def _arm(self, worker_id: str) -> None:
        check = CheckAlive(worker_id)
        due = self.last_seen.get(worker_id, self.clock.now()) + self.heartbeat_timeout
        self.clock.call_at(due, lambda: None if self._stopped else self.tell(check))

    def lose_later(self, node: str, reason: str,
                   attempts: list[tuple[str, int]] | None = None) -> None:
        """Give these attempts up one offline timeout from now (see the module's docstring)."""
        lose = LoseAttempts(node, reason, attempts)
        self.clock.call_at(self.clock.now() + self.heartbeat_timeout,
                           lambda: None if self._stopped else self.tell(lose))

    def watch_known_workers(self, removed_nodes: set[str]) -> None:
        """After a restart: workers online in the log get one timeout to come back; attempts
        on workers removed since get one timeout to stop."""
        for worker in self.workers.by_id.values():
            if worker.online:
                self.touch(worker.worker_id)
                self._arm(worker.worker_id)
        for node in sorted(removed_nodes):
            self.lose_later(node, "worker_lost: its worker was removed")
