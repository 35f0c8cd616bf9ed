"""A long queue: what a pass reaches, and counts kept as the log moves on that never drift.

The queue here is written into the real log in batches, as a long-lived server's would
have grown, and the scheduler's pass runs as it does after any event.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable

from hypothesis import given, settings
from hypothesis import strategies as st

from eventq import events as ev
from eventq import policy
from eventq.actors.allocator import GpuTable
from eventq.actors.scheduler import Process, Submit
from eventq.actors.scheduler_state import TERMINAL, SchedulerState
from eventq.events import Limits
from eventq.http import listing
from eventq.log import Record
from eventq.projections.queue import QueueView, _statuses
from eventq.server import Orchestrator

MakeOrch = Callable[..., Awaitable[Orchestrator]]
ONE_EACH = Limits(max_concurrent=50, user_max_concurrent=1, local_job_max_concurrent=50)


def spec(job_id: str, user: str, gpus: int = 1, **fields: object) -> ev.JobSpec:
    return ev.JobSpec(job_id=job_id, user=user, priority=10, command=["sleep", "60"],
                      gpus=gpus, **fields)  # type: ignore[arg-type]


async def queue_behind(orch: Orchestrator, specs: list[ev.JobSpec]) -> None:
    """Append the jobs' submissions as one batch, then let the scheduler run its pass."""
    orch.log.append("user:alice", [ev.JobSubmitted(job=s) for s in specs])
    await orch.log.flush()
    await orch.scheduler.ask(Process())


async def test_a_users_sweep_at_its_limit_does_not_keep_another_users_job_waiting(
        make_orch: MakeOrch) -> None:
    """Alice runs one job (her limit) and has more queued than a pass examines; Bob's job,
    behind them all, starts on a free GPU: a sweep must not starve every other user."""
    orch = await make_orch("2xA100-80GB", limits=ONE_EACH)
    await orch.scheduler.ask(Submit(spec("a-running", "alice"), "user:alice"))
    assert orch.state.jobs["a-running"].status in ("dispatched", "running")
    sweep = [spec(f"a{i:05d}", "alice") for i in range(policy.SCAN_DEPTH + 50)]
    await queue_behind(orch, [*sweep, spec("bob-1", "bob")])
    assert orch.state.jobs["bob-1"].status in ("dispatched", "running")
    assert orch.state.jobs["a00000"].status == "pending"
    held = orch.queue.job("a00000")
    assert held is not None and "user_limit" in [r["code"] for r in held["reasons"]]


async def test_a_pass_stops_once_no_job_left_in_it_could_start(make_orch: MakeOrch) -> None:
    """Every GPU busy, and the only job needing no GPU waits for a worker near the head of
    the queue: the pass stops REASON_DEPTH jobs after it instead of walking SCAN_DEPTH."""
    orch = await make_orch("1xA100-80GB", limits=Limits(max_concurrent=50,
                                                        user_max_concurrent=50,
                                                        local_job_max_concurrent=50))
    await orch.scheduler.ask(Submit(spec("running", "alice"), "user:alice"))
    cpu = spec("cpu-for-a-worker", "alice", gpus=0, target="worker")
    await queue_behind(orch, [cpu, *(spec(f"g{i:05d}", "alice") for i in range(500))])
    plan = orch.scheduler.last_plan
    assert plan.placements == []
    assert len(plan.reasons) <= policy.REASON_DEPTH
    assert [r.code for r in plan.reasons["cpu-for-a-worker"]] == ["no_worker"]


async def test_a_job_needing_no_gpu_starts_from_deep_in_a_queue_waiting_for_gpus(
        make_orch: MakeOrch) -> None:
    """Every GPU busy and more GPU jobs queued than a pass examines: a job that needs no
    GPU behind them all still starts, as the policy skips each job that cannot."""
    orch = await make_orch("1xA100-80GB", limits=Limits(max_concurrent=50,
                                                        user_max_concurrent=50,
                                                        local_job_max_concurrent=50))
    await orch.scheduler.ask(Submit(spec("running", "alice"), "user:alice"))
    gpu_jobs = [spec(f"g{i:05d}", "alice") for i in range(policy.SCAN_DEPTH + 50)]
    await queue_behind(orch, [*gpu_jobs, spec("cpu-last", "bob", gpus=0)])
    assert orch.state.jobs["cpu-last"].status in ("dispatched", "running")
    assert orch.state.jobs["g00000"].status == "pending"


# --- counts kept as the log moves on equal counts from scratch ----------------------------

USERS = ("alice", "bob", "carol")
Step = tuple[str, int, int]


def fold(state: SchedulerState, queue: QueueView, seq: int, event: ev.Event,
         at: float) -> None:
    record = Record(seq, at, "user:x", event, b"")
    state.evolve(record)
    queue.evolve(record)
    RECORDS.append(record)


#: What the last ``play`` folded, for a replay of the same events.
RECORDS: list[Record] = []


def play(steps: list[Step]) -> tuple[SchedulerState, QueueView]:
    """Submissions, cancels, starts, ends, holds and priority changes, folded as the log
    would fold them; a step naming a job in the wrong status is skipped."""
    state = SchedulerState()
    queue = QueueView(state, GpuTable())
    seq, made = 0, 0
    RECORDS.clear()
    for kind, pick, value in steps:
        seq += 1
        at = 1_700_000_000.0 + seq
        ids = sorted(state.jobs)
        job = state.jobs[ids[pick % len(ids)]] if ids else None
        event: ev.Event | None = None
        if kind == "submit" or job is None:
            made += 1
            event = ev.JobSubmitted(job=ev.JobSpec(
                job_id=f"j{made:04d}", user=USERS[value % 3], priority=(0, 10, 20)[pick % 3],
                command=["x"], gpus=value % 2, team=("t1", None)[value % 2]))
        elif kind == "cancel" and job.status in ("pending", "held"):
            event = ev.JobCancelled(job_id=job.spec.job_id)
        elif kind == "start" and job.status == "pending":
            event = ev.AttemptDispatched(job_id=job.spec.job_id, attempt=job.attempt + 1,
                                         node="local", gpus=[0] * job.spec.gpus)
        elif kind == "end" and job.active:
            fold(state, queue, seq, ev.AttemptEnded(job_id=job.spec.job_id,
                                                    attempt=job.attempt, outcome="exited",
                                                    exit_code=0), at)
            seq += 1
            event = ev.JobCompleted(job_id=job.spec.job_id)
        elif kind == "hold" and job.status == "pending":
            event = ev.JobHeld(job_id=job.spec.job_id)
        elif kind == "release" and job.status == "held":
            event = ev.JobReleased(job_id=job.spec.job_id)
        elif kind == "priority" and job.status == "pending":
            event = ev.PriorityChanged(job_id=job.spec.job_id, priority_override=value * 7)
        if event is not None:
            fold(state, queue, seq, event, at)
    return state, queue


steps = st.lists(st.tuples(st.sampled_from(["submit", "submit", "cancel", "start", "end",
                                            "hold", "release", "priority"]),
                           st.integers(0, 1000), st.integers(0, 30)), max_size=80)


@settings(max_examples=150, deadline=None)
@given(steps)
def test_the_counts_views_read_equal_a_count_from_scratch(played: list[Step]) -> None:
    state, queue = play(played)
    jobs = state.jobs.values()
    stats = queue.stats()
    assert stats["by_status"] == dict(Counter(j.status for j in jobs))
    assert stats["by_user"] == dict(Counter(j.spec.user for j in jobs
                                            if j.status not in TERMINAL))
    assert stats["queue_depth"] == sum(1 for j in jobs if j.status == "pending")
    assert stats["running"] == sum(1 for j in jobs if j.active)
    replayed = SchedulerState()
    with replayed.replaying():  # as a start folds the log: the indexes built at the end
        for record in RECORDS:
            replayed.evolve(record)
    assert replayed.snapshot() == state.snapshot()
    for status, ids in state.ids_by_status.items():
        assert list(ids) == sorted(j.spec.job_id for j in jobs if j.status == status)
    assert sum(map(len, state.ids_by_user_status.values())) == len(state.jobs)
    for (status, user), ids in state.ids_by_user_status.items():
        assert list(ids) == sorted(j.spec.job_id for j in jobs
                                   if j.status == status and j.spec.user == user)


@settings(max_examples=200, deadline=None)
@given(steps, st.sampled_from([None, "queued", "running", "completed", "cancelled,held"]),
       st.sampled_from([None, *USERS]), st.integers(1, 6), st.booleans(), st.integers(0, 90),
       st.sampled_from(["submitted", "status"]), st.integers(0, 9))
def test_a_page_from_the_sorted_ids_is_the_page_of_every_job_sorted(
        played: list[Step], status: str | None, user: str | None, limit: int,
        descending: bool, after: int, sort: str, rank: int) -> None:
    """The jobs table's pages by submission and by status, read from the sorted ids, are
    the pages a sort of every matching job gives, with the same total and the same
    ``more``, from any cursor."""
    state, _ = play(played)
    match = listing.Filter(_statuses(status, include_completed=True), user, None, "")
    key, ids = listing.SORTS[sort][0], sorted(state.jobs)
    if rank < 5 and ids:  # the cursor of a row a page gave
        job_id = ids[after % len(ids)]
        cursor: tuple[object, str] | None = (key(state.jobs[job_id]), job_id)
    else:  # or of a row since gone or moved
        job_id = f"j{after:04d}"
        cursor = None if after == 0 else (job_id if sort == "submitted" else rank, job_id)
    paged = listing.by_submission if sort == "submitted" else listing.by_status
    assert paged(state, match, cursor, limit, descending) == \
        listing.by_sorting(state, key, match, cursor, limit, descending)


@settings(max_examples=150, deadline=None)
@given(steps, st.integers(0, 3))
def test_the_pass_order_is_the_queue_order_less_what_a_limit_holds(
        played: list[Step], capped_user: int) -> None:
    """With nothing capped, the walk a pass takes is the queue's order; with a user capped,
    the same order without that user's jobs (once the walk skips)."""
    state, _ = play(played)
    now = 1_700_000_000.0 + len(played) + 1
    order = [j.spec.job_id for j in state.iter_waiting(now)]
    assert [j.spec.job_id for j in state.iter_schedulable(now, policy.Capped())] == order
    if capped_user < len(USERS):
        capped = policy.Capped(users={USERS[capped_user]}, skipping=True)
        assert [j.spec.job_id for j in state.iter_schedulable(now, capped)] == [
            j for j in order if state.jobs[j].spec.user != USERS[capped_user]]
    assert [state.position(j, now) for j in order] == list(range(1, len(order) + 1))


def test_the_reservation_goes_to_the_highest_job_lacking_gpus_even_past_the_skipping() -> None:
    """No GPU free, a hundred and more of Alice's jobs held by her limit, then Bob's job
    lacking only GPUs, then a job needing no GPU (so the walk goes on): once the walk
    skips, it still reaches Bob's job and reserves the GPU for it (EASY), rather than
    leaving out every job that needs GPUs at once."""
    state = SchedulerState()
    jobs = [spec(f"a{i:04d}", "alice") for i in range(policy.REASON_DEPTH + 50)]
    cpu = spec("cpu-last", "carol", gpus=0, target="worker")
    for seq, queued in enumerate([*jobs, spec("bob-big", "bob"), cpu], start=1):
        state.evolve(Record(seq, 1_700_000_000.0, "user:x", ev.JobSubmitted(job=queued), b""))
    node = policy.NodeView("local", True, set(), 1, [(1_700_000_600.0, 1, "running")])
    counts = policy.Counts(total=1, by_user=Counter(alice=1), local_jobs=1, local_gpus=1)
    capped = policy.Capped()
    now = 1_700_000_001.0
    plan = policy.plan(state.iter_schedulable(now, capped), counts, ONE_EACH, [node], now,
                       cpu_jobs_waiting=1, capped=capped)
    assert plan.reservation is not None and plan.reservation.job_id == "bob-big"
    assert [r.code for r in plan.reasons["bob-big"]] == ["gpus"]
