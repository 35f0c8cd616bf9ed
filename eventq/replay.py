"""Reading the log offline: verify the chain, the anchored head and the invariants, fold
state at any seq. ``verify`` applies exactly the checks a start applies (``eventq.log``)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field

from eventq import events as ev
from eventq.actors.allocator import GpuTable
from eventq.actors.scheduler_state import SchedulerState
from eventq.log import (
    GENESIS,
    AnchorKey,
    HeadTrust,
    LogCorrupt,
    Record,
    check_head,
    iter_verified,
    settle_failed_fold,
)


@dataclass
class Invariants:
    """Folds the log and notes every breach of the rules eventq promises."""

    held: dict[tuple[str, int], tuple[str, int]] = field(default_factory=dict)
    active: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def evolve(self, r: Record) -> None:
        e = r.event
        if isinstance(e, ev.GpusAllocated):
            for gpu in e.gpus:
                holder = self.held.get((e.node, gpu))
                if holder is not None:
                    self.problems.append(f"seq {r.seq}: GPU {e.node}:{gpu} given to "
                                         f"{e.job_id}#{e.attempt} while {holder} holds it")
                self.held[(e.node, gpu)] = (e.job_id, e.attempt)
        elif isinstance(e, ev.GpusReleased):
            for gpu in e.gpus:
                self.held.pop((e.node, gpu), None)
        elif isinstance(e, ev.AttemptDispatched):
            if e.job_id in self.active:
                self.problems.append(f"seq {r.seq}: job {e.job_id} dispatched as attempt "
                                     f"{e.attempt} while attempt {self.active[e.job_id]} runs")
            self.active[e.job_id] = e.attempt
        elif isinstance(e, ev.AttemptEnded) and self.active.get(e.job_id) == e.attempt:
            del self.active[e.job_id]


@dataclass
class Folded:
    """The state of the actors as of a seq."""

    scheduler: SchedulerState = field(default_factory=SchedulerState)
    gpus: GpuTable = field(default_factory=GpuTable)
    invariants: Invariants = field(default_factory=Invariants)
    last_seq: int = 0
    last_time: float = 0.0
    last_hash: bytes = GENESIS

    def evolve(self, record: Record) -> None:
        self.scheduler.evolve(record)
        self.gpus.evolve(record)
        self.invariants.evolve(record)
        self.last_seq, self.last_time, self.last_hash = record.seq, record.time, record.hash


def fold(conn: sqlite3.Connection, to_seq: int | None = None,
         at_time: float | None = None) -> Folded:
    """Fold verified records up to ``to_seq`` (or ``at_time``)."""
    folded = Folded()
    with folded.scheduler.replaying():  # as a server's start folds
        for record in iter_verified(conn):
            if (to_seq is not None and record.seq > to_seq) or \
                    (at_time is not None and record.time > at_time):
                break
            folded.evolve(record)
    return folded


@dataclass
class Verified:
    events: int
    #: Breaches of the invariants (a GPU held twice, a job run twice).
    problems: list[str]
    trust: HeadTrust


def verify(conn: sqlite3.Connection, key: AnchorKey | None) -> Verified:
    """The whole chain from seq 1, the anchored head (``key``: the log's, if it has one)
    and the invariants. Raises ``LogCorrupt`` naming the seq where the log was changed."""
    folded = Folded()
    records = iter_verified(conn)
    record = None
    with folded.scheduler.replaying():
        try:
            for record in records:
                folded.evolve(record)
        except LogCorrupt:
            raise
        except Exception:
            settle_failed_fold(conn, records, record, key)
            raise
    trust = check_head(conn, (folded.last_seq, folded.last_hash), key)
    return Verified(folded.last_seq, folded.invariants.problems, trust)


def select(records: Iterator[Record], job: str | None = None, type_: str | None = None,
           principal: str | None = None) -> Iterator[Record]:
    for r in records:
        if job is not None and ev.event_job_id(r.event) != job:
            continue
        if type_ is not None and r.type != type_:
            continue
        if principal is not None and r.principal != principal:
            continue
        yield r


def job_history(conn: sqlite3.Connection, job_id: str,
                also: tuple[type[ev.Event], ...] = ()) -> Iterator[Record]:
    """Every verified record about one job, including a purge that names it; and every
    record of the ``also`` types (those of the workers started for it, say)."""
    for r in iter_verified(conn):
        e = r.event
        if ev.event_job_id(e) == job_id or isinstance(e, also) \
                or (isinstance(e, ev.JobsPurged) and job_id in e.job_ids):
            yield r


@dataclass
class Holdings:
    """The state at a point of the log, and since when each held GPU was held."""

    folded: Folded
    #: (node, gpu) -> time of the GpusAllocated that gave it to its holder.
    since: dict[tuple[str, int], float]
    first_time: float | None


def holdings_at(conn: sqlite3.Connection, to_seq: int | None = None,
                at_time: float | None = None) -> Holdings:
    """Fold verified records up to ``to_seq`` (or ``at_time``), noting allocation times."""
    folded = Folded()
    since: dict[tuple[str, int], float] = {}
    first_time: float | None = None
    for record in iter_verified(conn):
        if first_time is None:
            first_time = record.time
        if (to_seq is not None and record.seq > to_seq) or \
                (at_time is not None and record.time > at_time):
            break
        folded.evolve(record)
        if isinstance(record.event, ev.GpusAllocated):
            for gpu in record.event.gpus:
                since[(record.event.node, gpu)] = record.time
    held = {(node, gpu) for node, n in folded.gpus.nodes.items() for gpu in n.held}
    return Holdings(folded, {k: v for k, v in since.items() if k in held}, first_time)


__all__ = ["Folded", "Holdings", "Invariants", "LogCorrupt", "Verified", "fold", "holdings_at",
           "job_history", "select", "verify"]
