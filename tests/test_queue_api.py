"""The queue API of seed 000, route by route, with real jobs behind it."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient

from eventq import events as ev
from eventq.actors.allocator import GpuTable
from eventq.actors.scheduler_state import SchedulerState
from eventq.clock import SimClock
from eventq.http.app import make_app
from eventq.log import Record
from eventq.projections.queue import QueueView
from eventq.server import Orchestrator
from tests.helpers import until

AiohttpClient = Callable[..., Awaitable[TestClient[Any, Any]]]
MakeOrch = Callable[..., Awaitable[Orchestrator]]
ROOMY = ev.Limits(max_concurrent=10, user_max_concurrent=10, local_job_max_concurrent=10)


def runs_until(tmp_path: Path, name: str) -> list[str]:
    return ["sh", "-c", f"while [ ! -e {tmp_path}/{name} ]; do sleep 0.02; done"]


async def submit(api: TestClient[Any, Any], **body: Any) -> dict[str, Any]:
    resp = await api.post("/api/queue/submit", json=body)
    reply: dict[str, Any] = await resp.json()
    assert resp.status == 200, reply
    return reply




async def test_submit_answers_seed_000s_shape(api: TestClient[Any, Any], tmp_path: Path) -> None:
    await api.post("/api/queue/concurrency", json={"local_job_max_concurrent": 1})
    running = await submit(api, command=runs_until(tmp_path, "a"), gpus=2)
    assert set(running) == {"success", "job_id", "status", "allocated_gpus", "queue_position"}
    assert running["status"] == "running" and running["queue_position"] is None
    queued = await submit(api, command=["true"], gpus=1)
    assert queued["status"] == "queued" and queued["queue_position"] == 1
    assert queued["reasons"] == [{"code": "local_limit", "detail": "local runs 1 of 1 jobs "
                                  "(raise with `eventq queue limits --local-jobs N`)"}]
    rejected = await submit(api, command=["true"], gpus=1, no_wait=True)
    assert rejected["status"] == "rejected" and rejected["queue_position"] is None
    (tmp_path / "a").touch()


async def test_dry_run_says_where_and_why_and_records_nothing(
        api: TestClient[Any, Any], orch: Orchestrator, tmp_path: Path) -> None:
    await api.post("/api/queue/concurrency", json={"local_job_max_concurrent": 1})
    seq = orch.log.head_seq
    would = await submit(api, command=["true"], gpus=3, dry_run=True)
    assert would["status"] == "running" and would["allocated_gpus"] == [0, 1, 2]
    assert would["node"] == "local" and would["job_id"] is None
    assert orch.log.head_seq == seq and orch.state.jobs == {}
    await submit(api, command=runs_until(tmp_path, "b"), gpus=3, max_runtime=600)
    seq = orch.log.head_seq
    wait = await submit(api, command=["true"], gpus=2, dry_run=True)
    assert wait["status"] == "queued"
    assert {r["code"] for r in wait["reasons"]} == {"local_limit", "gpus"}
    assert wait["estimated_start"] is not None
    assert orch.log.head_seq == seq
    (tmp_path / "b").touch()


async def test_stats_me_and_position(make_orch: MakeOrch, aiohttp_client: AiohttpClient,
                                     tmp_path: Path) -> None:
    orch = await make_orch(limits=ev.Limits(max_concurrent=1, user_max_concurrent=1,
                                            local_job_max_concurrent=1))
    alice = orch.add_user("alice", ev.Level.RESEARCHER, "alpha")
    api = await aiohttp_client(make_app(orch), headers={"Authorization": f"Bearer {alice}"})
    first = await submit(api, command=runs_until(tmp_path, "c"), gpus=1, max_runtime=300)
    second = await submit(api, command=["true"], gpus=1)
    third = await submit(api, command=["true"], gpus=1, requires_approval=True)
    stats = await (await api.get("/api/queue/stats")).json()
    assert stats["queue_depth"] == 1 and stats["running"] == 1
    assert stats["by_status"] == {"running": 1, "pending": 1, "blocked": 1} or \
        stats["by_status"] == {"dispatched": 1, "pending": 1, "blocked": 1}
    assert stats["by_user"] == {"alice": 3}
    assert stats["local"]["allocated_gpus"] == [0] and stats["local"]["total_gpus"] == 4
    me = await (await api.get("/api/queue/me")).json()
    assert (me["pending_count"], me["running_count"], me["blocked_count"]) == (1, 1, 1)
    assert me["best_position"] == 1
    assert [j["job_id"] for j in me["pending_jobs"]] == [second["job_id"]]
    assert [j["job_id"] for j in me["running_jobs"]] == [first["job_id"]]
    pos = await (await api.get(f"/api/queue/position/{second['job_id']}")).json()
    assert pos["position"] == 1 and pos["queue_depth"] == 1
    assert {r["code"] for r in pos["reasons"]} == {"global_limit", "user_limit", "local_limit"}
    assert pos["estimated_start"] is not None, "the running job's max_runtime bounds it"
    assert pos["estimate_basis"] == {
        "kind": "job_ends", "job_id": first["job_id"], "name": "sh",
        "status": orch.state.jobs[first["job_id"]].status, "end": pos["estimated_start"],
        "by": "time_limit", "frees": "slot"}, "a slot of the limits frees when it ends"
    blocked = await (await api.get(f"/api/queue/position/{third['job_id']}")).json()
    assert blocked["status"] == "blocked" and blocked["reasons"][0]["code"] == "approval"
    (tmp_path / "c").touch()


async def test_approval_by_flag_or_cost_then_approve_or_reject(
        api: TestClient[Any, Any], orch: Orchestrator) -> None:
    await api.post("/api/queue/concurrency", json={"approval_cost_threshold": 100.0,
                                                   "local_job_max_concurrent": 4})
    flagged = await submit(api, command=["true"], gpus=0, requires_approval=True)
    costly = await submit(api, command=["true"], gpus=0, estimated_cost=250.0)
    cheap = await submit(api, command=["true"], gpus=0, estimated_cost=20.0)
    assert (flagged["status"], costly["status"]) == ("blocked", "blocked")
    assert cheap["status"] == "running"
    listed = await (await api.get("/api/queue?status=blocked")).json()
    assert {j["job_id"] for j in listed["jobs"]} == {flagged["job_id"], costly["job_id"]}
    approved = await (await api.post(f"/api/queue/{flagged['job_id']}/approve")).json()
    assert approved["success"] and approved["status"] in ("dispatched", "running", "completed")
    # a rejection says why, in printable words, or is refused
    for blank in ("", "?reason=", "?reason=%20%20", "?reason=a%01b"):
        refused = await api.post(f"/api/queue/{costly['job_id']}/reject{blank}")
        assert refused.status == 422 and (await refused.json())["field"] == "reason"
    assert (await (await api.get(f"/api/jobs/{costly['job_id']}")).json())["status"] == "blocked"
    await api.post(f"/api/queue/{costly['job_id']}/reject?reason=over budget")
    job = await (await api.get(f"/api/jobs/{costly['job_id']}")).json()
    assert job["status"] == "rejected"
    again = await api.post(f"/api/queue/{costly['job_id']}/approve")
    assert again.status == 409 and "rejected" in (await again.json())["error"]


async def test_priority_hold_release_and_process(api: TestClient[Any, Any],
                                                 orch: Orchestrator, tmp_path: Path) -> None:
    await api.post("/api/queue/concurrency", json={"local_job_max_concurrent": 1})
    await submit(api, command=runs_until(tmp_path, "d"), gpus=0)
    early = await submit(api, command=["true"], gpus=0)
    late = await submit(api, command=["true"], gpus=0)
    await api.post(f"/api/queue/{late['job_id']}/priority", json={"priority": 90})
    order = [j["job_id"] for j in (await (await api.get("/api/queue?status=pending")).json())
             ["jobs"]]
    assert order == [late["job_id"], early["job_id"]]
    held = await (await api.post(f"/api/queue/{late['job_id']}/hold")).json()
    assert held["status"] == "held"
    assert [j["job_id"] for j in (await (await api.get("/api/queue?status=pending")).json())
            ["jobs"]] == [early["job_id"]]
    assert (await (await api.post(f"/api/queue/{late['job_id']}/release")).json())["status"] \
        == "pending"
    processed = await (await api.post("/api/queue/process")).json()
    assert processed == {"success": True, "dispatched": 0, "queue_depth": 2}
    (tmp_path / "d").touch()
    await until(lambda: orch.state.jobs[late["job_id"]].status == "completed")
    await until(lambda: orch.state.jobs[early["job_id"]].status == "completed")
    dispatches = [r.event.job_id for r in await orch.log.read()
                  if isinstance(r.event, ev.AttemptDispatched)]
    assert dispatches[1:] == [late["job_id"], early["job_id"]], "the override ran first"


async def test_cancel_many_is_one_command_and_the_queue_goes_on(
        api: TestClient[Any, Any], orch: Orchestrator, tmp_path: Path) -> None:
    await api.post("/api/queue/concurrency", json={"local_job_max_concurrent": 2,
                                                   "user_max_concurrent": 5})
    running = [await submit(api, command=runs_until(tmp_path, "never"), gpus=0)
               for _ in range(2)]
    waiting = [await submit(api, command=["true"], gpus=0) for _ in range(3)]
    reply = await (await api.post("/api/queue/cancel", json={"status": ["pending"]})).json()
    assert reply["cancelled"] == 3
    assert sorted(reply["job_ids"]) == sorted(j["job_id"] for j in waiting)
    cancelled = [r for r in await orch.log.read() if r.type == "job_cancelled"]
    assert len({r.seq for r in cancelled}) == 3 and len({r.time for r in cancelled}) == 1
    after = await submit(api, command=["true"], gpus=0)
    await (await api.post("/api/queue/cancel", json={"status": ["running"]})).json()
    await until(lambda: orch.state.jobs[after["job_id"]].status == "completed")
    assert all(orch.state.jobs[j["job_id"]].status == "cancelled" for j in running)


async def test_cleanup_removes_only_old_finished_jobs(api: TestClient[Any, Any],
                                                      orch: Orchestrator, clock: SimClock,
                                                      tmp_path: Path) -> None:
    done = await submit(api, command=["true"], gpus=0)
    await until(lambda: orch.state.jobs[done["job_id"]].status == "completed")
    active = await submit(api, command=runs_until(tmp_path, "e"), gpus=0)
    clock.advance(8 * 86400)
    for bad in ("0", "366", "x"):
        resp = await api.post(f"/api/queue/cleanup?days={bad}")
        assert resp.status == 422 and (await resp.json())["field"] == "days"
    assert await (await api.post("/api/queue/cleanup?days=30")).json() == {
        "success": True, "deleted": 0, "days": 30}
    assert await (await api.post("/api/queue/cleanup?days=7")).json() == {
        "success": True, "deleted": 1, "days": 7}
    assert (await api.get(f"/api/jobs/{done['job_id']}")).status == 404
    assert (await api.get(f"/api/jobs/{active['job_id']}")).status == 200
    (tmp_path / "e").touch()


async def test_concurrency_fields_are_bounded_effective_and_kept(
        make_orch: MakeOrch, aiohttp_client: AiohttpClient, tmp_path: Path) -> None:
    orch = await make_orch()
    api = await aiohttp_client(make_app(orch),
                               headers={"Authorization": f"Bearer {orch.admin_token}"})
    change = {"max_concurrent": 10, "user_max_concurrent": 3, "team_max_concurrent": 5,
              "enable_fair_share": True, "local_gpu_max_concurrent": 6,
              "local_job_max_concurrent": 2, "starvation_threshold_minutes": 30}
    reply = await (await api.post("/api/queue/concurrency", json=change)).json()
    assert {k: reply[k] for k in change} == change
    for field, bad in (("max_concurrent", 0), ("user_max_concurrent", -1),
                       ("local_gpu_max_concurrent", "six"), ("enable_fair_share", 3)):
        resp = await api.post("/api/queue/concurrency", json={field: bad})
        assert resp.status == 422 and (await resp.json())["field"] == field
    await api.post("/api/queue/concurrency", json={"local_gpu_max_concurrent": None})
    await orch.stop()
    again = await make_orch()
    assert again.state.limits.user_max_concurrent == 3
    assert again.state.limits.local_gpu_max_concurrent is None


async def test_system_status_shows_who_holds_each_gpu(api: TestClient[Any, Any],
                                                      tmp_path: Path) -> None:
    job = await submit(api, command=runs_until(tmp_path, "f"), gpus=2)
    status = await (await api.get("/api/system/status?include_allocation=true")).json()
    alloc = status["gpu_allocation"]
    assert alloc["allocated_gpus"] == [0, 1] and alloc["available_gpus"] == [2, 3]
    assert [d["job_id"] for d in alloc["devices"]] == [job["job_id"]] * 2 + [None, None]
    assert "gpu_allocation" not in await (await api.get("/api/system/status")).json()
    (tmp_path / "f").touch()


async def test_an_import_reads_the_csv_names_its_rows_and_records_all_or_nothing(
        api: TestClient[Any, Any]) -> None:
    """``POST /api/queue/import``, what ``eventq import`` sends."""
    await submit(api, name="prep", command=["true"], gpus=0, target="worker")
    sweep = ("JOBSCHEDULER_JOB_ID,model,JOBSCHEDULER_DEPENDS_ON,JOBSCHEDULER_ESTIMATE_TIME\n"
             "train,resnet,,0.5\n"
             ",vit,train,\n")
    body = {"csv": sweep, "command": ["bash", "run.sh"], "file": "sweep.csv", "gpus": 0,
            "target": "worker"}
    resp = await api.post("/api/queue/import?pretty=true", json=body)
    assert resp.status == 200, await resp.text()
    assert (await resp.text()).startswith('{\n  "success": true'), "indented when asked"
    reply = await resp.json()
    assert [(j["line"], j["name"]) for j in reply["jobs"]] == [(2, "train"), (3, "sweep-3")]
    assert reply["count"] == 2 and reply["job_ids"] == [j["job_id"] for j in reply["jobs"]]
    train, vit = [await (await api.get(f"/api/jobs/{i}")).json()
                  for i in reply["job_ids"]]
    assert train["command"] == ["bash", "run.sh", "resnet"]
    assert train["estimated_runtime"] == 1800.0
    assert vit["depends_on"] == [train["job_id"]]
    assert vit["metadata"]["jobscheduler"] == {"id": "sweep-3", "params": {"model": "vit"},
                                               "file": "sweep.csv", "line": 3}

    listed = (await (await api.get("/api/queue?limit=100")).json())["count"]
    bad = {**body, "csv": "JOBSCHEDULER_JOB_ID,model,JOBSCHEDULER_DEPENDS_ON\n"
                          "train,x,\n"          # the name is taken now
                          "b,y,prep\n"          # a job already submitted: needs append
                          "c,z,c\n"}            # depends on itself
    refused = await api.post("/api/queue/import", json=bad)
    answer = await refused.json()
    assert refused.status == 422 and answer["field"] == "csv"
    assert answer["error"] == "3 problems in sweep.csv; nothing was imported"
    assert [d.split(":")[0] for d in answer["detail"]] == ["line 2", "line 3", "line 4"]
    assert "use --append" in answer["detail"][1] and "cycle c -> c" in answer["detail"][2]
    assert (await (await api.get("/api/queue?limit=100")).json())["count"] == listed
    appended = await api.post("/api/queue/import", json={**body, "csv": "model,"
                              "JOBSCHEDULER_DEPENDS_ON\nbert,prep\n", "append": True})
    assert appended.status == 200, await appended.text()
    for wrong, field in (({**body, "csv": 3}, "csv"), ({**body, "command": []}, "command"),
                         ({**body, "colour": "red"}, "colour")):
        resp = await api.post("/api/queue/import", json=wrong)
        assert resp.status == 422 and (await resp.json())["field"] == field


async def test_imports_at_the_same_moment_never_give_a_name_twice(
        api: TestClient[Any, Any]) -> None:
    """Each names its rows against the jobs it saw; the scheduler refuses a set whose names
    were taken meanwhile, and the import names its rows again."""
    body = {"csv": "model\n" + "".join(f"m{i}\n" for i in range(50)), "command": ["true"],
            "file": "sweep.csv", "gpus": 0, "target": "worker"}
    replies = await asyncio.gather(*(api.post("/api/queue/import", json=body)
                                     for _ in range(4)))
    names = []
    for resp in replies:
        assert resp.status == 200, await resp.text()
        names += [j["name"] for j in (await resp.json())["jobs"]]
    assert len(names) == 200 and len(set(names)) == 200, "a name was given twice"


async def test_a_set_of_jobs_starts_in_queue_order_not_row_order(
        make_orch: MakeOrch, aiohttp_client: AiohttpClient, tmp_path: Path) -> None:
    """SPEC 4: higher effective priority first, for jobs recorded together as for others."""
    orch = await make_orch(gpu_spec="1xA100-80GB", limits=ROOMY)
    api = await aiohttp_client(make_app(orch),
                               headers={"Authorization": f"Bearer {orch.admin_token}"})
    started = tmp_path / "started"

    def row(name: str, priority: int) -> dict[str, Any]:
        return {"name": name, "gpus": 1, "priority_override": priority,
                "command": ["sh", "-c", f"echo {name} >> {started}"]}

    resp = await api.post("/api/queue/batch", json={"jobs": [row("low1", 1), row("low2", 1),
                                                             row("high", 25)]})
    assert resp.status == 200, await resp.text()
    await until(lambda: started.exists() and len(started.read_text().split()) == 3)
    assert started.read_text().split() == ["high", "low1", "low2"]


async def test_an_import_starts_in_queue_order_not_row_order(
        make_orch: MakeOrch, aiohttp_client: AiohttpClient, tmp_path: Path) -> None:
    orch = await make_orch(gpu_spec="1xA100-80GB", limits=ROOMY)
    api = await aiohttp_client(make_app(orch),
                               headers={"Authorization": f"Bearer {orch.admin_token}"})
    started = tmp_path / "started"
    sweep = "JOBSCHEDULER_JOB_ID,JOBSCHEDULER_PRIORITY,tag\nz1,1,z1\na2,1,a2\nm3,5,m3\n"
    body = {"csv": sweep, "command": ["sh", "-c", f"echo $0 >> {started}"], "gpus": 1,
            "file": "sweep.csv"}
    resp = await api.post("/api/queue/import", json=body)
    assert resp.status == 200, await resp.text()
    await until(lambda: started.exists() and len(started.read_text().split()) == 3)
    assert started.read_text().split() == ["m3", "z1", "a2"]


async def test_a_failing_job_runs_exactly_max_attempts_times(
        api: TestClient[Any, Any], orch: Orchestrator, tmp_path: Path) -> None:
    ran = tmp_path / "ran"
    job = await submit(api, gpus=0, retry_on_failure=True, max_attempts=2,
                       command=["sh", "-c", f"echo $EVENTQ_ATTEMPT >> {ran}; exit 1"])
    await until(lambda: orch.state.jobs[job["job_id"]].status == "failed")
    shown = await (await api.get(f"/api/jobs/{job['job_id']}")).json()
    assert shown["attempt"] == 2 and shown["error"] == "exit code 1"
    assert ran.read_text().split() == ["1", "2"]


async def test_admins_changing_different_limits_at_once_lose_neither_change(
        api: TestClient[Any, Any], orch: Orchestrator) -> None:
    changes = [{"max_concurrent": 9}, {"user_max_concurrent": 7}, {"team_max_concurrent": 4},
               {"enable_fair_share": True}, {"local_gpu_max_concurrent": 3}]
    replies = await asyncio.gather(*(api.post("/api/queue/concurrency", json=change)
                                     for change in changes))
    assert [r.status for r in replies] == [200] * len(changes)
    limits = orch.state.limits
    assert (limits.max_concurrent, limits.user_max_concurrent, limits.team_max_concurrent,
            limits.enable_fair_share, limits.local_gpu_max_concurrent) == (9, 7, 4, True, 3)


async def test_a_wait_on_gpus_names_the_job_whose_end_frees_them(
        make_orch: MakeOrch, aiohttp_client: AiohttpClient, tmp_path: Path) -> None:
    """Every listing of a waiting job says whose end its estimate rests on (a running job's,
    or one expected to start first), by that job's time limit or its estimated runtime, and
    that there is no estimate when that job has neither."""
    orch = await make_orch(gpu_spec="2xA100-80GB", limits=ROOMY)
    api = await aiohttp_client(make_app(orch),
                               headers={"Authorization": f"Bearer {orch.admin_token}"})
    limited = await submit(api, command=runs_until(tmp_path, "a"), gpus=1, name="limited",
                           max_runtime=600)
    guessed = await submit(api, command=runs_until(tmp_path, "b"), gpus=1, name="guessed",
                           estimated_runtime=300)
    first = await submit(api, command=["true"], gpus=1, name="first", max_runtime=60)
    endless = await submit(api, command=["true"], gpus=1, name="endless")
    third = await submit(api, command=["true"], gpus=1, name="third")
    both = await submit(api, command=["true"], gpus=2, name="both")
    jobs = orch.state.jobs
    limited_end, guessed_end = (jobs[j["job_id"]].expected_end for j in (limited, guessed))
    assert limited_end is not None and guessed_end is not None

    def ends(job: dict[str, Any], end: float | None, by: str | None) -> dict[str, Any]:
        return {"kind": "job_ends", "job_id": job["job_id"], "name": jobs[job["job_id"]].spec.name,
                "status": jobs[job["job_id"]].status, "end": end, "by": by, "frees": "gpus"}

    expected = [(first, guessed_end, ends(guessed, guessed_end, "estimated_runtime")),
                (endless, guessed_end + 60, ends(first, guessed_end + 60, "time_limit")),
                (third, limited_end, ends(limited, limited_end, "time_limit")),
                (both, None, ends(third, None, None))]
    for waiter, start, basis in expected:
        for record in await listed(api, waiter["job_id"]):
            assert record["estimated_start"] == start, record
            assert record["estimate_basis"] == basis, record
    later = await submit(api, command=["true"], gpus=0, name="later",
                         begin_at=orch.clock.now() + 3600)
    for record in await listed(api, later["job_id"], queued=False):
        assert record["status"] == "waiting"
        assert record["estimated_start"] == orch.clock.now() + 3600
        assert record["estimate_basis"] == {"kind": "begin_at"}, record
    for name in "ab":
        (tmp_path / name).touch()


async def listed(api: TestClient[Any, Any], job_id: str,
                 queued: bool = True) -> list[dict[str, Any]]:
    """The job as GET /api/queue, /api/jobs, /api/jobs/{id} and the position answer it,
    each checked against its documented shape."""
    from msgspec import convert

    from eventq.http import schemas as s

    queue = (await (await api.get("/api/queue?limit=100")).json())["jobs"]
    table = (await (await api.get(f"/api/jobs?ids={job_id}")).json())["jobs"]
    detail = await (await api.get(f"/api/jobs/{job_id}")).json()
    position = await (await api.get(f"/api/queue/position/{job_id}")).json()
    convert(detail, s.JobDetail)
    convert(position, s.PositionReply)
    for row in (*queue, *table):
        convert(row, s.JobSummary)
    found = [j for j in queue if j["job_id"] == job_id]
    return [*found, *table, detail, *([position] if queued else [])]


def test_the_average_wait_is_that_of_the_latest_thousand_first_dispatches() -> None:
    state = SchedulerState()
    view, seq = QueueView(state, GpuTable()), 0

    def fold(t: float, event: ev.Event) -> None:
        nonlocal seq
        seq += 1
        for read_model in (state, view):  # as the server folds them: the state first
            read_model.evolve(Record(seq, t, "system", event, b""))

    for i in range(1001):
        fold(0.0, ev.JobSubmitted(job=ev.JobSpec(job_id=f"j{i}", user="u", priority=10,
                                                 command=["true"], gpus=0)))
    for i in range(1001):  # job i waited i + 1 seconds
        fold(i + 1.0, ev.AttemptDispatched(job_id=f"j{i}", attempt=1, node="local", gpus=[]))
    fold(4000.0, ev.AttemptEnded(job_id="j5", attempt=1, outcome="lost"))
    fold(4000.0, ev.JobRequeued(job_id="j5", next_attempt=2, reason="lost"))
    fold(5000.0, ev.AttemptDispatched(job_id="j5", attempt=2, node="local", gpus=[]))
    # Waits 2 to 1001: the oldest left, and a second attempt is no wait in the queue.
    assert view.stats()["avg_wait_seconds"] == 501.5


async def test_a_retried_job_shows_no_completion_until_it_ends_again(
        api: TestClient[Any, Any], orch: Orchestrator, tmp_path: Path) -> None:
    job_id = (await submit(api, command=["false"], gpus=0, max_attempts=1))["job_id"]
    await until(lambda: orch.state.jobs[job_id].status == "failed")
    failed = await (await api.get(f"/api/jobs/{job_id}")).json()
    assert failed["completed_at"] is not None and failed["started_at"] is not None
    await api.post("/api/queue/concurrency", json={"local_job_max_concurrent": 1})
    await submit(api, command=runs_until(tmp_path, "go"), gpus=0)  # holds the one slot
    retry = await api.post(f"/api/queue/{job_id}/retry")
    assert retry.status == 200 and (await retry.json())["status"] == "pending"
    retried = await (await api.get(f"/api/jobs/{job_id}")).json()
    assert retried["status"] == "pending" and retried["completed_at"] is None
    assert retried["queued_at"] == failed["queued_at"]
    assert retried["started_at"] == failed["started_at"]  # its last start, until the next
    (tmp_path / "go").touch()
