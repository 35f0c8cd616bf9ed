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

import pytest
from aiohttp.test_utils import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st

from eventq import events as ev
from eventq import replay
from eventq.actors.allocator import GpuTable
from eventq.actors.scheduler_state import ACTIVE, PARKED, TERMINAL, JobState, SchedulerState
from eventq.actors.workers_state import Workers
from eventq.clock import SimClock
from eventq.http import history as routes
from eventq.http.app import make_app
from eventq.log import Record, iter_verified
from eventq.projections import history as history_module
from eventq.projections.history import (
    CHANGES_NO_JOB,
    OPEN,
    Frame,
    History,
    JobRow,
    row_of,
)
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


# --- a snapshot builds only the rows that changed ---------------------------------------------

#: (what happens, which job or worker, a detail): the story below turns each into the events
#: the orchestrator would record for it, or none where it does not apply.
Move = tuple[str, int, int]
MOVES = ("submit", "submit", "submit", "ready", "block", "approve", "hold", "release",
         "priority", "reasons", "dispatch", "dispatch", "start", "stop", "end", "end",
         "finish", "finish", "cancel", "reject", "retry", "purge", "limits", "settings",
         "worker", "noise")
REASONS: tuple[list[ev.Reason], ...] = ([], [ev.Reason("gpus", "needs 2, node local has 1 free")],
           [ev.Reason("user_limit", "ada runs 2 of 2")])
OUTCOMES: tuple[ev.Outcome, ...] = ("exited", "exited", "lost", "cancelled", "timeout")
#: Steps of the clock between events; one steps back, as a wall clock may.
STEPS = (0.0, 1.0, 1.0, 30.0, -2.0)


class Story:
    """Job events drawn at random, each valid for the state the scheduler holds, folded as a
    server folds them; every snapshot is checked against the full projection (``now``)."""

    def __init__(self, every: int, keep: int, rows: int) -> None:
        self.live = Live(every=every, keep=keep, rows=rows)
        self.seq, self.time, self.submitted, self.free = 0, 1000.0, 0, {0, 1, 2, 3}
        #: What ``now`` gave at each snapshot's seq.
        self.expected: dict[int, Frame] = {}
        self.record(ev.NodeInventoryReported(node="local", simulated=True, gpus=[
            ev.GpuInfo(index=i, name="A100", memory_gb=80.0) for i in range(4)]), 0)

    def jobs(self, *statuses: str) -> list[JobState]:
        return list(self.live.state.with_status(*statuses))

    def record(self, event: ev.Event, step: int) -> None:
        self.seq += 1
        self.time += STEPS[step % len(STEPS)]
        history = self.live.history
        before = history.snapshots[-1]
        self.live.evolve(Record(self.seq, self.time, "system", event, b""))  # type: ignore[arg-type]
        if history.snapshot_seqs[-1] == self.seq:
            self.check(before, history.snapshots[-1])

    def check(self, before: Frame, snapshot: Frame) -> None:
        full = self.live.history.now()
        for name in ("seq", "time", "high", "jobs", "nodes", "workers", "limits"):
            assert getattr(snapshot, name) == getattr(full, name), f"{name} at {self.seq}"
        for job_id, row in snapshot.jobs.items():  # an unchanged row is shared
            old = before.jobs.get(job_id)
            assert old != row or old is row, f"{job_id} copied at {self.seq}"
        self.expected[self.seq] = full

    def play(self, move: Move) -> None:
        what, pick, detail = move
        for event in getattr(self, f"_{what}")(pick, detail):
            self.record(event, pick)

    def pick(self, pick: int, *statuses: str) -> JobState | None:
        found = self.jobs(*statuses)
        return found[pick % len(found)] if found else None

    def _submit(self, pick: int, detail: int) -> list[ev.Event]:
        self.submitted += 1
        job_id, others = f"j{self.submitted:03d}", self.jobs(*OPEN)
        after = [others[pick % len(others)].spec.job_id] if detail == 2 and others else []
        spec = ev.JobSpec(job_id=job_id, user=("ada", "ben")[pick % 2], priority=pick % 3 * 10,
                          command=["true"], gpus=detail % 3, depends_on=after,
                          begin_at=self.time + 100 if detail == 3 else None)
        waits = REASONS[1] if detail == 4 else None
        blocked = [ev.JobBlocked(job_id=job_id, reason="cost 9 above 5")] if detail == 5 else []
        return [ev.JobSubmitted(job=spec, reasons=waits), *blocked]

    def _ready(self, pick: int, detail: int) -> list[ev.Event]:
        job = self.pick(pick, "waiting")
        return [ev.JobReady(job_id=job.spec.job_id)] if job else []

    def _block(self, pick: int, detail: int) -> list[ev.Event]:
        job = self.pick(pick, "pending", "waiting")
        return [ev.JobBlocked(job_id=job.spec.job_id, reason=f"cost {detail}")] if job else []

    def _approve(self, pick: int, detail: int) -> list[ev.Event]:
        job = self.pick(pick, "blocked")
        return [ev.JobApproved(job_id=job.spec.job_id)] if job else []

    def _hold(self, pick: int, detail: int) -> list[ev.Event]:
        job = self.pick(pick, "pending", "waiting")
        return [ev.JobHeld(job_id=job.spec.job_id)] if job else []

    def _release(self, pick: int, detail: int) -> list[ev.Event]:
        job = self.pick(pick, "held")
        return [ev.JobReleased(job_id=job.spec.job_id)] if job else []

    def _priority(self, pick: int, detail: int) -> list[ev.Event]:
        job = self.pick(pick, *OPEN)
        override = None if detail == 0 else detail * 10
        return [ev.PriorityChanged(job_id=job.spec.job_id, priority_override=override)] \
            if job else []

    def _reasons(self, pick: int, detail: int) -> list[ev.Event]:
        job = self.pick(pick, "pending", "waiting")
        reasons = REASONS[detail % len(REASONS)]  # often the same again: the row is shared
        return [ev.JobReasonsChanged(job_id=job.spec.job_id, reasons=reasons)] if job else []

    def _dispatch(self, pick: int, detail: int) -> list[ev.Event]:
        job = self.pick(pick, "pending")
        if job is None or job.spec.gpus > len(self.free):
            return []
        gpus = sorted(self.free)[:job.spec.gpus]
        self.free -= set(gpus)
        job_id, attempt = job.spec.job_id, job.attempt + 1
        return [ev.GpusAllocated(job_id=job_id, attempt=attempt, node="local", gpus=gpus),
                ev.AttemptDispatched(job_id=job_id, attempt=attempt, node="local", gpus=gpus)]

    def _start(self, pick: int, detail: int) -> list[ev.Event]:
        job = self.pick(pick, "dispatched")
        return [ev.AttemptStarted(job_id=job.spec.job_id, attempt=job.attempt, pid=100 + pick)] \
            if job else []

    def _stop(self, pick: int, detail: int) -> list[ev.Event]:
        job = self.pick(pick, *ACTIVE)
        if job is None or not job.active:
            return []
        return [ev.AttemptStopRequested(job_id=job.spec.job_id, attempt=job.attempt,
                                        reason="cancelled" if detail % 2 else "timeout")]

    def _end(self, pick: int, detail: int) -> list[ev.Event]:
        job = self.pick(pick, *ACTIVE)
        if job is None or not job.active:
            return []
        job_id, attempt, outcome = job.spec.job_id, job.attempt, OUTCOMES[detail % 5]
        self.free |= set(job.gpus)
        return [ev.AttemptEnded(job_id=job_id, attempt=attempt, outcome=outcome,
                                exit_code=detail % 2 if outcome == "exited" else None),
                ev.GpusReleased(job_id=job_id, attempt=attempt, node="local",
                                gpus=list(job.gpus), reason="ended")]

    def _finish(self, pick: int, detail: int) -> list[ev.Event]:
        job = self.pick(pick, *ACTIVE)
        if job is None or job.active:
            return []
        job_id = job.spec.job_id
        return [(ev.JobCompleted(job_id=job_id), ev.JobFailed(job_id=job_id, reason="exit 1"),
                 ev.JobRequeued(job_id=job_id, next_attempt=job.attempt + 1, reason="exit 1"),
                 ev.JobCancelled(job_id=job_id))[detail % 4]]

    def _cancel(self, pick: int, detail: int) -> list[ev.Event]:
        job = self.pick(pick, "pending", "waiting", *PARKED)
        return [ev.JobCancelled(job_id=job.spec.job_id)] if job else []

    def _reject(self, pick: int, detail: int) -> list[ev.Event]:
        job = self.pick(pick, "pending", "blocked")
        return [ev.JobRejected(job_id=job.spec.job_id, reasons=REASONS[2])] if job else []

    def _retry(self, pick: int, detail: int) -> list[ev.Event]:
        job = self.pick(pick, "failed", "cancelled")
        return [ev.JobRequeued(job_id=job.spec.job_id, next_attempt=job.attempt + 1,
                               reason="retried by its owner")] if job else []

    def _purge(self, pick: int, detail: int) -> list[ev.Event]:
        ended = [job.spec.job_id for job in self.jobs(*TERMINAL)][pick % 3:][:detail + 1]
        return [ev.JobsPurged(job_ids=ended, older_than_days=1)] if ended else []

    def _limits(self, pick: int, detail: int) -> list[ev.Event]:
        return [ev.LimitsChanged(limits=ev.Limits(max_concurrent=detail + 1))]

    def _settings(self, pick: int, detail: int) -> list[ev.Event]:
        return [ev.SettingsChanged(approval_cost_threshold=float(detail))]

    def _worker(self, pick: int, detail: int) -> list[ev.Event]:
        worker_id = f"w{pick % 3}"
        if worker_id not in self.live.workers.by_id:
            return [ev.WorkerCreated(worker_id=worker_id, name=worker_id,
                                     worker_type="persistent", labels={}, token_sha256="0")]
        return [(ev.WorkerConnected(worker_id=worker_id, transport="ws"),
                 ev.WorkerDraining(worker_id=worker_id),
                 ev.WorkerLost(worker_id=worker_id, reason="heartbeat timeout"),
                 ev.WorkerRemoved(worker_id=worker_id))[detail % 4]]

    def _noise(self, pick: int, detail: int) -> list[ev.Event]:
        """Events that name a job and change nothing of it."""
        job = self.pick(pick, *OPEN, *TERMINAL)
        if job is None:
            return [ev.ServerStarted(pid=1, version="x")]
        job_id = job.spec.job_id
        return [ev.StaleReportIgnored(job_id=job_id, attempt=0, current_attempt=job.attempt,
                                      report="ended"),
                ev.NotificationDelivered(job_id=job_id, ending=self.seq, target="job",
                                         tries=1, status=200)]


@settings(max_examples=150, deadline=None)
@given(moves=st.lists(st.tuples(st.sampled_from(MOVES), st.integers(0, 40), st.integers(0, 5)),
                      min_size=60, max_size=200),
       every=st.integers(1, 4), keep=st.integers(2, 5), rows=st.sampled_from([30, 10**6]))
def test_every_snapshot_is_the_full_projection_of_the_live_folds(
        moves: list[Move], every: int, keep: int, rows: int) -> None:
    """Whatever jobs do, each snapshot (built from the last one and the jobs named since)
    is what ``now`` builds from every open job, field by field; and thinning leaves each
    kept snapshot as it was taken."""
    story = Story(every, keep, rows)
    for move in moves:
        story.play(move)
    history = story.live.history
    for seq, snapshot in zip(history.snapshot_seqs[1:], history.snapshots[1:], strict=True):
        assert snapshot == story.expected[seq], f"the snapshot at {seq}, after thinning"


def test_a_snapshot_builds_rows_only_for_the_jobs_changed_since_the_last(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """5,000 jobs wait and one of them is held: the next snapshot builds one row, however
    many jobs are open, and shares the other 4,999 with the snapshot before."""
    live, records, built = Live(every=1), iter(range(1, 10**6)), 0
    history = live.history

    def happens(event: ev.Event) -> None:
        live.evolve(Record(next(records), 1.0, "system", event, b""))  # type: ignore[arg-type]

    def snapshot_taken() -> Frame:
        taken = len(history.snapshots)
        while len(history.snapshots) == taken:
            happens(ev.ServerStarted(pid=1, version="x"))
        return history.snapshots[-1]

    for i in range(5000):
        happens(ev.JobSubmitted(job=ev.JobSpec(job_id=f"j{i:04d}", user="ada", priority=0,
                                               command=["true"])))
    before = snapshot_taken()
    assert len(before.jobs) == 5000
    happens(ev.JobHeld(job_id="j0042"))

    def counted(job: JobState) -> JobRow:
        nonlocal built
        built += 1
        return row_of(job)

    monkeypatch.setattr(history_module, "row_of", counted)
    after = snapshot_taken()
    assert built == 1, f"{built} rows built for one changed job among 5,000"
    assert after.jobs["j0042"].status == "held" and before.jobs["j0042"].status == "pending"
    assert sum(1 for job_id, row in after.jobs.items() if row is before.jobs[job_id]) == 4999


def test_a_history_made_over_a_folded_state_puts_its_jobs_in_the_first_snapshot() -> None:
    live = Live(every=2)
    story = Story(every=2, keep=8, rows=10**6)
    story.live = live
    for i in range(3):
        live.state.evolve(Record(i + 1, 1.0, "system", ev.JobSubmitted(job=ev.JobSpec(
            job_id=f"early{i}", user="ada", priority=0, command=["true"])), b""))
    live.history = History(live.state, live.table, live.workers, every=2)
    story.seq = 3
    for _ in range(2):
        story.record(ev.ServerStarted(pid=1, version="x"), 1)
    assert set(live.history.snapshots[-1].jobs) == {"early0", "early1", "early2"}


def test_every_event_the_scheduler_folds_names_the_jobs_it_changes() -> None:
    """What a snapshot relies on (``History``): a new event type the scheduler folds either
    names its job by ``job_id`` or is listed, here and in the history, with what it does."""
    for kind in SchedulerState.READS:
        assert kind in (ev.JobSubmitted, ev.JobsPurged, *CHANGES_NO_JOB) or \
            "job_id" in getattr(kind, "__struct_fields__", ()), kind


def test_a_state_lists_its_jobs_in_one_order_however_its_frame_was_built() -> None:
    """At every event of the golden log, the route's rows come in the same order from a
    snapshot and the records after it as from the live folds (which hold jobs by status)."""
    records, orders = records_of(GOLDEN), 0
    live = Live(every=4, keep=6)
    for record in records:
        live.evolve(record)
        history = live.history
        ids_from = [[j["job_id"] for j in routes.open_rows(frame)]
                    for frame in (at_seq(history, records, record.seq), history.now())]
        assert ids_from[0] == ids_from[1], f"at seq {record.seq}"
        statuses = [j["status"] for j in routes.open_rows(history.now())]
        orders += len(statuses) > len(set(statuses))
    assert orders, "some state holds two jobs of one status"
