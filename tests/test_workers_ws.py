"""A worker speaking eventq's websocket protocol: placement, fencing, loss and return."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from eventq import events as ev
from eventq.clock import SimClock
from eventq.http.app import make_app
from eventq.server import Orchestrator

AiohttpClient = Callable[..., Awaitable[TestClient[Any, Any]]]
ROOMY = ev.Limits(max_concurrent=20, user_max_concurrent=20, local_job_max_concurrent=20)


class Agent:
    """A scripted worker on a real websocket."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, welcome: dict[str, Any]) -> None:
        self.ws, self.welcome = ws, welcome

    async def next(self, kind: str) -> dict[str, Any]:
        while True:
            msg: dict[str, Any] = await asyncio.wait_for(self.ws.receive_json(), 10)
            if msg["type"] == kind:
                return msg

    async def send(self, **msg: Any) -> None:
        await self.ws.send_json(msg)


@pytest.fixture
async def world(make_orch: Callable[..., Awaitable[Orchestrator]],
                aiohttp_client: AiohttpClient) -> tuple[Orchestrator, TestClient[Any, Any]]:
    orch = await make_orch(limits=ROOMY)
    api = await aiohttp_client(make_app(orch),
                               headers={"Authorization": f"Bearer {orch.admin_token}"})
    return orch, api


async def new_worker(api: TestClient[Any, Any], name: str, **labels: str) -> dict[str, Any]:
    resp = await api.post("/api/admin/workers", json={"name": name, "labels": labels})
    assert resp.status == 201
    made: dict[str, Any] = await resp.json()
    return made


async def connect(api: TestClient[Any, Any], token: str, gpus: int = 2,
                  running: list[list[Any]] | None = None) -> Agent:
    ws = await api.ws_connect("/api/workers/ws", headers={"X-Worker-Token": token})
    await ws.send_json({"type": "hello", "simulated": True, "running": running or [],
                        "gpus": [{"index": i, "name": "A100", "memory_gb": 80}
                                 for i in range(gpus)]})
    return Agent(ws, await ws.receive_json())


async def settle(orch: Orchestrator, check: Callable[[], bool]) -> None:
    for _ in range(500):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("never settled")


async def test_a_job_for_workers_runs_on_the_matching_worker(world: Any) -> None:
    orch, api = world
    a100 = await new_worker(api, "box-a100", gpu_type="a100", location="us-west")
    await new_worker(api, "box-l4", gpu_type="l4")
    agent = await connect(api, a100["token"])
    assert agent.welcome["type"] == "welcome"
    reply = await (await api.post("/api/queue/submit", json={
        "command": ["train"], "gpus": 2, "target": "worker",
        "worker_labels": {"gpu_type": "a100*"}})).json()
    assert reply["status"] == "running" and reply["allocated_gpus"] == [0, 1]
    run = await agent.next("run")
    assert (run["job_id"], run["attempt"], run["gpus"]) == (reply["job_id"], 1, [0, 1])
    await agent.send(type="started", job_id=run["job_id"], attempt=1, pid=4242)
    await agent.send(type="log", job_id=run["job_id"], attempt=1, stream="stdout",
                     data="epoch 1\n")
    await agent.send(type="exited", job_id=run["job_id"], attempt=1, exit_code=0)
    await settle(orch, lambda: orch.state.jobs[run["job_id"]].status == "completed")
    out = orch.data_dir / "jobs" / run["job_id"] / "1" / "stdout.log"
    assert out.read_text() == "epoch 1\n"
    await agent.ws.close()


async def test_a_job_nothing_fits_says_which_requirement(world: Any) -> None:
    _, api = world
    worker = await new_worker(api, "small", gpu_type="l4")
    await connect(api, worker["token"], gpus=1)
    reply = await (await api.post("/api/queue/submit", json={
        "command": ["x"], "gpus": 1, "target": "worker",
        "worker_labels": {"gpu_type": "a100*"}})).json()
    assert reply["status"] == "queued"
    assert reply["reasons"][0]["code"] == "no_worker"
    assert "labels" in reply["reasons"][0]["detail"]


async def test_twenty_concurrent_submissions_never_double_book_a_worker(world: Any) -> None:
    _, api = world
    worker = await new_worker(api, "single")
    agent = await connect(api, worker["token"], gpus=1)
    replies = await asyncio.gather(*(api.post("/api/queue/submit", json={
        "command": ["x"], "gpus": 1, "target": "worker"}) for _ in range(20)))
    statuses = [(await r.json())["status"] for r in replies]
    assert statuses.count("running") == 1 and statuses.count("queued") == 19
    run = await agent.next("run")
    await agent.send(type="started", job_id=run["job_id"], attempt=1)
    await agent.send(type="exited", job_id=run["job_id"], attempt=1, exit_code=0)
    second = await agent.next("run")
    assert second["job_id"] != run["job_id"], "the next job only once the GPU was freed"


async def test_a_lost_worker_fails_its_attempt_and_the_job_runs_elsewhere(
        world: Any, clock: SimClock) -> None:
    orch, api = world
    first = await new_worker(api, "first")
    second = await new_worker(api, "second")
    one = await connect(api, first["token"], gpus=1)
    reply = await (await api.post("/api/queue/submit", json={
        "command": ["x"], "gpus": 1, "target": "worker"})).json()
    run = await one.next("run")
    await one.send(type="started", job_id=run["job_id"], attempt=1)
    await settle(orch, lambda: orch.state.jobs[reply["job_id"]].status == "running")
    await one.ws.close()  # the connection drops; nothing happens until the timeout
    await asyncio.sleep(0.05)
    assert orch.state.jobs[reply["job_id"]].status == "running"
    clock.advance(orch.heartbeat_timeout + 1)
    await settle(orch, lambda: orch.state.jobs[reply["job_id"]].status == "pending")
    two = await connect(api, second["token"], gpus=1)
    rerun = await two.next("run")
    assert (rerun["job_id"], rerun["attempt"]) == (reply["job_id"], 2)
    ended = [r.event for r in await orch.log.read(job_id=reply["job_id"])
             if isinstance(r.event, ev.AttemptEnded)]
    assert ended[0].outcome == "lost" and ended[0].detail.startswith("worker_lost")
    await two.send(type="started", job_id=reply["job_id"], attempt=2)
    await settle(orch, lambda: orch.state.jobs[reply["job_id"]].status == "running")
    # attempt 1's late report, from the old worker back again, is ignored and recorded
    late = await connect(api, first["token"], gpus=1, running=[[reply["job_id"], 1]])
    assert late.welcome["stop"] == [[reply["job_id"], 1]], "told to stop what was given away"
    await late.send(type="exited", job_id=reply["job_id"], attempt=1, exit_code=0)
    await asyncio.sleep(0.05)
    await orch.log.flush()
    stale = [r for r in await orch.log.read(job_id=reply["job_id"])
             if r.type == "stale_report_ignored"]
    assert len(stale) == 1
    assert orch.state.jobs[reply["job_id"]].status == "running"
    assert orch.state.jobs[reply["job_id"]].attempt == 2


async def test_a_dropped_connection_that_returns_in_time_keeps_its_job(world: Any,
                                                                       clock: SimClock) -> None:
    orch, api = world
    worker = await new_worker(api, "flaky")
    agent = await connect(api, worker["token"], gpus=1)
    reply = await (await api.post("/api/queue/submit", json={
        "command": ["x"], "gpus": 1, "target": "worker"})).json()
    run = await agent.next("run")
    await agent.send(type="started", job_id=run["job_id"], attempt=1)
    await agent.ws.close()
    clock.advance(orch.heartbeat_timeout / 2)
    back = await connect(api, worker["token"], gpus=1, running=[[run["job_id"], 1]])
    assert back.welcome["keep"] == [[run["job_id"], 1]] and back.welcome["stop"] == []
    clock.advance(orch.heartbeat_timeout * 0.75)
    await asyncio.sleep(0.05)
    assert orch.state.jobs[reply["job_id"]].status == "running"
    assert orch.state.jobs[reply["job_id"]].attempt == 1, "nothing ran twice"


async def test_a_worker_with_a_time_budget_takes_only_jobs_that_fit(world: Any,
                                                                    clock: SimClock) -> None:
    _, api = world
    budget = await new_worker(api, "hpc-node")
    ws = await api.ws_connect("/api/workers/ws", headers={"X-Worker-Token": budget["token"]})
    await ws.send_json({"type": "hello", "simulated": True, "accepts_until": clock.now() + 3600,
                        "gpus": [{"index": 0, "name": "A100", "memory_gb": 80}]})
    agent = Agent(ws, await ws.receive_json())
    long = await (await api.post("/api/queue/submit", json={
        "command": ["x"], "gpus": 1, "target": "worker", "estimated_runtime": 7200})).json()
    unknown = await (await api.post("/api/queue/submit", json={
        "command": ["x"], "gpus": 1, "target": "worker"})).json()
    short = await (await api.post("/api/queue/submit", json={
        "command": ["x"], "gpus": 1, "target": "worker", "max_runtime": 600})).json()
    assert (long["status"], unknown["status"], short["status"]) == ("queued", "queued",
                                                                     "running")
    assert "3600s left" in long["reasons"][0]["detail"]
    run = await agent.next("run")
    assert run["job_id"] == short["job_id"]
