"""The provisioner: the single owner of the requests for workers made of a batch system.

It decides with ``eventq.provisioning`` (pure) what the queue needs, and records each request
and each cancel before it acts on the batch system (write-ahead, as every effect): a request's
workers exist and its ``WorkersRequested`` is durable before ``sbatch`` runs, its cancel is
durable before ``scancel`` does. One message at a time: no two requests are ever in flight,
so a demand is never asked twice. Asks flow provisioner -> registry -> scheduler -> allocator.

The workers a provider starts are ordinary ``eventq worker`` agents under the lease
(docs/architecture.md, "Remote workers"): a task the batch system ends takes its worker
offline (``AllocationEnded``), and what it ran is given up only once a lease it held has
surely lapsed, exactly as after a forced removal. An idle worker is drained before its task
is cancelled, so nothing is sent to a worker that is about to go.

The batch system has no push: it is asked (``observe``) only while some task is unsettled
(waiting, starting, cancelled but not yet gone, or running with its worker away), every
``POLL_MIN`` seconds at first and twice as long after each look that changed nothing.
"""

from __future__ import annotations

import math
import secrets
from collections import defaultdict
from collections.abc import Sequence

import msgspec
import structlog

from eventq import events as ev
from eventq.actors.registry import (
    AllocationEnded,
    CreateWorkers,
    DrainWorker,
    NewWorker,
    Registry,
    RemoveWorker,
)
from eventq.actors.requests_state import Request, Requests, Task, TaskState
from eventq.actors.runtime import Actor
from eventq.actors.scheduler import Outcome, Scheduler
from eventq.actors.workers_state import Workers
from eventq.auth import ARRAY_PREFIX, new_token, task_token, token_hash
from eventq.clock import Clock
from eventq.log import EventLog, Record
from eventq.provider import Provider, ProviderError, Submission
from eventq.provisioning import Queue, assess, could_serve, observed_changes

log = structlog.get_logger()

POLL_MIN, POLL_MAX = 2.0, 30.0
#: Reviews of the queue come at most this often (each walks the waiting jobs).
REVIEW_GAP = 0.2
#: How a task ends when nothing went wrong: eventq cancelled it (idle, no longer needed),
#: its worker left by itself, or the batch system no longer lists it. Any other end keeps
#: the task's output for debugging (``Provider.discard_output``).
CLEAN_ENDS = frozenset({"COMPLETED", "CANCELLED", "no longer listed"})
#: After a failure (a refused request, a task that ended before its worker connected), the
#: next request waits this long, doubled for each failure in a row, up to FAILURE_MAX.
FAILURE_WAIT, FAILURE_MAX = 5.0, 300.0

#: Events after which the demand may have changed.
TRIGGERS = frozenset({
    ev.JobSubmitted, ev.JobReady, ev.JobRequeued, ev.JobApproved, ev.JobReleased,
    ev.JobCancelled, ev.JobHeld, ev.PriorityChanged, ev.LimitsChanged, ev.AttemptDispatched,
    ev.AttemptEnded, ev.WorkerConnected, ev.WorkerLost, ev.WorkerDraining, ev.WorkerRemoved,
    ev.NodeInventoryReported})


class Review(msgspec.Struct, frozen=True):
    """Look at the queue, the workers and the requests again."""


class Poll(msgspec.Struct, frozen=True):
    """Ask the batch system what became of the unsettled tasks."""


class Provisioner(Actor[Review | Poll]):
    """Asks a provider for workers, cancels those no longer needed, retires idle ones."""

    name = "provisioner"

    def __init__(self, log_: EventLog, requests: Requests, scheduler: Scheduler,
                 registry: Registry, workers: Workers, provider: Provider, clock: Clock,
                 idle_timeout: float, url: str, ca: str | None = None) -> None:
        super().__init__()
        self.log, self.requests, self.scheduler = log_, requests, scheduler
        self.registry, self.workers, self.provider = registry, workers, provider
        self.clock, self.idle_timeout, self.url, self.ca = clock, idle_timeout, url, ca
        #: What the provider is doing for each waiting job it serves (live reasons).
        self.notes: dict[str, ev.Reason] = {}
        self.failures, self.retry_at, self.last_failure = 0, 0.0, ""
        self.poll_delay = POLL_MIN
        self._poll_armed = False
        self._review_due: float | None = None
        self._last_review = -math.inf
        #: worker id -> when its idle timeout is armed to fire.
        self._idle_checks: dict[str, float] = {}
        self._retry_armed = 0.0
        #: (request, task) -> when its scancel was last sent (a restart sends it again).
        self._cancelled_at: dict[tuple[str, int], float] = {}

    @property
    def offer_name(self) -> str:
        return self.provider.offer.name

    def start(self) -> None:
        super().start()
        self.log.on_durable(self.on_durable, TRIGGERS)
        self.tell(Poll() if self.requests.by_id else Review())

    async def stop(self) -> None:
        self.log.off_durable(self.on_durable)
        await super().stop()

    def note(self, job_id: str) -> ev.Reason | None:
        """What the provider is doing for a waiting job, if anything."""
        return self.notes.get(job_id)

    async def receive(self, message: Review | Poll) -> None:
        if isinstance(message, Poll):
            await self._poll()
        else:
            await self._review()

    # --- waking -----------------------------------------------------------------------

    def on_durable(self, records: Sequence[Record]) -> None:
        first_demand = False
        for record in records:
            e = record.event
            if isinstance(e, ev.WorkerConnected) and e.worker_id in self.requests.by_worker:
                self.failures = 0  # the provider's workers do come
            elif isinstance(e, ev.JobSubmitted) and not first_demand and not self.notes:
                first_demand = could_serve(e.job, self.provider.offer, record.time)
        self.wake(at_once=first_demand)

    def wake(self, at: float | None = None, at_once: bool = False) -> None:
        """A review soon (at once, or REVIEW_GAP after the last one), or at ``at``. One
        review waits at a time: it sees everything that happened before it runs.

        ``at_once``: a job the provider could serve arrived while it served none (the
        first demand). Its workers' start is on that job's path, so the review does not
        wait out the gap; the gap bounds reviews while the provider serves jobs."""
        now = self.clock.now()
        if self._stopped:
            return
        if at is not None and at > now:
            self.clock.call_at(at, self.wake)
            return
        due = now if at_once else max(now, self._last_review + REVIEW_GAP)
        if self._review_due is not None and self._review_due <= due:
            return
        self._review_due = due
        self.clock.call_at(due, lambda: self._review_at(due))

    def _review_at(self, due: float) -> None:
        """A review wakes up; an earlier one that took its place already ran."""
        if self._review_due == due:
            self._tell(Review())

    def _tell(self, message: Review | Poll) -> None:
        if not self._stopped:
            self.tell(message)

    # --- reviewing --------------------------------------------------------------------

    async def _review(self) -> None:
        now = self.clock.now()
        self._review_due, self._last_review = None, now
        state = self.scheduler.state
        present = {w.worker_id for w in self.workers.by_id.values()
                   if w.online or w.transport is not None}
        queue = Queue(lambda: state.iter_waiting(now), state.counts, state.limits,
                      self.scheduler.node_views(), now)
        demand = assess(queue, self.requests, present, self.provider.offer, self._held(now))
        self.notes = demand.notes
        if demand.new_workers:
            await self._request(demand.new_workers, demand.for_jobs)
        if demand.surplus:
            await self._cancel([(t, "no waiting job needs it any more") for t in demand.surplus])
        await self._retire_idle(now)
        await self._settle_ended()
        self._arm_poll()

    def _held(self, now: float) -> ev.Reason | None:
        if now >= self.retry_at:
            return None
        if self._retry_armed != self.retry_at:
            self._retry_armed = self.retry_at
            self.wake(self.retry_at)
        return ev.Reason("no_worker", f"{self.offer_name}: {self.last_failure}; asking again "
                                      f"in {self.retry_at - now:.0f}s")

    def _failed(self, why: str) -> None:
        self.failures += 1
        self.last_failure = why
        wait = min(FAILURE_MAX, FAILURE_WAIT * 2 ** (self.failures - 1))
        self.retry_at = self.clock.now() + wait
        log.warning("provider_failure", provider=self.offer_name, why=why, retry_in=wait)

    async def _request(self, count: int, for_jobs: list[str]) -> None:
        """Create the workers, record the request, then submit it."""
        offer = self.offer_name
        request_id = f"r{secrets.token_hex(5)}"
        secret = new_token(ARRAY_PREFIX.rstrip("_"))
        made = [NewWorker(f"w_{secrets.token_hex(6)}", f"{offer}-{request_id}-{i}",
                          dict(self.provider.offer.labels), token_hash(task_token(secret, i)))
                for i in range(count)]
        created, _ = await self.registry.ask(CreateWorkers("system", offer, made))
        await _durable(created)
        await self.log.append("system", [ev.WorkersRequested(
            request_id=request_id, provider=offer, workers=[w.worker_id for w in made],
            for_jobs=for_jobs, asks=self.provider.offer.asks)]).durable
        try:
            batch_id = await self.provider.submit(Submission(request_id, count, self.url, secret,
                                                              self.ca))
        except ProviderError as exc:
            self._failed(f"the request was refused: {exc}")
            await self.log.append("system", [ev.WorkersRequestFailed(
                request_id=request_id, error=str(exc))]).durable
            await self._settle_ended()
            return
        await self.log.append("system", [ev.WorkersRequestSubmitted(
            request_id=request_id, batch_id=batch_id)]).durable
        self.poll_delay = POLL_MIN
        self.wake()  # the jobs' reasons name the request now
        log.info("workers_requested", provider=offer, request=request_id, batch_id=batch_id,
                 workers=count, for_jobs=for_jobs)

    async def _cancel(self, doomed: list[tuple[Task, str]]) -> None:
        """Drain each task's worker first, so nothing is sent to it any more; then cancel the
        tasks whose worker runs nothing (the others go once they are idle)."""
        for task, _ in doomed:
            worker = self.workers.by_id.get(task.worker_id)
            if worker is not None and not worker.draining:
                drained, _ = await self.registry.ask(DrainWorker("system", task.worker_id))
                await _durable(drained)
        active = self.scheduler.state.node_active
        by_request: dict[tuple[str, str], list[int]] = defaultdict(list)
        for task, why in doomed:
            if not active.get(task.worker_id):
                by_request[(task.request_id, why)].append(task.index)
        if not by_request:
            return
        await self.log.append("system", [ev.RequestedWorkersCancelled(
            request_id=r, tasks=tasks, reason=why)
            for (r, why), tasks in by_request.items()]).durable
        for (request_id, why), tasks in by_request.items():
            await self._scancel(self.requests.by_id[request_id], tasks)
            log.info("workers_cancelled", provider=self.offer_name, request=request_id,
                     tasks=tasks, why=why)
        self.poll_delay = POLL_MIN

    async def _scancel(self, request: Request, tasks: list[int]) -> None:
        if request.batch_id is None:
            return  # a restart's first look finds it, and then it is cancelled again
        now = self.clock.now()
        self._cancelled_at.update(((request.request_id, t), now) for t in tasks)
        try:
            await self.provider.cancel(request.batch_id, tasks)
        except ProviderError as exc:
            log.warning("cancel_failed", provider=self.offer_name, request=request.request_id,
                        tasks=tasks, why=str(exc), note="asked again at the next look")

    async def _retire_idle(self, now: float) -> None:
        """A worker idle for the idle timeout is drained, then its task cancelled."""
        active, idle_since = self.scheduler.state.node_active, \
            self.scheduler.state.node_idle_since
        doomed: list[tuple[Task, str]] = []
        for task in self.requests.open_tasks():
            worker = self.workers.by_id.get(task.worker_id)
            if worker is None or not worker.online or task.cancelled \
                    or active.get(task.worker_id):
                continue
            if worker.draining:
                doomed.append((task, "its worker was drained"))
                continue
            since = max(worker.since, idle_since.get(task.worker_id, 0.0))
            if now - since >= self.idle_timeout:
                doomed.append((task, f"its worker was idle for {self.idle_timeout:g}s"))
            elif self._idle_checks.get(task.worker_id) != since + self.idle_timeout:
                self._idle_checks[task.worker_id] = since + self.idle_timeout
                self.wake(since + self.idle_timeout)
        await self._cancel(doomed)

    async def _settle_ended(self) -> None:
        """A task that ended takes its worker offline, and its record goes once it runs
        nothing (attempts on it move only after a lease it held has lapsed)."""
        active = self.scheduler.state.node_active
        for task in [t for t in self.requests.tasks() if t.state is TaskState.ENDED]:
            worker = self.workers.by_id.get(task.worker_id)
            if worker is None:
                continue
            request = self.requests.request_of(task)
            if worker.online:
                why = f"its {self.offer_name} job {request.task_name(task)} ended " \
                      f"({task.detail or 'gone'})"
                ended, _ = await self.registry.ask(AllocationEnded(task.worker_id, why))
                await _durable(ended)
            if not worker.online and not active.get(task.worker_id):
                removed, _ = await self.registry.ask(RemoveWorker("system", task.worker_id))
                await _durable(removed)
                self._idle_checks.pop(task.worker_id, None)
                if request.batch_id is not None:
                    self.provider.discard_output(request.batch_id, task.index,
                                                 failed=task.detail not in CLEAN_ENDS)

    # --- polling ----------------------------------------------------------------------

    def unsettled(self, task: Task) -> bool:
        """Does the batch system still have to tell what becomes of this task?"""
        if task.state is TaskState.ENDED:
            return False
        worker = self.workers.by_id.get(task.worker_id)
        online = worker is not None and worker.online
        return task.state is not TaskState.RUNNING or task.cancelled is not None or not online

    def _arm_poll(self) -> None:
        if self._poll_armed or not any(map(self.unsettled, self.requests.tasks())):
            return
        self._poll_armed = True
        self.clock.call_at(self.clock.now() + self.poll_delay, lambda: self._tell(Poll()))

    async def _poll(self) -> None:
        self._poll_armed = False
        looked = [r for r in self.requests.by_id.values() if any(map(self.unsettled, r.tasks))]
        if looked:
            try:
                seen = await self.provider.observe([r.request_id for r in looked])
            except ProviderError as exc:
                log.warning("observe_failed", provider=self.offer_name, why=str(exc))
                self.poll_delay = min(POLL_MAX, self.poll_delay * 2)
                self._arm_poll()
                return
            changes = observed_changes(looked, seen)
            self.poll_delay = POLL_MIN if changes else min(POLL_MAX, self.poll_delay * 2)
            if changes:
                await self.log.append("system", changes).durable
                self._judge(changes)
            await self._cancel_again(looked)
        self.wake()
        self._arm_poll()

    def _judge(self, changes: list[ev.Event]) -> None:
        """A task that ended before its worker ever connected is a failure (a worker that
        cannot start, a node that fails), unless it was cancelled."""
        for e in changes:
            if not isinstance(e, ev.RequestedWorkerChanged) or e.state != "ended" \
                    or e.detail == "CANCELLED":
                continue
            request = self.requests.by_id[e.request_id]
            task = request.tasks[e.task]
            worker = self.workers.by_id.get(task.worker_id)
            if task.cancelled is None and (worker is None or worker.transport is None):
                self._failed(f"{self.offer_name} job {request.task_name(task)} ended "
                             f"({e.detail}) before its worker connected")

    async def _cancel_again(self, looked: list[Request]) -> None:
        """A cancel the batch system has not carried out after POLL_MAX (it was down, or
        the server stopped before it sent it) is sent again."""
        now = self.clock.now()
        for request in looked:
            still = [t.index for t in request.tasks if t.cancelled is not None
                     and t.state is not TaskState.ENDED
                     and now - self._cancelled_at.get((request.request_id, t.index), 0.0)
                     >= POLL_MAX]
            if still:
                await self._scancel(request, still)


async def _durable(outcome: object) -> None:
    if isinstance(outcome, Outcome) and outcome.durable is not None:
        await outcome.durable
