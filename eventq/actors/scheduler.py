"""The scheduler: the single owner of the queue, the limits and every job's status.

Commands arrive in its mailbox. For each, a pure ``decide_*`` turns state and
command into events, which are appended at once (no await in between); then a
scheduling pass places what can start. Placement asks the allocator for GPUs
(asks flow scheduler -> allocator only), then records ``AttemptDispatched``.
Processes are started by the node only once that event is durable.
"""

from __future__ import annotations

import asyncio
import dataclasses
import heapq
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import Any

import msgspec

from eventq import events as ev
from eventq import policy
from eventq.actors.allocator import Allocate, Allocator, GpuTable, Release, decide_allocate
from eventq.actors.node_views import NodeViews
from eventq.actors.runtime import Actor
from eventq.actors.scheduler_state import TERMINAL, JobState, SchedulerState, is_gated
from eventq.actors.workers_state import Workers
from eventq.clock import Clock
from eventq.graph import find_cycle
from eventq.log import EventLog, Unstorable


class CommandError(Exception):
    """A command the state does not allow; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.field = status, message, field


class NamesTaken(CommandError):
    """A set whose names must be new met jobs that took some of them meanwhile."""

    def __init__(self, names: list[str]) -> None:
        shown = ", ".join(repr(n) for n in names[:5]) + (" …" if len(names) > 5 else "")
        super().__init__(409, f"{len(names)} names were taken meanwhile: {shown}; nothing was "
                              "recorded", "name")
        self.names = names


# --- commands ------------------------------------------------------------------------


class Submit(msgspec.Struct, frozen=True):
    spec: ev.JobSpec
    principal: str
    no_wait: bool = False


class Cancel(msgspec.Struct, frozen=True):
    job_id: str
    principal: str


class SetLimits(msgspec.Struct, frozen=True):
    limits: ev.Limits
    principal: str


class ChangeLimits(msgspec.Struct, frozen=True):
    """Change some limits; the others keep the value they have when the scheduler takes
    the command (so two admins changing different limits at once lose neither change)."""

    principal: str
    changes: dict[str, Any]


class AttemptReport(msgspec.Struct, frozen=True):
    """From a node: an attempt's process started, or ended."""

    job_id: str
    attempt: int
    kind: str  # "started" | "ended"
    #: The node reporting; a report from a node that does not run the attempt is stale.
    node: str = "local"
    pid: int | None = None
    adopted: bool = False
    outcome: ev.Outcome = "exited"
    exit_code: int | None = None
    detail: str = ""


class StopAttempt(msgspec.Struct, frozen=True):
    job_id: str
    attempt: int
    reason: str  # "timeout"


class ReleaseOrphans(msgspec.Struct, frozen=True):
    """At start-up: free GPUs held by attempts that are not active."""


class Process(msgspec.Struct, frozen=True):
    """Run a scheduling pass now."""


class SubmitMany(msgspec.Struct, frozen=True):
    """Submit a set of jobs at once: all are recorded, or none (CSV import)."""

    specs: list[ev.JobSpec]
    principal: str
    #: No job may have any of these names yet (an import names its rows against the jobs
    #: it saw; another set recorded since must not make them twice).
    new_names: bool = False


class CheckReady(msgspec.Struct, frozen=True):
    """A waiting job's begin time has come."""

    job_id: str


class NodeLost(msgspec.Struct, frozen=True):
    """A worker went offline: its attempts are lost (and requeued while attempts remain).

    With ``attempts``, only those of them that are still its live ones."""

    node: str
    reason: str
    attempts: list[tuple[str, int]] | None = None


class NodeReconnected(msgspec.Struct, frozen=True):
    """A worker came back and listed the attempts it still runs."""

    node: str
    running: list[tuple[str, int]]


class JobAction(msgspec.Struct, frozen=True):
    """A person acting on one job: approve, reject, hold, release, or set its priority."""

    job_id: str
    principal: str
    action: str  # "approve" | "reject" | "hold" | "release" | "priority" | "retry"
    reason: str = ""
    priority: int | None = None


class CancelMany(msgspec.Struct, frozen=True):
    """Cancel every matching job in one step, so no dispatch can slip in between."""

    principal: str
    statuses: list[str]
    user: str | None = None


class Cleanup(msgspec.Struct, frozen=True):
    principal: str
    days: int


class SetSettings(msgspec.Struct, frozen=True):
    principal: str
    approval_cost_threshold: float | None


SchedulerMsg = (Submit | Cancel | SetLimits | AttemptReport | StopAttempt | ReleaseOrphans
                | Process | JobAction | CancelMany | Cleanup | SetSettings | NodeLost
                | NodeReconnected | SubmitMany | CheckReady | ChangeLimits)


@dataclass(frozen=True)
class DryRun:
    """What a submission would do now."""

    status: str
    node: str | None
    gpus: list[int]
    reasons: list[ev.Reason]
    estimated_start: float | None
    estimate_note: str


@dataclass
class Outcome:
    """What a command did, and the commit the caller must wait for before replying."""

    events: Sequence[ev.Event]
    durable: asyncio.Future[None] | None
    #: A command's answer beyond its events (e.g. what a reconnecting worker must do).
    result: object = None
    #: The attempts the command set off: the pass it caused dispatched them.
    dispatched: list[ev.AttemptDispatched] = dataclasses.field(default_factory=list)


# --- pure decisions ------------------------------------------------------------------


def decide_submit(state: SchedulerState, cmd: Submit) -> list[ev.Event]:
    spec = cmd.spec
    if spec.job_id in state.jobs:
        raise CommandError(409, f"job {spec.job_id} already exists")
    if unknown := [d for d in spec.depends_on if d not in state.jobs]:
        raise CommandError(422, f"depends_on names unknown jobs: {unknown}")
    submitted: list[ev.Event] = [ev.JobSubmitted(job=spec)]
    threshold = state.approval_cost_threshold
    if spec.requires_approval:
        return [*submitted, ev.JobBlocked(job_id=spec.job_id, reason="approval requested")]
    if threshold is not None and spec.estimated_cost > threshold:
        return [*submitted, ev.JobBlocked(
            job_id=spec.job_id,
            reason=f"estimated cost {spec.estimated_cost} is above {threshold}")]
    return submitted


def _job(state: SchedulerState, job_id: str) -> JobState:
    job = state.jobs.get(job_id)
    if job is None:
        raise CommandError(404, f"no job {job_id}")
    return job


def decide_action(state: SchedulerState, cmd: JobAction) -> list[ev.Event]:
    """Approve, reject, hold, release or re-prioritise one job, if its state allows it."""
    job, job_id = _job(state, cmd.job_id), cmd.job_id
    allowed = {"approve": ("blocked",), "reject": ("blocked",), "hold": ("pending",),
               "release": ("held",), "priority": ("pending", "blocked", "held"),
               "retry": ("failed", "cancelled")}[cmd.action]
    if job.status not in allowed:
        raise CommandError(409, f"cannot {cmd.action} job {job_id}: it is {job.status} "
                                f"(only {' or '.join(allowed)} jobs)")
    if cmd.action == "approve":
        return [ev.JobApproved(job_id=job_id)]
    if cmd.action == "reject":
        return [ev.JobRejected(job_id=job_id, reasons=[
            ev.Reason("rejected", cmd.reason or "rejected by an admin")])]
    if cmd.action == "hold":
        return [ev.JobHeld(job_id=job_id)]
    if cmd.action == "release":
        return [ev.JobReleased(job_id=job_id)]
    if cmd.action == "retry":
        if job.active:
            raise CommandError(409, f"job {job_id}'s last attempt is still stopping")
        return [ev.JobRequeued(job_id=job_id, next_attempt=job.attempt + 1,
                               reason=f"retried by {cmd.principal}")]
    return [ev.PriorityChanged(job_id=job_id, priority_override=cmd.priority)]


def decide_limits(state: SchedulerState, cmd: ChangeLimits) -> list[ev.Event]:
    limits = msgspec.structs.replace(state.limits, **cmd.changes)
    return [] if limits == state.limits else [ev.LimitsChanged(limits=limits)]


def decide_node_lost(state: SchedulerState, cmd: NodeLost) -> list[ev.Event]:
    out: list[ev.Event] = []
    for job_id in list(state.node_active.get(cmd.node, {})):
        job = state.jobs[job_id]
        if cmd.attempts is not None and (job_id, job.attempt) not in cmd.attempts:
            continue
        ended = ev.AttemptEnded(job_id=job_id, attempt=job.attempt, outcome="lost",
                                detail=f"worker_lost: {cmd.reason}")
        out += [ended, *_after_attempt(job, ended)]
    return out


@dataclass(frozen=True)
class Reconciled:
    """What a reconnecting worker must be told."""

    keep: list[tuple[str, int]]
    stop: list[tuple[str, int]]
    resend: list[tuple[str, int]]
    #: Kept attempts whose stop was asked while the worker was away (cancel, max_runtime).
    cancel: list[tuple[str, int, str]] = dataclasses.field(default_factory=list)
    #: Started attempts the worker did not list: another agent with its token may still
    #: run them, so they are lost only once a lease it held can have lapsed.
    unlisted: list[tuple[str, int]] = dataclasses.field(default_factory=list)


def decide_reconnected(state: SchedulerState, cmd: NodeReconnected) -> Reconciled:
    """A worker keeps what is still its own; it stops what was given away (never the other
    way round); a dispatch it never received is sent again; a started attempt it no longer
    has is lost, but not yet (``Reconciled.unlisted``)."""
    ours = {(j, state.jobs[j].attempt) for j in state.node_active.get(cmd.node, {})}
    reported = set(cmd.running)
    keep = sorted(ours & reported)
    stop = sorted(reported - ours)
    resend: list[tuple[str, int]] = []
    unlisted: list[tuple[str, int]] = []
    for job_id, attempt in sorted(ours - reported):
        job = state.jobs[job_id]
        if job.pid is None and job.stop_requested is None:
            resend.append((job_id, attempt))
        else:
            unlisted.append((job_id, attempt))
    cancel = [(j, a, state.jobs[j].stop_requested or "") for j, a in keep
              if state.jobs[j].stop_requested]
    return Reconciled(keep, stop, resend, cancel, unlisted)


def decide_cancel_many(state: SchedulerState, cmd: CancelMany) -> list[ev.Event]:
    out: list[ev.Event] = []
    for job in state.jobs.values():
        if job.status in cmd.statuses and job.status not in TERMINAL \
                and (cmd.user is None or job.spec.user == cmd.user):
            out += decide_cancel(state, job.spec.job_id)
    return out


def decide_submit_many(state: SchedulerState, cmd: SubmitMany) -> list[ev.Event]:
    """Every job valid (ids new, dependencies known, no cycle), or a 422 naming the rows."""
    ids = [s.job_id for s in cmd.specs]
    first: dict[str, int] = {}
    problems = []
    for i, job_id in enumerate(ids):
        if job_id in state.jobs or first.setdefault(job_id, i) != i:
            problems.append(f"row {i + 1}: job id {job_id} is used twice")
    jobs = state.jobs
    for i, spec in enumerate(cmd.specs):
        unknown = [d for d in spec.depends_on if d not in first and d not in jobs]
        if unknown:
            problems.append(f"row {i + 1}: depends_on names unknown jobs {sorted(set(unknown))}")
    cycle = find_cycle({s.job_id: list(s.depends_on) for s in cmd.specs})
    if cycle:
        rows = [first[j] + 1 for j in cycle[:-1]]
        problems.append(f"rows {rows}: dependency cycle {' -> '.join(cycle)}")
    if problems:
        raise CommandError(422, "; ".join(problems[:20]))
    if cmd.new_names and (taken := [s.name for s in cmd.specs if s.name in state.by_name]):
        raise NamesTaken(taken)
    return [ev.JobSubmitted(job=s) for s in cmd.specs]


def gate_subjects(state: SchedulerState, events: Sequence[ev.Event]) -> list[str]:
    """Jobs whose gate these events may have opened or closed."""
    touched: list[str] = []
    for e in events:
        if isinstance(e, ev.JobSubmitted):
            touched.append(e.job.job_id)
        elif isinstance(e, ev.JobApproved):
            touched.append(e.job_id)
        elif isinstance(e, ev.JobCompleted | ev.JobFailed | ev.JobCancelled | ev.JobRejected
                        | ev.JobRequeued):
            touched += sorted(state.dependants.get(e.job_id, ()))
    return list(dict.fromkeys(touched))


def decide_gates(state: SchedulerState, touched: list[str], now: float) -> list[ev.Event]:
    """Ready jobs join the queue; the others get their reasons recorded when those change.

    A failure travels down the pipeline: a job whose dependency cannot start because of
    a failed one is blocked too, so its own dependants are looked at in turn.
    """
    out: list[ev.Event] = []
    decided: dict[str, tuple[ev.Reason, ...]] = {}
    queue = list(touched)
    for job_id in queue:  # grows as blocks travel down; pop(0) would make 10,000 quadratic
        job = state.jobs.get(job_id)
        if job is None or job.status != "waiting":
            continue
        unmet = [(d.spec.job_id, _gate_status(d, decided)) for d in state.unmet(job)]
        codes = policy.gate_codes(job.spec, unmet, now)
        if not codes:
            out.append(ev.JobReady(job_id=job_id))
            continue
        before = decided.get(job_id, job.reasons)
        if codes != [r.code for r in before]:
            reasons = policy.gate_reasons(job.spec, unmet, now)
            out.append(ev.JobReasonsChanged(job_id=job_id, reasons=reasons))
            decided[job_id] = tuple(reasons)
            queue += sorted(state.dependants.get(job_id, ()))
    return out


def _gate_status(dep: JobState, decided: dict[str, tuple[ev.Reason, ...]]) -> str:
    """A dependency's status, or ``blocked`` when it waits on a failed one itself."""
    reasons = decided.get(dep.spec.job_id, dep.reasons)
    if dep.status == "waiting" and any(r.code == "dependency_failed" for r in reasons):
        return "blocked"
    return dep.status


def decide_cleanup(state: SchedulerState, cmd: Cleanup, now: float) -> list[ev.Event]:
    """Purge terminal jobs finished more than ``days`` ago; active jobs are never touched,
    nor a job that unfinished jobs still depend on."""
    cutoff = now - cmd.days * 86400

    def needed(job_id: str) -> bool:
        return any(state.jobs[d].status not in TERMINAL
                   for d in state.dependants.get(job_id, ()) if d in state.jobs)

    old = [j.spec.job_id for j in state.jobs.values()
           if j.status in TERMINAL and not j.active and j.finished_at is not None
           and j.finished_at < cutoff and not needed(j.spec.job_id)]
    return [ev.JobsPurged(job_ids=old, older_than_days=cmd.days)] if old else []


def decide_cancel(state: SchedulerState, job_id: str) -> list[ev.Event]:
    job = state.jobs.get(job_id)
    if job is None:
        raise CommandError(404, f"no job {job_id}")
    if job.status in TERMINAL:
        raise CommandError(409, f"job {job_id} is already {job.status}")
    out: list[ev.Event] = [ev.JobCancelled(job_id=job_id)]
    if job.active and job.stop_requested is None:
        out.append(ev.AttemptStopRequested(job_id=job_id, attempt=job.attempt, reason="cancelled"))
    return out


def decide_stop(state: SchedulerState, cmd: StopAttempt) -> list[ev.Event]:
    job = state.jobs.get(cmd.job_id)
    if job is None or job.attempt != cmd.attempt or not job.active or job.stop_requested:
        return []
    return [ev.AttemptStopRequested(job_id=cmd.job_id, attempt=cmd.attempt, reason="timeout")]


def decide_report(state: SchedulerState, r: AttemptReport) -> list[ev.Event]:
    """Fencing first: a report about an attempt that is not the live one is only noted."""
    job = state.jobs.get(r.job_id)
    if job is None or job.attempt != r.attempt or not job.active or job.node != r.node:
        current = job.attempt if job else 0
        return [ev.StaleReportIgnored(job_id=r.job_id, attempt=r.attempt,
                                      current_attempt=current, report=r.kind)]
    if r.kind == "started":
        if job.pid is not None and not r.adopted:
            return []
        return [ev.AttemptStarted(job_id=r.job_id, attempt=r.attempt, pid=r.pid or 0,
                                  adopted=r.adopted)]
    outcome = job.stop_requested or r.outcome
    ended = ev.AttemptEnded(job_id=r.job_id, attempt=r.attempt, outcome=outcome,  # type: ignore[arg-type]
                            exit_code=r.exit_code, detail=r.detail)
    return [ended, *_after_attempt(job, ended)]


def _after_attempt(job: JobState, ended: ev.AttemptEnded) -> list[ev.Event]:
    """The job's next state once its attempt has ended."""
    spec, job_id = job.spec, job.spec.job_id
    if job.status == "cancelled":
        return []
    if ended.outcome == "exited" and ended.exit_code == 0:
        return [ev.JobCompleted(job_id=job_id)]
    if ended.outcome in ("lost", "start_failed"):
        why = ended.detail or ended.outcome
        retry = True
    elif ended.outcome == "timeout":
        why, retry = f"max_runtime of {spec.max_runtime}s exceeded", spec.retry_on_failure
    else:
        why, retry = f"exit code {ended.exit_code}", spec.retry_on_failure
    if retry and job.attempt < spec.max_attempts:
        return [ev.JobRequeued(job_id=job_id, next_attempt=job.attempt + 1, reason=why)]
    return [ev.JobFailed(job_id=job_id, reason=why)]


#: Events after which the whole queue must be looked at again: resources freed,
#: limits or order changed, or a job that may hold the reservation left.
#: (Exact types, compared by set: events are final, and a batch's 10,000 are all looked at.)
FREES_OR_REORDERS = frozenset({ev.AttemptEnded, ev.GpusReleased, ev.LimitsChanged,
                               ev.JobCancelled, ev.PriorityChanged, ev.JobHeld,
                               ev.NodeInventoryReported})


def newcomers(events: Sequence[ev.Event]) -> list[str]:
    """Jobs that joined the queue in these events (submitted, approved, released, retried)."""
    blocked = {e.job_id for e in events if isinstance(e, ev.JobBlocked)}
    out = [e.job.job_id for e in events if isinstance(e, ev.JobSubmitted)]
    out += [e.job_id for e in events
            if isinstance(e, ev.JobApproved | ev.JobReleased | ev.JobRequeued | ev.JobReady)]
    return [j for j in out if j not in blocked]


def with_note(reasons: list[ev.Reason], note: ev.Reason | None) -> list[ev.Reason]:
    """A provider's note in place of "no connected worker fits", or beside the other reasons
    (a connected worker whose time is short, GPUs a worker it asks for would bring)."""
    if note is None:
        return reasons
    return [r for r in reasons if not policy.fits_no_worker(r)] + [note]


def reason_changes(state: SchedulerState, plan: policy.Plan) -> list[ev.Event]:
    """Record a job's reasons only when its set of reason codes changes."""
    out: list[ev.Event] = []
    for job_id, reasons in plan.reasons.items():
        job = state.jobs[job_id]
        if [r.code for r in job.reasons] != [r.code for r in reasons]:
            out.append(ev.JobReasonsChanged(job_id=job_id, reasons=reasons))
    return out


# --- the actor -----------------------------------------------------------------------


class Scheduler(Actor[SchedulerMsg]):
    """Owns SchedulerState; every change goes decide -> append -> evolve."""

    name = "scheduler"

    def __init__(self, log: EventLog, state: SchedulerState, allocator: Allocator,
                 gpu_table: GpuTable, clock: Clock) -> None:
        super().__init__()
        self.log, self.state, self.allocator, self.clock = log, state, allocator, clock
        #: Read-only view of the allocator's table, for planning and reasons.
        self.gpu_table = gpu_table
        self.last_plan = policy.Plan()
        self._durable: asyncio.Future[None] | None = None
        self._result: object = None
        self._dispatched: list[ev.AttemptDispatched] = []
        #: Read-only view of the registry's workers, for placement on worker nodes.
        self.workers: Workers | None = None
        self.views = NodeViews(state, gpu_table)
        log.fold_into(self.views)
        self.dispatched = 0
        #: What a provider is doing for a waiting job (SPEC 12), shown in its live reasons.
        self.provider_note: Callable[[str], ev.Reason | None] = lambda job_id: None

    def _append(self, principal: str, events: Sequence[ev.Event]) -> None:
        if events:
            self._durable = self.log.append(principal, events).durable

    async def receive(self, message: SchedulerMsg) -> Outcome:
        self._durable, self._result, self._dispatched = None, None, []
        if isinstance(message, Submit) and not message.no_wait and not is_gated(message.spec):
            return await self._submit(message)  # it holds the log only where it awaits
        with self.log.holding():
            return await self._receive(message)

    async def _receive(self, message: SchedulerMsg) -> Outcome:
        events = await self._handle(message)
        events = [*events, *self._open_gates(message, events)]
        if isinstance(message, Process | ReleaseOrphans) or any(
                type(e) in FREES_OR_REORDERS for e in events):
            await self.run_pass()
        else:
            await self.place_new(newcomers(events))
        if isinstance(message, Submit) and message.no_wait:
            events = [*events, *self._reject_if_waiting(message.spec.job_id)]
        return Outcome(events, self._durable, self._result, self._dispatched)

    async def _handle(self, m: SchedulerMsg) -> list[ev.Event]:
        if isinstance(m, Submit):
            events = decide_submit(self.state, m)
            self._append_submitted(m.principal, events)
        elif isinstance(m, Cancel):
            events = decide_cancel(self.state, m.job_id)
            self._append(m.principal, events)
        elif isinstance(m, SetLimits):
            events = [ev.LimitsChanged(limits=m.limits)]
            self._append(m.principal, events)
        elif isinstance(m, AttemptReport):
            principal = "system" if m.node == "local" else f"worker:{m.node}"
            events = decide_report(self.state, m)
            await self._append_and_release(principal, events)
        elif isinstance(m, StopAttempt):
            events = decide_stop(self.state, m)
            self._append("system", events)
        elif isinstance(m, ReleaseOrphans):
            events = await self._release_orphans()
        elif isinstance(m, SubmitMany):
            events = decide_submit_many(self.state, m)
            self._append_submitted(m.principal, events)
        elif isinstance(m, CheckReady):
            events = []
        elif isinstance(m, NodeLost):
            events = decide_node_lost(self.state, m)
            await self._append_and_release("system", events)
        elif isinstance(m, NodeReconnected):
            events, self._result = [], decide_reconnected(self.state, m)
        elif isinstance(m, Process):
            events = []
        else:
            events = self._decide_admin(m)
            self._append(m.principal, events)
        return events

    def _append_submitted(self, principal: str, events: list[ev.Event]) -> None:
        """Jobs carry the client's metadata and config, which the log may be unable to
        store; it says so before it records anything."""
        try:
            self._append(principal, events)
        except Unstorable as exc:
            row = f"row {exc.index + 1}: " if len(events) > 1 else ""
            bad = events[exc.index]
            field = (ev.unstorable_field(bad.job) if isinstance(bad, ev.JobSubmitted)
                     else None) or "metadata"
            raise CommandError(422, f"{row}{field} cannot be stored ({exc.why}); nothing was "
                                    "recorded", field) from None

    async def _append_and_release(self, principal: str, events: list[ev.Event]) -> None:
        """Record attempt ends, then free their GPUs (the allocator owns them)."""
        self._append(principal, events)
        for e in events:
            if isinstance(e, ev.AttemptEnded):
                await self.allocator.ask(Release(e.job_id, e.attempt))

    async def reconnect(self, cmd: NodeReconnected) -> tuple[Outcome, Reconciled]:
        """Through the mailbox: see ``decide_reconnected``."""
        outcome: Outcome = await self.ask(cmd)
        assert isinstance(outcome.result, Reconciled)
        return outcome, outcome.result

    def _decide_admin(self, m: JobAction | CancelMany | Cleanup | SetSettings | ChangeLimits
                      ) -> list[ev.Event]:
        if isinstance(m, JobAction):
            return decide_action(self.state, m)
        if isinstance(m, ChangeLimits):
            return decide_limits(self.state, m)
        if isinstance(m, CancelMany):
            return decide_cancel_many(self.state, m)
        if isinstance(m, Cleanup):
            return decide_cleanup(self.state, m, self.clock.now())
        return [ev.SettingsChanged(approval_cost_threshold=m.approval_cost_threshold)]

    async def _release_orphans(self) -> list[ev.Event]:
        released: list[ev.Event] = []
        holders = {h for node in self.gpu_table.nodes.values() for h in node.held.values()}
        for job_id, attempt in sorted(holders):
            job = self.state.jobs.get(job_id)
            if job is None or not job.active or job.attempt != attempt:
                released += await self.allocator.ask(Release(job_id, attempt, "orphaned"))
        return released

    def _reject_if_waiting(self, job_id: str) -> list[ev.Event]:
        job = self.state.jobs[job_id]
        if job.status != "pending":
            return []
        reasons = self.last_plan.reasons.get(job_id) or self.explain(job)
        events: list[ev.Event] = [ev.JobRejected(job_id=job_id, reasons=reasons)]
        self._append("system", events)
        return events

    async def run_pass(self) -> None:
        """Place everything that can start now, then record reasons that changed."""
        if not self.state.waiting_count():
            self.last_plan = policy.Plan()
            return  # nothing waits: no node views to build (a fleet of workers costs)
        now, capped = self.clock.now(), policy.Capped()
        plan = policy.plan(self.state.iter_schedulable(now, capped), self.state.counts,
                           self.state.limits, self.node_views(), now,
                           cpu_jobs_waiting=self.state.waiting_cpu, capped=capped,
                           order=self.views.order)
        for placement in plan.placements:
            await self._dispatch(placement)
        self._append("system", reason_changes(self.state, plan))
        self.last_plan = plan

    def _open_gates(self, message: SchedulerMsg, events: list[ev.Event]) -> list[ev.Event]:
        touched = gate_subjects(self.state, events)
        if isinstance(message, CheckReady):
            touched.append(message.job_id)
        gated = decide_gates(self.state, touched, self.clock.now())
        self._append("system", gated)
        for job_id in touched:
            self.watch_begin(job_id)
        return gated

    def watch_begin(self, job_id: str) -> None:
        """Wake a waiting job when its begin time comes."""
        job = self.state.jobs.get(job_id)
        begin = job.spec.begin_at if job is not None else None
        if job is not None and job.status == "waiting" and begin is not None \
                and begin > self.clock.now():
            check = CheckReady(job_id)
            self.clock.call_at(begin, lambda: self._tell(check))

    async def _submit(self, m: Submit) -> Outcome:
        """A job that joins the queue at once (no gate, no ``no_wait``): it is placed, or
        its first reasons recorded, right after its submission, without the general
        command's look at gates, newcomers and what the events free."""
        submitted = decide_submit(self.state, m)
        # The plan is made before the submission is appended: nothing it reads changes
        # with the submission's own event (counts and nodes are the running jobs').
        plan = self._plan_one(m.spec) if len(submitted) == 1 else None  # else: blocked
        waits = self._only_waits(m.spec, plan) if plan is not None else None
        if waits is not None:  # one event: the job and why it waits (no placement to try)
            submitted = [ev.JobSubmitted(job=m.spec, reasons=waits)]
        self._append_submitted(m.principal, submitted)
        if plan is not None and waits is None:
            await self._place(self.state.jobs[m.spec.job_id], plan)
        return Outcome(submitted, self._durable, dispatched=self._dispatched)

    def submit_waiting(self, m: Submit) -> Outcome | None:
        """``ask(m)``'s outcome for a job that simply waits, recorded now, while the
        scheduler is idle (``Actor.idle``): a submission under load is one turn of the
        event loop less, and one future less. None where the mailbox must take it: the
        scheduler busy or with mail, a gate, ``no_wait``, a blocked job, or one that may
        start (placing it awaits the allocator). A refusal raises as ``ask`` would."""
        if not self.idle() or m.no_wait or is_gated(m.spec):
            return None
        submitted = decide_submit(self.state, m)
        if len(submitted) != 1:  # blocked
            return None
        waits = self._only_waits(m.spec, self._plan_one(m.spec))
        if waits is None:
            return None
        self._durable, self._result, self._dispatched = None, None, []
        submitted = [ev.JobSubmitted(job=m.spec, reasons=waits)]
        self._append_submitted(m.principal, submitted)
        return Outcome(submitted, self._durable)

    def _plan_one(self, spec: ev.JobSpec) -> policy.Plan:
        return policy.plan_one(spec, self.state.counts, self.state.limits, self.node_views(),
                               self.last_plan.reservation, self.clock.now(), self.views.order)

    def _only_waits(self, spec: ev.JobSpec, plan: policy.Plan) -> list[ev.Reason] | None:
        """Why the job waits, if that is all ``plan`` says; None if it may start, or if,
        held only by GPUs, it outranks the reservation's job (a full pass must move it)."""
        reasons = plan.reasons.get(spec.job_id)
        if reasons is None:
            return None
        as_queued = JobState(spec=spec, order=self.log.head_seq + 1, queued_at=self.clock.now())
        return reasons if self._waits(as_queued, reasons) else None

    async def place_new(self, job_ids: list[str]) -> None:
        """Place newly queued jobs one by one in queue order, without walking the queue.

        Jobs recorded together (a set, the dependants one end frees) come in row order;
        placed so, a low row would take the GPUs a higher-priority row after it needs."""
        jobs = self.state.jobs
        pending = [job for job in map(jobs.__getitem__, job_ids) if job.status == "pending"]
        if len({job.spec.effective_base for job in pending}) > 1:
            now, sort_key = self.clock.now(), self.state.sort_key
            pending.sort(key=lambda job: sort_key(job, now))
        else:  # one bucket, whose order aging never changes (the usual set: ~15x cheaper)
            pending.sort(key=attrgetter("order"))
        for job in pending:
            if job.status == "pending" and await self._place(job):
                return

    async def _place(self, job: JobState, plan: policy.Plan | None = None) -> bool:
        """Dispatch ``job`` if it can start now (by ``plan``, when its submission made it),
        or record why it waits.

        A full pass runs instead when it lacks only GPUs and outranks the job holding the
        reservation (or there is none): the reservation must move to it. True if it ran.
        """
        if plan is None:
            plan = self._plan_one(job.spec)
        reasons = plan.reasons.get(job.spec.job_id)
        if reasons is not None and self._waits(job, reasons):
            self._append("system", reason_changes(self.state, plan))
            return False
        with self.log.holding():  # the allocator's events commit with ours
            for placement in plan.placements:
                await self._dispatch(placement)
                self.last_plan.reservation = plan.reservation
            if reasons is not None:
                await self.run_pass()
                return True
        return False

    def _waits(self, job: JobState, reasons: list[ev.Reason]) -> bool:
        """Does ``job``, held by ``reasons``, simply wait? Not when only GPUs hold it and it
        outranks the job holding the reservation: a full pass must move it to ``job``."""
        now = self.clock.now()
        return not (all(r.code == "gpus" for r in reasons)
                    and self._outranks(job, self.last_plan.reservation, now))

    def _outranks(self, job: JobState, held: policy.Reservation | None, now: float) -> bool:
        holder = self.state.jobs.get(held.job_id) if held else None
        if holder is None or holder.status != "pending":
            return True
        return self.state.sort_key(job, now) < self.state.sort_key(holder, now)

    async def _dispatch(self, p: policy.Placement) -> None:
        job = self.state.jobs[p.job_id]
        attempt = job.attempt + 1
        granted = await self.allocator.ask(Allocate(p.job_id, attempt, p.node, p.gpus,
                                                    job.spec.device_ids, job.spec.any_gpu))
        if granted is None:
            return
        dispatched = ev.AttemptDispatched(job_id=p.job_id, attempt=attempt, node=p.node,
                                          gpus=granted.gpus)
        self._append("system", [dispatched])
        self._dispatched.append(dispatched)
        self.dispatched += 1
        if job.spec.max_runtime is not None:
            self.arm_timeout(job)

    def arm_timeout(self, job: JobState) -> None:
        """Ask for a stop when the attempt's ``max_runtime`` has passed."""
        if job.spec.max_runtime is None or job.dispatched_at is None:
            return
        stop = StopAttempt(job.spec.job_id, job.attempt, "timeout")
        self.clock.call_at(job.dispatched_at + job.spec.max_runtime, lambda: self._tell(stop))

    def _tell(self, message: SchedulerMsg) -> None:
        if not self._stopped:
            self.tell(message)

    def node_views(self) -> list[policy.NodeView]:
        """Nodes that may take attempts now: local, and connected workers not draining.

        Cached between decisions (``NodeViews``); the policy copies what it changes."""
        self.views.workers = self.workers
        return self.views.current()

    def dry_run(self, spec: ev.JobSpec) -> DryRun:
        """Where ``spec`` would run now, or every reason it would wait; records nothing."""
        now = self.clock.now()
        if spec.requires_approval or (self.state.approval_cost_threshold is not None and
                                      spec.estimated_cost > self.state.approval_cost_threshold):
            return DryRun("blocked", None, [], [ev.Reason("approval", "needs an admin's "
                                                          "approval")], None, "")
        hypo = JobState(spec=spec, order=self.log.head_seq + 1, queued_at=now)

        def waiting() -> Iterator[JobState]:  # walked as deep as each use needs, not whole
            return heapq.merge(self.state.iter_waiting(now), [hypo],
                               key=lambda j: self.state.sort_key(j, now))
        plan = policy.plan(waiting(), self.state.counts, self.state.limits,
                           self.node_views(), now)
        placed = next((p for p in plan.placements if p.job_id == spec.job_id), None)
        if placed is not None:
            gpus = decide_allocate(self.gpu_table, Allocate(spec.job_id, 1, placed.node, spec.gpus,
                                                            spec.device_ids, spec.any_gpu))
            return DryRun("running", placed.node, gpus.gpus if gpus else [], [], now, "")
        reasons = plan.reasons.get(spec.job_id) or self.explain(hypo)
        estimate = policy.estimate_starts((j.spec for j in waiting()), self.node_views(), now)
        found = estimate.get(spec.job_id, policy.Estimate(None, "too many jobs ahead"))
        return DryRun("queued", None, [], reasons, found.start, found.note)

    def explain(self, job: JobState, position: int | None = None) -> list[ev.Reason]:
        """Every reason holding one waiting job now (for views and dry runs)."""
        now = self.clock.now()
        reasons = policy.explain(job.spec, self.state.counts, self.state.limits,
                                 self.node_views(), self.last_plan.reservation, now,
                                 self.views.order)
        if reasons:
            return with_note(reasons, self.provider_note(job.spec.job_id))
        if position is None:
            position = self.state.position(job.spec.job_id, now)
        if position is not None and position > 1:
            reasons = [ev.Reason("priority", f"{position - 1} jobs ahead")]
        return reasons
