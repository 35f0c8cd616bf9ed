"""The past as the web page shows it: the state at any event, the GPUs over time, a job's
reasons over time; answered from snapshots and the log, and equal to what the scheduler's
own folds held at that event."""

from __future__ import annotations

import contextlib
import random
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient

from eventq import events as ev
from eventq import replay
from eventq.actors.allocator import GpuTable
from eventq.actors.scheduler_state import TERMINAL, SchedulerState
from eventq.actors.workers_state import Workers
from eventq.clock import SimClock
from eventq.http import history as routes
from eventq.http.app import make_app
from eventq.log import Record, iter_verified
from eventq.projections.history import Frame, History
from eventq.server import Orchestrator
from tests.helpers import until
from tools.bench_log import generate

AiohttpClient = Callable[..., Awaitable[TestClient[Any, Any]]]
MakeOrch = Callable[..., Awaitable[Orchestrator]]
ROOMY = ev.Limits(max_concurrent=10, user_max_concurrent=10, local_job_max_concurrent=10)
GOLDEN = Path(__file__).parent / "golden" / "events.db"

# --- what the scheduler's folds held, and what the history answers, in one shape -------------

State = dict[str, Any]


def reference(folded: replay.Folded, workers: Workers) -> State:
    """The state of ``eventq.replay.fold`` (the scheduler's and the allocator's folds)."""
    jobs = folded.scheduler.jobs
    return {
        "jobs": {job_id: (j.status, j.attempt, j.node, tuple(j.gpus),
                          tuple((r.code, r.detail) for r in j.reasons), j.exit_code, j.error,
                          j.spec.effective_base, j.queued_at, j.dispatched_at, j.finished_at)
                 for job_id, j in jobs.items()},
        "queue": [j.spec.job_id for j in folded.scheduler.iter_waiting(folded.last_time)],
        "gpus": {(name, gpu): node.held.get(gpu) for name, node in folded.gpus.nodes.items()
                 for gpu in {*node.gpus, *node.held}},
        "workers": {w: workers.status(w, sum(1 for j in jobs.values()
                                             if j.active and j.node == w)).value
                    for w in workers.by_id},
    }


def answered(reply: dict[str, Any]) -> State:
    """The same, from a ``GET /api/replay/state`` reply."""
    return {
        "jobs": {j["job_id"]: (j["status"], j["attempt"], j["node"], tuple(j["allocated_gpus"]),
                               tuple((r["code"], r["detail"]) for r in j["reasons"]),
                               j["exit_code"], j["error"], j["priority"], j["queued_at"],
                               j["started_at"], j["completed_at"]) for j in reply["jobs"]},
        "queue": [j["job_id"] for j in reply["jobs"] if "position" in j],
        "gpus": {(g["node"], g["index"]): None if g["job_id"] is None
                 else (g["job_id"], g["attempt"]) for g in reply["gpus"]},
        "workers": {w["worker_id"]: w["status"] for w in reply["workers"]},
    }


def reply_of(history: History, frame: Frame, head: int) -> dict[str, Any]:
    """What the route answers for ``frame`` (every finished job listed)."""
    done = history.finished.newest(frame.seq, frame.jobs, 10**9)
    return {"jobs": routes.open_rows(frame) + [routes.job_row(r, frame) for r in done],
            "gpus": routes.gpu_rows(frame),
            "workers": [{"worker_id": w, "name": frame.workers[w].name,
                         "status": routes.worker_status(frame, w)} for w in frame.workers],
            "seq": frame.seq, "head_seq": head}


class Checked:
    """Folds a log's records as ``eventq.replay.fold`` does, one at a time."""

    def __init__(self) -> None:
        self.folded, self.workers = replay.Folded(), Workers()

    def evolve(self, record: Record) -> None:
        self.folded.evolve(record)
        self.workers.evolve(record)

    def state(self) -> State:
        # ``replay.fold`` builds the waiting order once, at the end (``replaying``).
        with self.folded.scheduler.replaying():
            pass
        return reference(self.folded, self.workers)


class Live:
    """A history as a server holds it: subscribed after the folds it reads."""

    def __init__(self, **options: int) -> None:
        self.state, self.table, self.workers = SchedulerState(), GpuTable(), Workers()
        self.history = History(self.state, self.table, self.workers, **options)

    def evolve(self, record: Record) -> None:
        for fold in (self.state, self.table, self.workers, self.history):
            fold.evolve(record)


def folded(records: list[Record], **options: int) -> History:
    live = Live(**options)
    for record in records:
        live.evolve(record)
    return live.history


def records_of(path: Path) -> list[Record]:
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        return list(iter_verified(conn))


def at_seq(history: History, records: list[Record], seq: int,
           at_time: float | None = None) -> Frame:
    """The history's answer from a snapshot and the records after it."""
    frame = history.base_for(seq, at_time)
    history.fold_tail(frame, records[frame.seq:seq], at_time)
    return frame


def compare_along(records: list[Record], seqs: set[int], **options: int) -> int:
    """At each of ``seqs``, as the log is folded: the history's answer from its snapshots
    and the records after them, and its projection of the live folds, against the
    scheduler's folds."""
    checked, live, compared = Checked(), Live(**options), 0
    for record in records:
        checked.evolve(record)
        live.evolve(record)
        if record.seq in seqs:
            history = live.history
            frame = at_seq(history, records, record.seq)
            assert frame.seq == record.seq
            expected = checked.state()
            assert answered(reply_of(history, frame, record.seq)) == expected, \
                f"from a snapshot, at seq {record.seq}"
            assert answered(reply_of(history, history.now(), record.seq)) == expected, \
                f"from the live folds, at seq {record.seq}"
            compared += 1
    return compared


def test_the_history_agrees_with_the_scheduler_at_every_event_of_the_golden_log() -> None:
    records = records_of(GOLDEN)
    history = folded(records, every=4, keep=6)  # many snapshots, thinned
    assert len(history.snapshots) <= 7 and history.every > 4, "thinning was exercised"
    assert compare_along(records, set(range(1, len(records) + 1)), every=4, keep=6) == \
        len(records)
    assert answered(reply_of(history, at_seq(history, records, 0), 0))["jobs"] == {}


def test_the_history_agrees_with_the_scheduler_along_a_long_busy_log(tmp_path: Path) -> None:
    """Twenty thousand events of a busy queue (retries, cancels), checked at 150 points."""
    path = tmp_path / "events.db"
    count = generate(path, 20_000)
    records = records_of(path)
    seqs = set(random.Random(5).sample(range(1, count + 1), 150)) | {1, count}
    assert compare_along(records, seqs, every=256, keep=16) == len(seqs)


def test_a_state_at_a_time_stops_before_the_first_later_event() -> None:
    """As ``eventq.replay.fold`` does with ``at_time``."""
    records = records_of(GOLDEN)
    history = folded(records, every=3, keep=8)
    for moment in [*sorted({r.time for r in records}), records[0].time - 1]:
        frame = at_seq(history, records, len(records), moment)
        with contextlib.closing(sqlite3.connect(f"file:{GOLDEN}?mode=ro", uri=True)) as conn:
            assert frame.seq == replay.fold(conn, at_time=moment).last_seq


def test_a_state_at_a_time_is_right_where_the_wall_clock_stepped_back() -> None:
    times = [1.0, 2.0, 5.0, 3.0, 4.0, 6.0]
    records = [Record(seq, t, "system", ev.ServerStarted(pid=1, version="x"), b"")
               for seq, t in enumerate(times, start=1)]
    for every in (1, 2, 100):
        history = folded(records, every=every)
        for moment, seq in ((0.5, 0), (3.0, 2), (4.5, 2), (5.0, 5), (9.0, 6)):
            assert at_seq(history, records, 6, moment).seq == seq, (every, moment)


# --- the routes, on a real server -------------------------------------------------------------


def waits_for(tmp_path: Path, name: str) -> list[str]:
    return ["sh", "-c", f"while [ ! -e {tmp_path}/{name} ]; do sleep 0.02; done"]


async def submit(api: TestClient[Any, Any], **body: Any) -> str:
    resp = await api.post("/api/queue/submit", json=body)
    assert resp.status == 200, await resp.text()
    job_id: str = (await resp.json())["job_id"]
    return job_id


async def state(api: TestClient[Any, Any], query: str) -> dict[str, Any]:
    resp = await api.get(f"/api/replay/state?{query}")
    assert resp.status == 200, await resp.text()
    reply: dict[str, Any] = await resp.json()
    return reply


def row(reply: dict[str, Any], job_id: str) -> dict[str, Any]:
    found: dict[str, Any] = next(j for j in reply["jobs"] if j["job_id"] == job_id)
    return found


async def test_replay_at_an_old_event_shows_a_finished_job_running_on_its_gpus(
        make_orch: MakeOrch, aiohttp_client: AiohttpClient, tmp_path: Path,
        clock: SimClock) -> None:
    orch = await make_orch(limits=ROOMY)
    api = await aiohttp_client(make_app(orch),
                               headers={"Authorization": f"Bearer {orch.admin_token}"})
    job = await submit(api, command=waits_for(tmp_path, "go"), gpus=2)
    await until(lambda: orch.state.jobs[job].status == "running", "the job runs")
    await orch.log.flush()
    running_at, running_time = orch.log.head_seq, clock.now()
    clock.advance(60)
    (tmp_path / "go").touch()
    await until(lambda: orch.state.jobs[job].status == "completed", "the job completes")
    orch.history.every = 1  # the answer below comes from a snapshot and the log, not memory
    await submit(api, command=["true"], gpus=0, requires_approval=True)

    now = await state(api, "")
    assert now["seq"] == now["head_seq"] == orch.log.head_seq
    assert row(now, job)["status"] == "completed"
    assert all(g["job_id"] is None for g in now["gpus"])
    for query in (f"at={running_at}", f"time={running_time}"):
        then = await state(api, query)
        assert then["seq"] == running_at and then["head_seq"] == now["head_seq"]
        assert row(then, job)["status"] == "running", query
        held = {g["index"] for g in then["gpus"] if g["job_id"] == job}
        assert held == set(row(then, job)["allocated_gpus"]) and len(held) == 2
    before = await state(api, "at=0")
    assert before == {"seq": 0, "time": None, "head_seq": now["head_seq"], "jobs": [],
                      "gpus": [], "workers": []}


async def test_a_state_after_the_last_event_is_a_404_naming_the_last(
        api: TestClient[Any, Any], orch: Orchestrator) -> None:
    resp = await api.get(f"/api/replay/state?at={orch.log.head_seq + 1}")
    body = await resp.json()
    assert resp.status == 404 and str(orch.log.head_seq) in body["error"]
    for query, field in (("at=-1", "at"), ("time=yesterday", "time"), ("time=1e999", "time"),
                         ("finished=10001", "finished")):
        refused = await api.get(f"/api/replay/state?{query}")
        assert refused.status == 422 and (await refused.json())["field"] == field


async def test_every_state_the_routes_answer_is_what_the_scheduler_held_then(
        make_orch: MakeOrch, aiohttp_client: AiohttpClient, tmp_path: Path,
        clock: SimClock) -> None:
    """A story that passes through every kind of job event (approval, rejection, hold,
    priority, cancel, failure, retry, purge) and a worker's life, then every seq of it,
    over HTTP, against ``eventq.replay.fold`` of the same file."""
    orch = await make_orch(limits=ROOMY)
    orch.history.every, orch.history.keep = 3, 4
    admin = {"Authorization": f"Bearer {orch.admin_token}"}
    api = await aiohttp_client(make_app(orch), headers=admin)
    await story(api, orch, tmp_path, clock)
    await orch.log.flush()
    records = records_of(orch.log.path)
    checked = Checked()
    for record in records:
        checked.evolve(record)
        reply = await state(api, f"at={record.seq}&finished=10000")
        assert answered(reply) == checked.state(), f"at seq {record.seq} ({record.type})"


async def story(api: TestClient[Any, Any], orch: Orchestrator, tmp_path: Path,
                clock: SimClock) -> None:
    jobs = orch.state.jobs
    failing = await submit(api, command=["false"], gpus=1)
    held = await submit(api, command=["true"], gpus=4)  # waits for the GPUs
    await api.post(f"/api/queue/{held}/hold")
    await api.post(f"/api/queue/{held}/priority", json={"priority": 5})
    approved = await submit(api, command=waits_for(tmp_path, "go"), gpus=1,
                            requires_approval=True)
    rejected = await submit(api, command=["true"], requires_approval=True)
    later = await submit(api, command=["true"], gpus=0, requires_approval=True,
                         begin_at=clock.now() + 600)
    after = await submit(api, command=["true"], gpus=0, depends_on=[approved])
    assert (await api.post(f"/api/queue/{approved}/approve")).status == 200
    assert (await api.post(f"/api/queue/{later}/approve")).status == 200
    assert jobs[later].status == "waiting"
    assert (await api.post(f"/api/queue/{rejected}/reject?reason=no")).status == 200
    await until(lambda: jobs[failing].status == "failed", "the job fails")
    clock.advance(10)
    assert (await api.post(f"/api/queue/{failing}/retry")).status == 200
    await until(lambda: jobs[failing].status == "failed" and jobs[failing].attempt == 2,
                "the retry fails too")
    await api.post(f"/api/queue/{held}/release")
    await worker_life(api)
    (tmp_path / "go").touch()
    await until(lambda: jobs[approved].status == "completed" and jobs[held].status in TERMINAL
                and jobs[after].status == "completed", "the jobs end")
    clock.advance(600)
    await until(lambda: jobs[later].status == "completed", "the job past its begin time ends")
    cancelled = await submit(api, command=["true"], gpus=1, begin_at=clock.now() + 3600)
    assert (await api.post(f"/api/queue/{cancelled}/cancel")).status == 200
    clock.advance(3 * 86400)
    assert (await api.post("/api/queue/cleanup?days=1")).status == 200
    assert rejected not in jobs, "the purge happened"


async def worker_life(api: TestClient[Any, Any]) -> None:
    """A stock worker registers, runs a job and reports its end, drains, leaves and is
    removed."""
    made = await (await api.post("/api/admin/workers", json={"name": "box"})).json()
    token = {"X-Worker-Token": made["token"]}
    registered = await api.post("/api/workers/register", headers=token, json={
        "name": "box", "gpu_info": {"name": "A100", "vram_gb": 80, "count": 1}})
    assert registered.status == 200
    job = await submit(api, command=["true"], gpus=1, target="worker")
    for status in ("running", "completed"):
        reported = await api.post(f"/api/workers/job/{job}/status", headers=token,
                                  json={"status": status})
        assert reported.status == 200, await reported.text()
    assert (await api.post(f"/api/admin/workers/{made['worker_id']}/drain")).status == 200
    assert (await api.post("/api/workers/disconnect", headers=token,
                           json={"worker_id": made["worker_id"]})).status == 200
    assert (await api.delete(f"/api/admin/workers/{made['worker_id']}")).status == 200


# --- the GPUs over time and a job's reasons ---------------------------------------------------


async def test_the_gpu_timeline_shows_two_jobs_on_disjoint_gpus_and_their_ends(
        make_orch: MakeOrch, aiohttp_client: AiohttpClient, tmp_path: Path,
        clock: SimClock) -> None:
    orch = await make_orch(limits=ROOMY)
    api = await aiohttp_client(make_app(orch),
                               headers={"Authorization": f"Bearer {orch.admin_token}"})
    start = clock.now()
    first = await submit(api, command=["sh", "-c", f"{waits_for(tmp_path, 'one')[2]}; exit 3"],
                         gpus=1)
    second = await submit(api, command=waits_for(tmp_path, "two"), gpus=2, priority_override=5)
    await until(lambda: orch.state.jobs[first].status == orch.state.jobs[second].status
                == "running", "both run at once")
    clock.advance(10)
    (tmp_path / "one").touch()
    await until(lambda: orch.state.jobs[first].status == "failed", "the first fails")
    clock.advance(30)
    resp = await api.get(f"/api/gpus/timeline?since={start}")
    timeline = await resp.json()
    assert resp.status == 200 and timeline["now"] == clock.now()
    assert timeline["lanes"] == [{"node": "local", "gpu": g} for g in range(4)]
    bars = {b["job_id"]: b for b in timeline["bars"]}
    assert bars[first]["status"] == "failed" and bars[first]["end"] is not None
    assert bars[second]["status"] == "running" and bars[second]["end"] is None
    assert (bars[second]["user"], bars[second]["priority"]) == ("admin", 5)
    assert not set(bars[first]["gpus"]) & set(bars[second]["gpus"])
    assert len(bars[second]["gpus"]) == 2

    later = await (await api.get(f"/api/gpus/timeline?since={clock.now() - 1}")).json()
    assert [b["job_id"] for b in later["bars"]] == [second], "the ended hold is out of the window"
    empty = await (await api.get(f"/api/gpus/timeline?since={start}&until={start - 1}")).json()
    assert empty["bars"] == [] and not empty["truncated"]
    (tmp_path / "two").touch()


async def test_a_jobs_reason_history_says_what_held_it_from_when_to_when(
        make_orch: MakeOrch, aiohttp_client: AiohttpClient, tmp_path: Path,
        clock: SimClock) -> None:
    """"Why did it wait 40 minutes?": the GPUs, until the job holding them was cancelled."""
    orch = await make_orch(limits=ROOMY)
    admin = {"Authorization": f"Bearer {orch.admin_token}"}
    api = await aiohttp_client(make_app(orch), headers=admin)
    hog = await submit(api, command=waits_for(tmp_path, "never"), gpus=4)
    await until(lambda: orch.state.jobs[hog].status == "running", "the hog runs")
    waiting = await submit(api, command=["true"], gpus=2)
    await until(lambda: bool(orch.state.jobs[waiting].reasons), "a reason is recorded")
    waited_from = clock.now()
    clock.advance(40 * 60)
    assert (await api.post(f"/api/queue/{hog}/cancel")).status == 200
    await until(lambda: orch.state.jobs[waiting].status == "completed", "it runs at last")

    resp = await api.get(f"/api/jobs/{waiting}/reasons")
    history = (await resp.json())["history"]
    assert resp.status == 200 and len(history) == 1, history
    span = history[0]
    assert span["codes"] == ["gpus"] and "needs 2" in span["detail"]
    assert (span["from"], span["until"]) == (waited_from, waited_from + 40 * 60)
    assert span["event"] == "job_reasons_changed" and span["until_event"] == "attempt_dispatched"
    assert span["seq"] < span["until_seq"]

    orch.add_user("eve", ev.Level.RESEARCHER)
    eve = {"Authorization": f"Bearer {orch.add_user('mallory', ev.Level.RESEARCHER)}"}
    assert (await api.get(f"/api/jobs/{waiting}/reasons", headers=eve)).status == 403
    assert (await api.get("/api/jobs/000000000000/reasons")).status == 404


def test_the_reason_history_closes_each_span_at_the_event_that_changed_it() -> None:
    def rec(seq: int, event: ev.Event) -> Record:
        return Record(seq, float(seq), "system", event, b"")  # type: ignore[arg-type]

    gpus = [ev.Reason("gpus", "needs 2, node local has 1 free")]
    spans = routes.reason_history(iter([
        rec(1, ev.JobBlocked(job_id="j", reason="cost 9 above 5")),
        rec(2, ev.JobApproved(job_id="j")),
        rec(3, ev.JobReasonsChanged(job_id="j", reasons=gpus)),
        rec(4, ev.JobReasonsChanged(job_id="j", reasons=gpus)),  # the same set: no new span
        rec(5, ev.JobHeld(job_id="j")),
        rec(6, ev.JobReleased(job_id="j")),
        rec(7, ev.JobReasonsChanged(job_id="j", reasons=[*gpus, ev.Reason("user_limit", "x")])),
    ]))
    assert [(s["codes"], s["from"], s["until"], s["until_event"]) for s in spans] == [
        (["approval"], 1.0, 2.0, "job_approved"),
        (["gpus"], 3.0, 5.0, "job_held"),
        (["held"], 5.0, 6.0, "job_released"),
        (["gpus", "user_limit"], 7.0, None, None)]
