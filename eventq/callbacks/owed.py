"""The notifications a job's end owes, folded from the log alone.

This module guards a promise: a job's end is notified at every URL it owes, never lost, and
never sent again once recorded delivered. What is owed is read from the log only: the event
that ended the job, the job's ``notify_url``, and the server's URL in force then
(``ServerNotifyUrlSet``). So a restart owes exactly what the stopped server owed; a
``NotificationDelivered`` settles a notification, a ``NotificationFailed`` without
``retry_at`` gives it up. ``evolve`` and ``decide_try`` are pure; the sending is done by
``eventq/callbacks/notifier.py``.

A job ends at its terminal event, or, when its attempt is still alive then (a running job
cancelled), when that attempt has ended: a notification says the GPUs are free.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import msgspec

from eventq import events as ev
from eventq.actors.scheduler_state import TERMINAL, JobState, SchedulerState
from eventq.log import Record

#: (job id, ending, target): one notification.
Key = tuple[str, int, ev.NotifyTarget]

TERMINAL_EVENTS = (ev.JobCompleted, ev.JobFailed, ev.JobCancelled, ev.JobRejected)


class Ending(msgspec.Struct, frozen=True, gc=False):
    """A job's end as the log told it: what a notification and a hook say about it."""

    job_id: str
    #: The seq of the event that ended the job (a retried job can end again).
    ending: int
    name: str
    user: str
    team: str | None
    status: str
    attempt: int
    max_attempts: int
    exit_code: int | None
    reason: str | None
    node: str | None
    submitted_at: float
    started_at: float | None
    ended_at: float


class Owed(msgspec.Struct, gc=False):
    """A notification not yet delivered nor given up."""

    ending: Ending
    target: ev.NotifyTarget
    #: The job's own URL; a server-wide one goes to the server's URL of the day.
    url: str | None
    tries: int = 0
    #: When the next try is due (epoch seconds).
    due: float = 0.0


def _reason(job: JobState, cancelled_by: str | None) -> str | None:
    if job.status == "cancelled":
        by = cancelled_by.removeprefix("user:") if cancelled_by else None
        return f"cancelled by {by}" if by else "cancelled"
    if job.status == "rejected":
        return "; ".join(f"{r.code}: {r.detail}" for r in job.reasons) or "rejected"
    return job.error if job.status == "failed" else None


def ending_of(job: JobState, record: Record, cancelled_by: str | None = None) -> Ending:
    """The facts of ``job``'s end, which ``record`` completed (the scheduler's state has
    folded it already)."""
    spec = job.spec
    return Ending(
        job_id=spec.job_id, ending=record.seq, name=spec.name, user=spec.user, team=spec.team,
        status=job.status, attempt=job.attempt, max_attempts=spec.max_attempts,
        exit_code=job.exit_code, reason=_reason(job, cancelled_by), node=job.node,
        submitted_at=job.queued_at, started_at=job.dispatched_at, ended_at=record.time)


@dataclass
class Notifications:
    """What is owed, folded from the log; read by the notifier, written by nothing else."""

    READS: ClassVar[frozenset[type]] = frozenset({
        ev.ServerNotifyUrlSet, *TERMINAL_EVENTS, ev.AttemptEnded, ev.NotificationDelivered,
        ev.NotificationFailed})
    #: Each event type's step, for the log to call straight (``eventq.log.Fold``).
    STEPS: ClassVar[dict[type, Callable[[Notifications, Any, Record], None]]]

    #: The scheduler's state, folded before this (``Orchestrator._assemble``).
    state: SchedulerState
    server_url: str | None = None
    owed: dict[Key, Owed] = field(default_factory=dict)
    #: Jobs cancelled while their attempt was alive, and who cancelled them.
    stopping: dict[str, str] = field(default_factory=dict)
    #: Told of each ending as it is appended (the live server's notifier; not in a replay).
    listener: Callable[[Ending], None] | None = None

    def evolve(self, record: Record) -> None:
        # By exact type: a whole start passes every attempt's end and job's end through here.
        step = _STEPS.get(type(record.event))
        if step is not None:
            step(self, record.event, record)

    def _url_set(self, e: ev.ServerNotifyUrlSet, record: Record) -> None:
        self.server_url = e.url

    def _delivered(self, e: ev.NotificationDelivered, record: Record) -> None:
        self.owed.pop((e.job_id, e.ending, e.target), None)

    def _attempt_ended(self, e: ev.AttemptEnded, record: Record) -> None:
        if e.job_id not in self.stopping:
            return
        principal = self.stopping.pop(e.job_id)
        job = self.state.jobs[e.job_id]
        if job.status in TERMINAL:  # else it was retried meanwhile: no end
            self._ended(job, record, principal)

    def _terminal(self, e: ev.JobCompleted | ev.JobFailed | ev.JobCancelled | ev.JobRejected,
                  record: Record) -> None:
        job = self.state.jobs[e.job_id]
        if job.active:  # cancelled while it runs: ends when its attempt does
            self.stopping[e.job_id] = record.principal
            return
        principal = record.principal if type(e) is ev.JobCancelled else None
        self._ended(job, record, principal)

    def _ended(self, job: JobState, record: Record, principal: str | None) -> None:
        own = job.spec.notify_url
        if own is None and self.server_url is None and self.listener is None:
            return  # nothing owed, nobody told: most ends of a start's replay
        ending = ending_of(job, record, principal)
        targets: list[tuple[ev.NotifyTarget, str | None]] = [("job", own),
                                                              ("server", self.server_url)]
        for target, url in targets:
            if url is not None:
                self.owed[(ending.job_id, ending.ending, target)] = Owed(
                    ending, target, own if target == "job" else None, due=ending.ended_at)
        if self.listener is not None:
            self.listener(ending)

    def _failed(self, e: ev.NotificationFailed) -> None:
        key: Key = (e.job_id, e.ending, e.target)
        owed = self.owed.get(key)
        if owed is None:
            return
        if e.retry_at is None:
            del self.owed[key]
        else:
            owed.tries, owed.due = e.tries, e.retry_at

    def owed_by(self, ending: Ending) -> list[Key]:
        """The notifications ``ending`` owes and has not settled."""
        keys: list[Key] = [(ending.job_id, ending.ending, "job"),
                           (ending.job_id, ending.ending, "server")]
        return [key for key in keys if key in self.owed]

    def url_of(self, key: Key) -> str | None:
        owed = self.owed.get(key)
        if owed is None:
            return None
        return owed.url if owed.target == "job" else self.server_url


_STEPS: dict[type, Callable[[Notifications, Any, Record], None]] = {
    ev.ServerNotifyUrlSet: Notifications._url_set,
    ev.NotificationDelivered: Notifications._delivered,
    ev.NotificationFailed: lambda self, e, record: self._failed(e),
    ev.AttemptEnded: Notifications._attempt_ended,
    **{kind: Notifications._terminal for kind in TERMINAL_EVENTS}}
Notifications.STEPS = _STEPS


# --- deciding a try's outcome (pure) ------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """How often a notification is tried: by default 5 tries over 10 minutes (after 15 s,
    45 s, 2 min 15 s and 6 min 45 s)."""

    tries: int = 5
    first_delay: float = 15.0
    factor: float = 3.0

    def delay_after(self, tries: int) -> float:
        """Seconds between try ``tries`` and the next."""
        return self.first_delay * self.factor ** (tries - 1)


class TryResult(NamedTuple):
    """What one POST got: the receiver's status, or why there was none."""

    status: int | None
    error: str = ""

    @property
    def delivered(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


def decide_try(key: Key, owed: Owed, result: TryResult | None, now: float,
               policy: RetryPolicy) -> ev.Event:
    """The event that records a try (``result``), or that there is nowhere to send it
    (None: the server's URL was removed since the job ended)."""
    job_id, ending, target = key
    if result is None:
        return ev.NotificationFailed(
            job_id=job_id, ending=ending, target=target, tries=owed.tries,
            error="the server has no --notify-url any more: given up")
    tries = owed.tries + 1
    if result.delivered:
        assert result.status is not None
        return ev.NotificationDelivered(job_id=job_id, ending=ending, target=target,
                                        tries=tries, status=result.status)
    retry_at = now + policy.delay_after(tries) if tries < policy.tries else None
    return ev.NotificationFailed(job_id=job_id, ending=ending, target=target, tries=tries,
                                 error=result.error, status=result.status, retry_at=retry_at)


# --- what is sent -----------------------------------------------------------------------


def iso(epoch: float | None) -> str | None:
    """ISO 8601 in UTC with its offset, to the millisecond."""
    if epoch is None:
        return None
    moment = datetime.datetime.fromtimestamp(epoch, datetime.UTC)
    return moment.isoformat(timespec="milliseconds")


def notification_id(key: Key) -> str:
    """Names one notification in every try of it: a receiver can drop a repeat."""
    return f"{key[0]}.{key[1]}.{key[2]}"


def payload(key: Key, owed: Owed) -> dict[str, Any]:
    """The JSON body of the next try (docs/api.md, "Completion callbacks"): the job's
    facts, never its command, environment or metadata."""
    e = owed.ending
    return {
        "event": "job.ended", "notification_id": notification_id(key), "try": owed.tries + 1,
        "target": owed.target, "job_id": e.job_id, "name": e.name, "user": e.user,
        "team": e.team, "status": e.status, "exit_code": e.exit_code, "attempt": e.attempt,
        "max_attempts": e.max_attempts, "reason": e.reason, "node": e.node,
        "submitted_at": iso(e.submitted_at), "submitted_at_epoch": e.submitted_at,
        "started_at": iso(e.started_at), "started_at_epoch": e.started_at,
        "ended_at": iso(e.ended_at), "ended_at_epoch": e.ended_at,
    }
