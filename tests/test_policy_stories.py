"""Scheduling policy stories (SPEC 4), told over HTTP with real jobs that wait to be released.

Every job here is a real process that runs until the test creates its release file, so
the test decides when a job ends and what the scheduler sees next.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from eventq.actors.scheduler import Cancel, Process
from eventq.clock import SimClock
from eventq.events import Level, Limits
from eventq.http.app import make_app
from eventq.server import Orchestrator

#: Runs until its own release file ($REL) or the story's "release all" file ($ALL) exists.
HOLD = 'until [ -e "$REL" ] || [ -e "$ALL" ]; do sleep 0.05; done'
#: How each reason says its limit is raised.
MAX = " (raise with `eventq queue limits --max N`)"
PER_TEAM = " (raise with `eventq queue limits --per-team N`)"
PER_USER = " (raise with `eventq queue limits --per-user N`)"
WIDE = Limits(max_concurrent=50, user_max_concurrent=50, local_job_max_concurrent=50)
Json = dict[str, Any]


@dataclass
class Story:
    """One orchestrator, its HTTP API, its users, and a release file per job."""

    orch: Orchestrator
    api: TestClient[Any, Any]
    gates: Path
    tokens: dict[str, str] = field(default_factory=dict)
    release_files: dict[str, Path] = field(default_factory=dict)

    @property
    def clock(self) -> SimClock:
        assert isinstance(self.orch.clock, SimClock)
        return self.orch.clock

    def user(self, name: str, level: Level = Level.RESEARCHER, team: str | None = None) -> None:
        self.tokens[name] = self.orch.add_user(name, level, team)

    def auth(self, who: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[who]}"}

    async def post(self, path: str, who: str = "admin", body: Json | None = None) -> Any:
        resp = await self.api.post(path, json=body or {}, headers=self.auth(who))
        assert resp.status == 200, await resp.text()
        return await resp.json()

    async def get(self, path: str, who: str = "admin") -> Any:
        resp = await self.api.get(path, headers=self.auth(who))
        assert resp.status == 200, await resp.text()
        return await resp.json()

    async def submit(self, who: str, gpus: int = 0, **fields: Any) -> Json:
        """Submit a job that runs until ``release`` is called for it."""
        number = len(self.release_files)
        gate = self.gates / f"job{number}"
        env = {"REL": str(gate), "ALL": str(self.gates / "all")}
        reply: Json = await self.post("/api/queue/submit", who, {
            "command": ["sh", "-c", HOLD], "gpus": gpus, "env": env,
            "name": f"{who}-{number}", **fields})
        self.release_files[reply["job_id"]] = gate
        return reply

    async def release(self, job_id: str) -> None:
        """Let the job's process exit 0 and wait until the scheduler has acted on it."""
        self.release_files[job_id].touch()
        await self.wait_status(job_id, "completed")
        await self.settle()

    async def settle(self) -> None:
        """A pass queued behind everything the scheduler has been told so far."""
        await self.orch.scheduler.ask(Process())

    async def job(self, job_id: str) -> Json:
        return await self.get(f"/api/jobs/{job_id}")  # type: ignore[no-any-return]

    async def wait_status(self, job_id: str, status: str) -> Json:
        job: Json = {}
        for _ in range(500):
            job = await self.job(job_id)
            if job["status"] == status:
                return job
            await asyncio.sleep(0.02)
        raise AssertionError(f"job {job_id} is {job.get('status')}, never {status}")

    async def waiting(self) -> list[Json]:
        """The waiting jobs, in queue order, as ``GET /api/queue`` shows them."""
        reply = await self.get("/api/queue?status=pending")
        return reply["jobs"]  # type: ignore[no-any-return]

    async def waiting_ids(self) -> list[str]:
        return [j["job_id"] for j in await self.waiting()]

    async def reasons_in_queue(self, job_id: str) -> list[Json]:
        listed = {j["job_id"]: j for j in await self.waiting()}
        return listed[job_id]["reasons"]  # type: ignore[no-any-return]

    async def recorded_reason_codes(self, job_id: str) -> list[list[str]]:
        """The code lists of every reason change in the job's history: those its
        submission carries (it waited from the start), then each ``job_reasons_changed``."""
        history = await self.get(f"/api/jobs/{job_id}/events")
        return [[r["code"] for r in e["body"]["reasons"]] for e in history["events"]
                if e["type"] == "job_reasons_changed"
                or (e["type"] == "job_submitted" and e["body"].get("reasons"))]

    async def close(self) -> None:
        """Cancel what waits, let every running job exit, stop the orchestrator."""
        for job in list(self.orch.state.jobs.values()):
            if job.status == "pending":
                await self.orch.scheduler.ask(Cancel(job.spec.job_id, "system"))
        (self.gates / "all").touch()
        for _ in range(500):
            if self.orch.state.counts.total == 0:
                break
            await asyncio.sleep(0.02)
        await self.orch.stop()


StartStory = Callable[..., Awaitable[Story]]


@pytest.fixture
async def story(make_orch: Callable[..., Awaitable[Orchestrator]],
                aiohttp_client: Callable[..., Awaitable[TestClient[Any, Any]]],
                tmp_path: Path) -> AsyncIterator[StartStory]:
    stories: list[Story] = []

    async def start(gpu_spec: str = "4xA100-80GB", limits: Limits | None = None) -> Story:
        orch = await make_orch(gpu_spec, limits)
        gates = tmp_path / "gates"
        gates.mkdir()
        s = Story(orch, await aiohttp_client(make_app(orch)), gates)
        s.tokens["admin"] = orch.admin_token or ""
        stories.append(s)
        return s

    yield start
    for s in stories:
        await s.close()


def codes(reasons: list[Json]) -> list[str]:
    return [r["code"] for r in reasons]


# --- a. teams and users share the machine -------------------------------------------


async def test_team_and_user_limits_hold_jobs_and_say_why(story: StartStory) -> None:
    s = await story(limits=Limits(max_concurrent=6, user_max_concurrent=2,
                                  team_max_concurrent=3, enable_fair_share=True,
                                  local_job_max_concurrent=50))
    s.user("alice", team="Alpha")
    s.user("bob", team="Alpha")
    s.user("carol", team="Beta")

    alpha = [await s.submit(who) for who in ("alice", "alice", "bob", "bob")]
    assert [j["status"] for j in alpha] == ["running", "running", "running", "queued"]
    bobs_second = alpha[3]["job_id"]
    assert alpha[3]["reasons"] == [{"code": "team_limit",
                                    "detail": "team Alpha runs 3 of 3" + PER_TEAM}]

    carol = [await s.submit("carol") for _ in range(3)]
    assert [j["status"] for j in carol] == ["running", "running", "queued"]
    carols_third = carol[2]["job_id"]
    # Five of six run, so the global limit does not hold her: her own limit does.
    only_user_limit = [{"code": "user_limit", "detail": "carol runs 2 of 2" + PER_USER}]
    assert carol[2]["reasons"] == only_user_limit
    await s.settle()
    assert (await s.job(carols_third))["reasons"] == only_user_limit
    assert await s.reasons_in_queue(carols_third) == only_user_limit

    sixth = await s.submit("admin")
    assert sixth["status"] == "running"
    await s.settle()
    both = [{"code": "global_limit", "detail": "6 of 6 running" + MAX},
            {"code": "user_limit", "detail": "carol runs 2 of 2" + PER_USER}]
    shown = await s.job(carols_third)
    assert shown["status"] == "pending" and shown["reasons"] == both
    assert shown["recorded_reasons"] == both
    assert await s.reasons_in_queue(carols_third) == both
    assert await s.reasons_in_queue(bobs_second) == [
        {"code": "global_limit", "detail": "6 of 6 running" + MAX},
        {"code": "team_limit", "detail": "team Alpha runs 3 of 3" + PER_TEAM}]
    assert await s.waiting_ids() == [bobs_second, carols_third]

    # More passes that change nothing for her add nothing to her history.
    await s.post("/api/queue/concurrency", body={"max_concurrent": 6})
    await s.settle()
    assert await s.recorded_reason_codes(carols_third) == [["user_limit"],
                                                           ["global_limit", "user_limit"]]

    await s.release(carol[0]["job_id"])
    await s.wait_status(carols_third, "running")
    assert await s.recorded_reason_codes(carols_third) == [["user_limit"],
                                                           ["global_limit", "user_limit"]]
    assert await s.reasons_in_queue(bobs_second) == [
        {"code": "global_limit", "detail": "6 of 6 running" + MAX},
        {"code": "team_limit", "detail": "team Alpha runs 3 of 3" + PER_TEAM}]


async def test_reasons_recorded_by_a_pass_describe_the_state_it_leaves(
        story: StartStory) -> None:
    """A freed slot taken in the same pass never shows up as a change of the reasons."""
    s = await story(limits=Limits(max_concurrent=2, user_max_concurrent=1,
                                  local_job_max_concurrent=50))
    s.user("alice")
    s.user("bob")
    await s.submit("alice")
    bobs_first = (await s.submit("bob"))["job_id"]
    alices_second = (await s.submit("alice"))["job_id"]
    bobs_second = (await s.submit("bob"))["job_id"]
    await s.settle()
    assert codes(await s.reasons_in_queue(alices_second)) == ["global_limit", "user_limit"]

    # Bob's first job ends; his second takes the slot in the same pass, so Alice's job
    # was held by both limits before and is held by both after.
    await s.release(bobs_first)
    await s.wait_status(bobs_second, "running")
    await s.settle()
    assert codes(await s.reasons_in_queue(alices_second)) == ["global_limit", "user_limit"]
    assert await s.recorded_reason_codes(alices_second) == [["global_limit", "user_limit"]]


# --- b. aging ---------------------------------------------------------------------------


async def test_a_long_waiting_low_job_overtakes_a_new_high_one(story: StartStory) -> None:
    s = await story(limits=Limits(max_concurrent=1, user_max_concurrent=5,
                                  local_job_max_concurrent=5, starvation_threshold_minutes=60))
    s.user("vic", Level.VIEWER)
    s.user("lea", Level.LEAD)
    busy = await s.submit("admin")
    assert busy["status"] == "running"

    low = (await s.submit("vic"))["job_id"]
    s.clock.advance(30 * 60)
    early_high = (await s.submit("lea"))["job_id"]
    # Half an hour is not yet a threshold: the lead's job goes first.
    assert await s.waiting_ids() == [early_high, low]
    assert (await s.job(early_high))["position"] == 1
    assert (await s.job(low))["effective_priority"] == 0
    await s.post(f"/api/queue/{early_high}/cancel", "lea")

    s.clock.advance(3 * 3600)  # the viewer's job has now waited three and a half thresholds
    late_high = (await s.submit("lea"))["job_id"]
    shown = await s.job(low)
    assert shown["priority"] == 0 and shown["effective_priority"] == 30
    assert shown["position"] == 1
    assert (await s.job(late_high))["position"] == 2
    assert await s.waiting_ids() == [low, late_high]

    await s.release(busy["job_id"])
    await s.wait_status(low, "running")
    assert (await s.job(late_high))["status"] == "pending"


async def test_aging_lifts_a_job_no_higher_than_urgent(story: StartStory) -> None:
    """SPEC 4: the boost is capped at the Urgent value, so an override above it still
    goes first, however long the other job has waited."""
    s = await story(limits=Limits(max_concurrent=1, user_max_concurrent=5,
                                  local_job_max_concurrent=5, starvation_threshold_minutes=60))
    s.user("vic", Level.VIEWER)
    busy = await s.submit("admin")
    low = (await s.submit("vic"))["job_id"]
    s.clock.advance(5 * 3600)  # five thresholds: +50 uncapped
    assert (await s.job(low))["effective_priority"] == 30
    above = (await s.submit("admin", priority_override=40))["job_id"]
    assert await s.waiting_ids() == [above, low]
    await s.release(busy["job_id"])
    await s.wait_status(above, "running")
    assert (await s.job(low))["status"] == "pending"


# --- c. a big job is never starved by small ones ---------------------------------------


async def test_freed_gpus_are_kept_for_the_big_job(story: StartStory) -> None:
    s = await story(gpu_spec="8xA100-80GB", limits=WIDE)
    s.user("rita")
    s.user("ben")
    small = [await s.submit("rita", gpus=1) for _ in range(6)]
    assert [j["allocated_gpus"] for j in small] == [[0], [1], [2], [3], [4], [5]]
    big = await s.submit("ben", gpus=8)
    big_id = big["job_id"]
    assert big["reasons"] == [{"code": "gpus", "detail": "needs 8, node local has 2 free"}]

    stream: list[str] = []
    for done, job in enumerate(small, start=1):
        later = await s.submit("rita", gpus=1)
        assert later["status"] == "queued"
        stream.append(later["job_id"])
        await s.release(job["job_id"])
        if done == len(small):
            break
        for job_id in stream:
            shown = await s.job(job_id)
            assert shown["status"] == "pending"
            assert codes(shown["reasons"]) == ["reserved"]
            assert big_id in shown["reasons"][0]["detail"]
        shown = await s.job(big_id)
        assert shown["status"] == "pending"
        assert shown["reasons"] == [
            {"code": "gpus", "detail": f"needs 8, node local has {2 + done} free"}]

    started = await s.job(big_id)
    assert started["status"] in ("dispatched", "running")
    assert started["allocated_gpus"] == list(range(8))
    for job_id in stream:
        shown = await s.job(job_id)
        assert shown["status"] == "pending"
        assert shown["reasons"] == [{"code": "gpus", "detail": "needs 1, node local has 0 free"}]


async def test_a_short_job_may_backfill_before_the_big_job_starts(story: StartStory) -> None:
    s = await story(gpu_spec="8xA100-80GB", limits=WIDE)
    s.user("rita")
    s.user("ben")
    half = await s.submit("rita", gpus=4, max_runtime=600)
    assert half["allocated_gpus"] == [0, 1, 2, 3]
    big = (await s.submit("ben", gpus=8))["job_id"]

    too_long = await s.submit("rita", gpus=1, max_runtime=1200)
    unknown = await s.submit("rita", gpus=1)
    for held in (too_long, unknown):
        assert held["status"] == "queued"
        assert codes(held["reasons"]) == ["reserved"]
        assert big in held["reasons"][0]["detail"]
        assert "starts in 600s" in held["reasons"][0]["detail"]

    # Ends (at the latest) in 300 s, before the big job could start in 600 s.
    short = await s.submit("rita", gpus=1, max_runtime=300)
    assert short["status"] == "running"
    assert short["allocated_gpus"] == [4]

    await s.release(short["job_id"])
    await s.release(half["job_id"])
    started = await s.job(big)
    assert started["status"] in ("dispatched", "running")
    assert started["allocated_gpus"] == list(range(8))
    assert await s.waiting_ids() == [too_long["job_id"], unknown["job_id"]]


# --- d. overrides ------------------------------------------------------------------------


async def test_an_admin_override_puts_a_later_job_first(story: StartStory) -> None:
    s = await story(limits=Limits(max_concurrent=1, user_max_concurrent=10,
                                  local_job_max_concurrent=10))
    s.user("rob")
    busy = await s.submit("admin")
    first = (await s.submit("admin"))["job_id"]
    second = (await s.submit("admin"))["job_id"]
    urgent = await s.submit("admin", priority_override=90)
    assert urgent["status"] == "queued" and urgent["queue_position"] == 1
    assert await s.waiting_ids() == [urgent["job_id"], first, second]
    assert (await s.job(urgent["job_id"]))["priority"] == 90
    assert (await s.job(first))["position"] == 2

    await s.wait_status(busy["job_id"], "running")
    await s.settle()
    seq, jobs = s.orch.log.head_seq, len(s.orch.state.jobs)
    resp = await s.api.post("/api/queue/submit", headers=s.auth("rob"), json={
        "command": ["true"], "gpus": 0, "priority_override": 90})
    assert resp.status == 403
    assert (await resp.json())["field"] == "priority_override"
    assert s.orch.log.head_seq == seq and len(s.orch.state.jobs) == jobs

    await s.release(busy["job_id"])
    await s.wait_status(urgent["job_id"], "running")
    assert await s.waiting_ids() == [first, second]
