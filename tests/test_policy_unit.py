"""The pure policy: EASY reservation goes to the highest job held by GPUs, and stays there."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from eventq import policy
from eventq.actors.scheduler_state import SchedulerState
from eventq.events import AttemptDispatched, AttemptEnded, JobSpec, JobSubmitted, Limits
from eventq.log import Record

NOW = 1_000_000.0
ROOMY = Limits(max_concurrent=50, user_max_concurrent=50, local_job_max_concurrent=50)


@dataclass
class Queued:
    spec: JobSpec
    queued_at: float = NOW


def job(job_id: str, gpus: int, runtime: float | None = None) -> Queued:
    return Queued(JobSpec(job_id=job_id, user="u", priority=10, command=["x"], gpus=gpus,
                          max_runtime=runtime))


def busy_node() -> policy.NodeView:
    """4 GPUs: GPU 3 free, GPUs 0-2 held by one attempt that ends in 10 minutes."""
    return policy.NodeView("local", True, {3}, 4, [(NOW + 600, 3, "running")])


def test_the_reservation_is_for_the_highest_job_lacking_gpus() -> None:
    queue = [job("big", 4), job("middle", 2), job("long", 1, runtime=3600)]
    plan = policy.plan(iter(queue), policy.Counts(), ROOMY, [busy_node()], NOW)
    assert plan.placements == [], "the long job would take a GPU the big one waits for"
    assert plan.reservation is not None and plan.reservation.job_id == "big"
    assert plan.reservation.shadow == NOW + 600
    assert [r.code for r in plan.reasons["long"]] == ["reserved"]
    assert [r.code for r in plan.reasons["middle"]] == ["gpus"]


def test_a_short_job_backfills_before_the_shadow_time() -> None:
    queue = [job("big", 4), job("short", 1, runtime=300)]
    plan = policy.plan(iter(queue), policy.Counts(), ROOMY, [busy_node()], NOW)
    assert [p.job_id for p in plan.placements] == ["short"]


def test_with_an_unknown_end_nothing_takes_the_gpus_the_big_job_waits_for() -> None:
    node = policy.NodeView("local", True, {3}, 4, [(None, 3, "running")])
    plan = policy.plan(iter([job("big", 4), job("short", 1, runtime=1)]), policy.Counts(),
                       ROOMY, [node], NOW)
    assert plan.placements == []
    assert plan.reservation is not None and plan.reservation.waits_for == "running"
    assert "starts in unknown" in plan.reasons["short"][0].detail


def test_estimates_follow_the_free_times_of_the_gpus() -> None:
    starts = policy.estimate_starts([job("big", 4).spec, job("next", 1, runtime=60).spec],
                                    [busy_node()], NOW)
    assert starts["big"].start == NOW + 600
    assert starts["next"].start is None, "the big job's end is unknown, so is what follows"
    assert "waits for job big" in starts["next"].note


def test_a_gpu_held_by_no_listed_attempt_gives_no_estimate_rather_than_an_error() -> None:
    """A worker removed by force keeps its GPUs held until its attempt's end is known, with
    no active attempt to list: a job needing that GPU has no estimate (it was an
    IndexError, and GET /api/jobs/{id} answered 500)."""
    held = policy.NodeView("w1", False, set(), 1, [])
    starts = policy.estimate_starts([job("next", 1).spec], [held], NOW)
    assert starts["next"].start is None and "not known" in starts["next"].note


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([0, 10, 20, 30]), st.floats(0, 7200)),
                min_size=1, max_size=40), st.floats(0, 7200))
def test_a_position_is_the_place_in_the_queue_order(jobs: list[tuple[int, float]],
                                                    later: float) -> None:
    """Several priorities, each job queued at its own time, aging on: the position the
    submit reply and ``/position`` give is the job's place in the order dispatch walks."""
    state = SchedulerState()
    state.limits = Limits(starvation_threshold_minutes=10, aging_boost=10)
    for seq, (priority, at) in enumerate(sorted(jobs, key=lambda j: j[1]), start=1):
        spec = JobSpec(job_id=f"j{seq}", user="u", priority=priority, command=["x"])
        state.evolve(Record(seq, NOW + at, "u", JobSubmitted(job=spec), b""))
    now = NOW + 7200 + later
    order = [j.spec.job_id for j in state.iter_waiting(now)]
    assert [state.position(job_id, now) for job_id in order] == list(range(1, len(order) + 1))


def test_each_limit_that_holds_a_job_names_the_command_that_raises_it() -> None:
    spec = JobSpec(job_id="j", user="alice", priority=10, command=["x"], gpus=2, team="vision")
    counts = policy.Counts(total=4, by_user=Counter(alice=4), by_team=Counter(vision=4),
                           local_jobs=4, local_gpus=3)
    full = Limits(max_concurrent=4, user_max_concurrent=4, team_max_concurrent=4,
                  enable_fair_share=True, local_job_max_concurrent=4, local_gpu_max_concurrent=4)
    node = policy.NodeView("local", True, {3, 4, 5}, 8)
    reasons = policy.explain(spec, counts, full, [node], None, NOW)
    assert [(r.code, r.detail) for r in reasons] == [
        ("global_limit", "4 of 4 running (raise with `eventq queue limits --max N`)"),
        ("user_limit", "alice runs 4 of 4 (raise with `eventq queue limits --per-user N`)"),
        ("team_limit", "team vision runs 4 of 4 (raise with `eventq queue limits --per-team N`)"),
        ("local_limit", "local runs 4 of 4 jobs (raise with `eventq queue limits --local-jobs "
                        "N`)"),
        ("local_limit", "local GPUs in use 3 + 2 needed > 4 (raise with `eventq queue limits "
                        "--local-gpus N`)")]


def test_without_a_local_job_limit_only_the_gpus_bound_the_local_node() -> None:
    node = policy.NodeView("local", True, {0, 1, 2, 3}, 4)
    queue = [job(f"j{i}", 2) for i in range(3)]
    plan = policy.plan(iter(queue), policy.Counts(), Limits(max_concurrent=50,
                                                             user_max_concurrent=50),
                       [node], NOW)
    assert [p.job_id for p in plan.placements] == ["j0", "j1"]
    assert [r.code for r in plan.reasons["j2"]] == ["gpus"]


def test_a_cpu_job_with_target_auto_is_placed_on_the_local_node_not_a_worker() -> None:
    local = policy.NodeView("local", True, set(), 0)
    worker = policy.NodeView("w1", False, {0}, 1, labels={"kind": "cpu"}, idle_since=NOW - 60)

    def node_of(**fields: object) -> str:
        spec = JobSpec(job_id="cpu", user="u", priority=10, command=["x"], **fields)  # type: ignore[arg-type]
        return policy.plan_one(spec, policy.Counts(), ROOMY, [worker, local], None,
                               NOW).placements[0].node

    assert node_of(gpus=0) == "local"
    assert node_of(gpus=0, target="worker") == "w1"
    assert node_of(gpus=0, worker_labels={"kind": "c*"}) == "w1"
    assert node_of(gpus=1) == "w1"


def test_once_nothing_can_start_each_job_s_reasons_are_what_it_alone_would_be_told() -> None:
    """Past the point where no GPU is free and the reservation is made, jobs of one shape
    share one look: each must still get exactly the reasons a look at it alone gives."""
    limits = Limits(max_concurrent=50, user_max_concurrent=2, local_job_max_concurrent=50)
    worker = policy.NodeView("w1", False, set(), 2, [(NOW + 600, 2, "running")],
                             {"zone": "a"}, None, None, NOW + 900)
    local = policy.NodeView("local", True, set(), 4, [(None, 4, "other")])
    counts = policy.Counts(4, Counter({"u": 1, "capped": 2}), Counter(), 1, 4)
    shapes = [dict(gpus=2), dict(gpus=1, max_runtime=60.0), dict(gpus=1, max_runtime=1200.0),
              dict(gpus=1, user="capped"), dict(gpus=4, target="local"),
              dict(gpus=1, worker_labels={"zone": "b"}), dict(gpus=1, target="worker")]
    queue = [Queued(JobSpec(job_id=f"j{i}", priority=10, command=["x"],
                            **{"user": "u", **shapes[i % len(shapes)]}))  # type: ignore[arg-type]
             for i in range(40)]
    plan = policy.plan(iter(queue), counts, limits, [worker, local], NOW, cpu_jobs_waiting=0)
    assert plan.placements == [] and plan.reservation is not None
    for queued in queue[1:]:
        alone = policy.explain(queued.spec, counts, limits, [worker, local], plan.reservation,
                               NOW)
        assert plan.reasons[queued.spec.job_id] == alone, queued.spec


def test_a_job_without_an_estimate_is_expected_to_take_the_median_of_its_names_last_20() -> None:
    """Runtimes of one user's job name, 25 of them, out of order and one repeated: a new
    attempt of that name is expected to end after the median of the latest 20 (the oldest
    five no longer count), however the runs that left the window compared."""
    state, seq = SchedulerState(), 0

    def fold(event: object, at: float) -> None:
        nonlocal seq
        seq += 1
        state.evolve(Record(seq, at, "u", event, b""))  # type: ignore[arg-type]

    runtimes = [1000.0 + (i * 37) % 23 * 10 for i in range(24)] + [1000.0]
    for i, runtime in enumerate(runtimes):
        spec = JobSpec(job_id=f"j{i}", user="u", priority=10, command=["x"], name="train")
        fold(JobSubmitted(job=spec), NOW)
        fold(AttemptDispatched(job_id=f"j{i}", attempt=1, node="local", gpus=[0]), NOW)
        fold(AttemptEnded(job_id=f"j{i}", attempt=1, outcome="exited", exit_code=0),
             NOW + runtime)
    fold(JobSubmitted(job=JobSpec(job_id="next", user="u", priority=10, command=["x"],
                                  name="train")), NOW)
    fold(AttemptDispatched(job_id="next", attempt=1, node="local", gpus=[0]), NOW + 50)
    latest = sorted(runtimes[-20:])
    assert state.jobs["next"].expected_end == NOW + 50 + (latest[9] + latest[10]) / 2
    assert state.runtimes[("u", "train")] == runtimes[-20:]
