"""Random command sequences against the real actors and a real SQLite log.

Whatever users and nodes do — submit, cancel, attempts that start, exit, get lost or
report late, limit changes, time passing — after every step: no GPU is held twice,
no dispatch broke a limit, and folding the SQLite file from scratch gives exactly the
state the live actors hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eventq import events as ev
from eventq import gpus, replay
from eventq.actors.allocator import Allocator, GpuTable, ReportInventory
from eventq.actors.scheduler import (
    AttemptReport,
    Cancel,
    CommandError,
    Process,
    Scheduler,
    SetLimits,
    Submit,
)
from eventq.actors.scheduler_state import SchedulerState
from eventq.clock import SimClock
from eventq.log import EventLog, Record

USERS = ("ada", "ben", "cy")
INVENTORY = gpus.simulated("4xA100-80GB")
START_LIMITS = ev.Limits(max_concurrent=4, user_max_concurrent=2, team_max_concurrent=3,
                         enable_fair_share=True, local_job_max_concurrent=4)

# --- the steps ------------------------------------------------------------------------


@dataclass(frozen=True)
class SubmitJob:
    gpus: int
    user: int
    team: str | None
    priority: int
    max_attempts: int
    retry_on_failure: bool
    max_runtime: float | None
    no_wait: bool


@dataclass(frozen=True)
class CancelJob:
    pick: int


@dataclass(frozen=True)
class StartAttempt:
    pick: int


@dataclass(frozen=True)
class EndAttempt:
    pick: int
    outcome: str  # "0", "1" (exit codes) or "lost"


@dataclass(frozen=True)
class LateReport:
    """An ended report from an attempt that is no longer the job's current one."""

    pick: int


@dataclass(frozen=True)
class ChangeLimits:
    limits: ev.Limits


@dataclass(frozen=True)
class Advance:
    seconds: float


Step = SubmitJob | CancelJob | StartAttempt | EndAttempt | LateReport | ChangeLimits | Advance

limits_strategy = st.builds(
    ev.Limits,
    max_concurrent=st.integers(1, 6), user_max_concurrent=st.integers(1, 3),
    team_max_concurrent=st.integers(1, 4), enable_fair_share=st.booleans(),
    local_job_max_concurrent=st.integers(1, 6),
    local_gpu_max_concurrent=st.none() | st.integers(1, 6),
    starvation_threshold_minutes=st.sampled_from([1.0, 60.0]))

submit_strategy = st.builds(
    SubmitJob, gpus=st.integers(0, 4), user=st.integers(0, 2),
    team=st.sampled_from(["Alpha", "Beta", None]), priority=st.sampled_from([0, 10, 20, 30]),
    max_attempts=st.integers(1, 3), retry_on_failure=st.booleans(),
    max_runtime=st.none() | st.sampled_from([30.0, 600.0]),
    no_wait=st.sampled_from([False, False, False, True]))
end_strategy = st.builds(EndAttempt, pick=st.integers(0, 50),
                         outcome=st.sampled_from(["0", "1", "lost"]))

# Submissions and ends are drawn more often than the rest, so that queues form and drain.
step_strategy: st.SearchStrategy[Step] = st.one_of(
    submit_strategy, submit_strategy, submit_strategy, end_strategy, end_strategy,
    st.builds(CancelJob, pick=st.integers(0, 50)),
    st.builds(StartAttempt, pick=st.integers(0, 50)),
    st.builds(LateReport, pick=st.integers(0, 50)),
    st.builds(ChangeLimits, limits=limits_strategy),
    st.builds(Advance, seconds=st.sampled_from([1.0, 45.0, 900.0, 4000.0])),
)

# --- the system under test ----------------------------------------------------------------


@dataclass
class Harness:
    """Log, scheduler state, GPU table, allocator and scheduler, without a node."""

    path: Path
    clock: SimClock
    log: EventLog
    state: SchedulerState = field(default_factory=SchedulerState)
    table: GpuTable = field(default_factory=GpuTable)
    step_records: list[Record] = field(default_factory=list)
    submitted: int = 0
    allocator: Allocator = field(init=False)
    scheduler: Scheduler = field(init=False)

    @classmethod
    async def open(cls, path: Path) -> Harness:
        clock = SimClock()
        h = cls(path, clock, await EventLog.open(path, clock.now))
        for fold in (h.state.evolve, h.table.evolve, h.step_records.append):
            h.log.subscribe(fold)
        h.log.start()
        h.allocator = Allocator(h.log, h.table)
        h.scheduler = Scheduler(h.log, h.state, h.allocator, h.table, clock)
        h.allocator.start()
        h.scheduler.start()
        await h.allocator.ask(ReportInventory("local", INVENTORY.gpus, simulated=True))
        await h.scheduler.ask(SetLimits(START_LIMITS, "system"))
        return h

    async def close(self) -> None:
        await self.scheduler.stop()
        await self.allocator.stop()
        await self.log.close()

    def active(self) -> list[str]:
        return sorted(j for j, job in self.state.jobs.items() if job.active)

    def pick(self, ids: list[str], pick: int) -> str | None:
        return ids[pick % len(ids)] if ids else None

    async def apply(self, step: Step) -> None:
        if isinstance(step, SubmitJob):
            self.submitted += 1
            spec = ev.JobSpec(
                job_id=f"j{self.submitted:03d}", user=USERS[step.user], priority=step.priority,
                command=["true"], name=f"gpus{step.gpus}", team=step.team, gpus=step.gpus,
                max_attempts=step.max_attempts, retry_on_failure=step.retry_on_failure,
                max_runtime=step.max_runtime)
            await self.scheduler.ask(Submit(spec, f"user:{spec.user}", step.no_wait))
        elif isinstance(step, CancelJob):
            # An unknown or finished job is refused, and nothing is recorded.
            with contextlib.suppress(CommandError):
                target = self.pick(sorted(self.state.jobs), step.pick) or "nope"
                await self.scheduler.ask(Cancel(target, "user:ada"))
        elif isinstance(step, StartAttempt | EndAttempt):
            active = self.pick(self.active(), step.pick)
            if active is not None:
                await self.scheduler.ask(self.report(active, self.state.jobs[active].attempt,
                                                     step))
        elif isinstance(step, LateReport):
            retried = self.pick(sorted(j for j, job in self.state.jobs.items()
                                       if job.attempt > 1), step.pick)
            if retried is not None:
                attempt = self.state.jobs[retried].attempt - 1
                await self.scheduler.ask(self.report(retried, attempt, EndAttempt(0, "0")))
        elif isinstance(step, ChangeLimits):
            await self.scheduler.ask(SetLimits(step.limits, "user:admin"))
        else:
            self.clock.advance(step.seconds)  # max_runtime timers tell the scheduler
            await self.scheduler.ask(Process())

    def report(self, job_id: str, attempt: int, step: StartAttempt | EndAttempt) -> AttemptReport:
        if isinstance(step, StartAttempt):
            return AttemptReport(job_id, attempt, "started", pid=4000 + attempt)
        if step.outcome == "lost":
            return AttemptReport(job_id, attempt, "ended", outcome="lost", detail="node lost")
        return AttemptReport(job_id, attempt, "ended", exit_code=int(step.outcome))


# --- what must hold after every step ------------------------------------------------------


def check_gpus(h: Harness) -> None:
    """Each active attempt holds exactly its GPUs, and no GPU has two holders."""
    expected: dict[int, tuple[str, int]] = {}
    for job_id in h.active():
        job = h.state.jobs[job_id]
        assert len(job.gpus) == job.spec.gpus
        for gpu in job.gpus:
            assert gpu not in expected, f"GPU {gpu} held by {expected[gpu]} and {job_id}"
            expected[gpu] = (job_id, job.attempt)
    assert h.table.nodes["local"].held == expected


def check_limits(h: Harness) -> None:
    """Counts are right, and whoever got a dispatch in this step stayed within every limit."""
    active = [h.state.jobs[j] for j in h.active()]
    by_user = Counter(j.spec.user for j in active)
    by_team = Counter(j.spec.team for j in active if j.spec.team)
    local_gpus = sum(j.spec.gpus for j in active)
    counts = h.state.counts
    assert (counts.total, +counts.by_user, +counts.by_team, counts.local_jobs,
            counts.local_gpus) == (len(active), by_user, by_team, len(active), local_gpus)
    dispatched = [r.event for r in h.step_records if isinstance(r.event, ev.AttemptDispatched)]
    if not dispatched:
        return
    limits = h.state.limits
    assert len(active) <= limits.max_concurrent
    assert len(active) <= limits.local_job_max_concurrent
    if limits.local_gpu_max_concurrent is not None:
        assert local_gpus <= limits.local_gpu_max_concurrent
    for e in dispatched:
        spec = h.state.jobs[e.job_id].spec
        assert by_user[spec.user] <= limits.user_max_concurrent
        if limits.enable_fair_share and spec.team:
            assert by_team[spec.team] <= limits.team_max_concurrent


async def check_replay(h: Harness) -> None:
    """The file, folded from scratch, is the live state."""
    await h.log.flush()
    with sqlite3.connect(h.path) as conn:
        folded = replay.fold(conn)
    assert folded.last_seq == h.log.head_seq, "flush() returned before all was committed"
    assert folded.scheduler.snapshot() == h.state.snapshot()
    assert folded.gpus.snapshot() == h.table.snapshot()
    assert folded.invariants.problems == []


async def run(steps: list[Step]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        h = await Harness.open(Path(tmp) / "events.db")
        try:
            await check_replay(h)
            for step in steps:
                h.step_records.clear()
                await h.apply(step)
                check_gpus(h)
                check_limits(h)
                await check_replay(h)
        finally:
            await h.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(step_strategy, min_size=15, max_size=50))
def test_random_histories_keep_the_rules_and_replay_exactly(steps: list[Step]) -> None:
    asyncio.run(run(steps))
