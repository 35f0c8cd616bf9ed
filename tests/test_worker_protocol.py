"""The worker protocol's edges: bad input, wrong tokens, rotation, drain, removal, liveness.

A real orchestrator on a real SQLite file, its aiohttp app on loopback, workers
scripted over a real websocket (eventq's agent) or the REST + SSE routes (SimpleTuner's
stock worker). Whatever a worker sends, it gets a clear 4xx or an ``error`` message;
nothing is recorded and nothing changes.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
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
WAIT = 10.0


@dataclass
class World:
    orch: Orchestrator
    api: TestClient[Any, Any]  # sends the admin's bearer token

    async def head(self) -> int:
        await self.orch.log.flush()
        return self.orch.log.head_seq

    async def new_worker(self, name: str, worker_type: str = "persistent",
                         **labels: str) -> dict[str, Any]:
        resp = await self.api.post("/api/admin/workers", json={
            "name": name, "worker_type": worker_type, "labels": labels})
        assert resp.status == 201
        made: dict[str, Any] = await resp.json()
        return made

    async def submit(self, **body: Any) -> dict[str, Any]:
        resp = await self.api.post("/api/queue/submit",
                                   json={"command": ["train"], "target": "worker", **body})
        assert resp.status == 200, await resp.text()
        reply: dict[str, Any] = await resp.json()
        return reply

    async def job(self, job_id: str) -> dict[str, Any]:
        job: dict[str, Any] = await (await self.api.get(f"/api/jobs/{job_id}")).json()
        return job

    async def listed(self, worker_id: str) -> dict[str, Any] | None:
        workers = (await (await self.api.get("/api/admin/workers")).json())["workers"]
        return next((w for w in workers if w["worker_id"] == worker_id), None)

    async def raw(self, method: str, path: str, **kwargs: Any) -> aiohttp.ClientResponse:
        """A request without the admin's bearer token (only the headers given)."""
        async with aiohttp.ClientSession() as session:
            resp = await session.request(method, self.api.make_url(path), **kwargs)
            await resp.read()
            return resp


@pytest.fixture
async def world(make_orch: Callable[..., Awaitable[Orchestrator]],
                aiohttp_client: AiohttpClient) -> World:
    orch = await make_orch(limits=ROOMY)
    api = await aiohttp_client(make_app(orch),
                               headers={"Authorization": f"Bearer {orch.admin_token}"})
    return World(orch, api)


def wt(token: str) -> dict[str, str]:
    return {"X-Worker-Token": token}


async def settle(check: Callable[[], bool]) -> None:
    for _ in range(500):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("never settled")


# --- eventq's agent over a websocket ----------------------------------------------------


class Agent:
    def __init__(self, ws: aiohttp.ClientWebSocketResponse, welcome: dict[str, Any]) -> None:
        self.ws, self.welcome = ws, welcome

    async def next(self, kind: str | None = None) -> dict[str, Any]:
        """The next message (of ``kind``, skipping others)."""
        while True:
            msg: dict[str, Any] = await asyncio.wait_for(self.ws.receive_json(), WAIT)
            if kind is None or msg["type"] == kind:
                return msg

    async def send(self, **msg: Any) -> None:
        await self.ws.send_json(msg)

    async def run(self, run: dict[str, Any], exit_code: int = 0) -> None:
        await self.send(type="started", job_id=run["job_id"], attempt=run["attempt"], pid=7)
        await self.send(type="exited", job_id=run["job_id"], attempt=run["attempt"],
                        exit_code=exit_code)

    async def closed(self) -> aiohttp.WSMessage:
        while True:
            msg = await asyncio.wait_for(self.ws.receive(), WAIT)
            if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                            aiohttp.WSMsgType.CLOSING):
                return msg


async def heard(w: World, agent: Agent, **msg: Any) -> None:
    """Send a message and wait until the server has read it: call after the clock moved."""
    worker_id = agent.welcome["worker_id"]
    await agent.send(**msg)
    await settle(lambda: w.orch.registry.last_seen.get(worker_id) == w.orch.clock.now())


async def connect(w: World, token: str, gpus: int = 1,
                  running: list[list[Any]] | None = None) -> Agent:
    ws = await w.api.ws_connect("/api/workers/ws", headers=wt(token))
    await ws.send_json({"type": "hello", "simulated": True, "running": running or [],
                        "gpus": [{"index": i, "name": "A100", "memory_gb": 80}
                                 for i in range(gpus)]})
    welcome = await asyncio.wait_for(ws.receive_json(), WAIT)
    assert welcome["type"] == "welcome", welcome
    return Agent(ws, welcome)


# --- SimpleTuner's stock worker over REST + SSE -------------------------------------


async def register(w: World, token: str, count: int = 1, **body: Any) -> dict[str, Any]:
    resp = await w.api.post("/api/workers/register", headers=wt(token), json={
        "name": "box", "persistent": True,
        "gpu_info": {"name": "A100", "vram_gb": 80, "count": count, "accelerator": "cuda"},
        **body})
    assert resp.status == 200, await resp.text()
    reply: dict[str, Any] = await resp.json()
    return reply


class Stream:
    """An open ``/api/workers/stream``: server-sent events, one ``data:`` line each."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self.resp = resp

    async def next(self, kind: str) -> dict[str, Any]:
        while True:
            line = await asyncio.wait_for(self.resp.content.readline(), WAIT)
            assert line, "the stream ended"
            if line.startswith(b"data: "):
                event: dict[str, Any] = json.loads(line[6:])
                if event["type"] == kind:
                    return event

    async def ended(self) -> None:
        while await asyncio.wait_for(self.resp.content.readline(), WAIT):
            pass


async def open_stream(w: World, token: str, worker_id: str) -> Stream:
    resp = await w.api.get("/api/workers/stream", params={"worker_id": worker_id},
                           headers=wt(token))
    assert resp.status == 200
    return Stream(resp)


async def status(w: World, token: str, job_id: str, **body: Any) -> aiohttp.ClientResponse:
    resp = await w.api.post(f"/api/workers/job/{job_id}/status", headers=wt(token), json=body)
    await resp.read()
    return resp


async def heartbeat(w: World, token: str, **body: Any) -> aiohttp.ClientResponse:
    resp = await w.api.post("/api/workers/heartbeat", headers=wt(token), json=body)
    await resp.read()
    return resp


@pytest.fixture
async def stock(world: World) -> AsyncIterator[tuple[dict[str, Any], dict[str, Any]]]:
    """Two registered stock workers, A and B, each with one GPU."""
    a, b = await world.new_worker("box-a"), await world.new_worker("box-b")
    await register(world, a["token"])
    await register(world, b["token"])
    yield a, b


# --- bad frames -----------------------------------------------------------------------


@pytest.mark.parametrize("frame", [
    "not json at all",
    '{"type": "nonsense"}',
    '{"no_type": true}',
    "[1, 2, 3]",
    '{"type": "started"}',
    '{"type": "exited", "job_id": "j", "attempt": "one", "exit_code": 0}',
    '{"type": "hello", "gpus": []}',
])
async def test_a_bad_frame_gets_an_error_records_nothing_and_the_socket_lives_on(
        world: World, frame: str) -> None:
    made = await world.new_worker("box")
    agent = await connect(world, made["token"])
    before = await world.head()
    await agent.ws.send_str(frame)
    reply = await agent.next()
    assert reply["type"] == "error" and reply["error"]
    assert await world.head() == before, "nothing recorded"
    # the same connection still works: it takes a job and runs it to the end
    job = await world.submit()
    run = await agent.next("run")
    assert run["job_id"] == job["job_id"]
    await agent.run(run)
    await settle(lambda: world.orch.state.jobs[job["job_id"]].status == "completed")


async def test_a_binary_frame_gets_an_error_too(world: World) -> None:
    made = await world.new_worker("box")
    agent = await connect(world, made["token"])
    before = await world.head()
    await agent.ws.send_bytes(b"\x93\x01\x02\x03")
    reply = await agent.next()
    assert reply["type"] == "error" and reply["error"]
    assert await world.head() == before


async def test_a_log_for_an_attempt_that_is_not_the_workers_own_is_refused(
        world: World) -> None:
    mine, other = await world.new_worker("mine"), await world.new_worker("other")
    agent = await connect(world, mine["token"])
    job = await world.submit()
    run = await agent.next("run")
    intruder = await connect(world, other["token"])
    await intruder.send(type="log", job_id=run["job_id"], attempt=1, stream="stdout",
                        data="not mine\n")
    assert (await intruder.next())["type"] == "error"
    await agent.send(type="log", job_id=run["job_id"], attempt=1, stream="stdout", data="ok\n")
    await agent.run(run)
    await settle(lambda: world.orch.state.jobs[job["job_id"]].status == "completed")
    out = world.orch.data_dir / "jobs" / job["job_id"] / "1" / "stdout.log"
    assert out.read_text() == "ok\n"


async def test_a_first_frame_that_is_not_a_hello_is_refused_and_closed(world: World) -> None:
    made = await world.new_worker("box")
    before = await world.head()
    ws = await world.api.ws_connect("/api/workers/ws", headers=wt(made["token"]))
    await ws.send_json({"type": "heartbeat", "running": []})
    reply = await asyncio.wait_for(ws.receive_json(), WAIT)
    assert reply["type"] == "error" and "hello" in reply["error"]
    closing = await asyncio.wait_for(ws.receive(), WAIT)
    assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    assert await world.head() == before
    assert (await world.listed(made["worker_id"]) or {})["status"] == "connecting"


# --- the stock routes: 4xx, never 500, nothing changed ----------------------------------


async def test_an_unknown_heartbeat_status_is_422_and_changes_nothing(
        world: World, stock: Any) -> None:
    a, _ = stock
    before = await world.head()
    resp = await heartbeat(world, a["token"], worker_id=a["worker_id"], status="sleeping",
                           current_job_id=None)
    assert resp.status == 422
    assert (await resp.json())["field"] == "status"
    for bad in (b"{not json", b'{"worker_id": 5, "status": "idle"}', b"[]"):
        resp = await world.api.post("/api/workers/heartbeat", headers=wt(a["token"]), data=bad)
        assert resp.status == 422, bad
    assert await world.head() == before
    assert (await world.listed(a["worker_id"]) or {})["status"] == "idle"


async def test_a_status_report_for_another_workers_job_is_403(
        world: World, stock: Any) -> None:
    a, b = stock
    job = await world.submit()
    runner, other = (a, b) if job["job_id"] in world.orch.state.node_active.get(
        a["worker_id"], {}) else (b, a)
    before = await world.head()
    for word in ("training", "completed", "failed"):
        resp = await status(world, other["token"], job["job_id"], status=word)
        assert resp.status == 403, word
    assert await world.head() == before
    assert (await world.job(job["job_id"]))["status"] == "dispatched"
    assert (await status(world, runner["token"], job["job_id"], status="completed")).status \
        == 200
    assert (await world.job(job["job_id"]))["status"] == "completed"


async def test_a_finished_job_reported_running_again_is_409(world: World,
                                                            stock: Any) -> None:
    a, b = stock
    job = await world.submit()
    runner = a if job["job_id"] in world.orch.state.node_active.get(a["worker_id"], {}) else b
    for word in ("starting", "training", "completed"):
        assert (await status(world, runner["token"], job["job_id"], status=word)).status == 200
    before = await world.head()
    for word in ("running", "training", "starting", "failed", "completed"):
        resp = await status(world, runner["token"], job["job_id"], status=word)
        assert resp.status == 409, word
        assert "completed" in (await resp.json())["error"]
    assert await world.head() == before
    done = await world.job(job["job_id"])
    assert (done["status"], done["exit_code"]) == ("completed", 0)
    bad = await status(world, runner["token"], job["job_id"], status="exploded")
    assert bad.status == 422


async def test_a_worker_id_that_is_not_the_tokens_is_403_and_changes_nothing(
        world: World, stock: Any) -> None:
    a, b = stock
    before = await world.head()
    resp = await heartbeat(world, a["token"], worker_id=b["worker_id"], status="idle")
    assert resp.status == 403
    resp = await world.api.post("/api/workers/disconnect", headers=wt(a["token"]),
                                json={"worker_id": b["worker_id"]})
    assert resp.status == 403
    resp = await world.api.get("/api/workers/queue", headers=wt(a["token"]),
                               params={"worker_id": b["worker_id"]})
    assert resp.status == 403
    resp = await world.api.get("/api/workers/stream", headers=wt(a["token"]),
                               params={"worker_id": b["worker_id"]})
    assert resp.status == 403
    assert await world.head() == before
    assert (await world.listed(b["worker_id"]) or {})["status"] == "idle", "b is still online"


@pytest.mark.parametrize("headers", [{}, {"X-Worker-Token": "wt_not-a-real-token"},
                                     {"X-Worker-Token": ""}])
async def test_no_or_an_invalid_worker_token_is_401(world: World, stock: Any,
                                                    headers: dict[str, str]) -> None:
    a, _ = stock
    job = await world.submit()
    before = await world.head()
    calls = [("POST", "/api/workers/register", {"name": "x", "gpu_info": {"count": 1}}),
             ("POST", "/api/workers/heartbeat", {"worker_id": a["worker_id"],
                                                 "status": "idle"}),
             ("POST", f"/api/workers/job/{job['job_id']}/status", {"status": "completed"}),
             ("POST", "/api/workers/disconnect", {"worker_id": a["worker_id"]}),
             ("GET", f"/api/workers/queue?worker_id={a['worker_id']}", None),
             ("GET", f"/api/workers/stream?worker_id={a['worker_id']}", None),
             ("GET", "/api/workers/ws", None)]
    for method, path, body in calls:
        resp = await world.raw(method, path, json=body, headers=headers)
        assert resp.status == 401, path
    assert await world.head() == before
    assert (await world.job(job["job_id"]))["status"] == "dispatched"


async def test_user_tokens_open_no_worker_route_and_worker_tokens_no_user_route(
        world: World, stock: Any) -> None:
    a, _ = stock
    alice = world.orch.add_user("alice", ev.Level.RESEARCHER)
    for bearer in (alice, world.orch.admin_token):
        resp = await world.raw("POST", "/api/workers/heartbeat",
                               headers={"Authorization": f"Bearer {bearer}"},
                               json={"worker_id": a["worker_id"], "status": "idle"})
        assert resp.status == 401
        resp = await world.raw("POST", "/api/workers/register",
                               headers={"Authorization": f"Bearer {bearer}"},
                               json={"name": "sneaky", "gpu_info": {"count": 8}})
        assert resp.status == 401
    for headers in (wt(a["token"]), {"Authorization": f"Bearer {a['token']}"}):
        for method, path in (("GET", "/api/queue"), ("POST", "/api/queue/submit"),
                             ("GET", "/api/admin/workers"), ("GET", "/api/system/status")):
            resp = await world.raw(method, path, headers=headers,
                                   json={"command": ["x"]} if method == "POST" else None)
            assert resp.status == 401, (path, headers)
    assert world.orch.state.jobs == {}


# --- token rotation ---------------------------------------------------------------------


async def test_rotating_a_token_closes_the_websocket_at_once_and_says_why(
        world: World) -> None:
    made = await world.new_worker("box")
    agent = await connect(world, made["token"])
    job = await world.submit()
    run = await agent.next("run")
    await agent.send(type="started", job_id=run["job_id"], attempt=1, pid=7)
    await settle(lambda: world.orch.state.jobs[job["job_id"]].pid is not None)

    resp = await world.api.post(f"/api/admin/workers/{made['worker_id']}/token")
    assert resp.status == 200
    new_token = (await resp.json())["token"]
    bye = await agent.next("shutdown")
    assert "rotated" in bye["reason"]
    await agent.closed()

    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await world.api.ws_connect("/api/workers/ws", headers=wt(made["token"]))
    assert refused.value.status == 401
    old = await world.raw("POST", "/api/workers/register", headers=wt(made["token"]),
                          json={"name": "box", "gpu_info": {"count": 1}})
    assert old.status == 401

    back = await connect(world, new_token, running=[[job["job_id"], 1]])
    assert back.welcome["keep"] == [[job["job_id"], 1]], "the run goes on"
    await back.send(type="exited", job_id=job["job_id"], attempt=1, exit_code=0)
    await settle(lambda: world.orch.state.jobs[job["job_id"]].status == "completed")
    assert world.orch.state.jobs[job["job_id"]].attempt == 1


async def test_rotating_a_token_ends_the_stock_workers_stream_and_says_why(
        world: World) -> None:
    made = await world.new_worker("box")
    await register(world, made["token"])
    stream = await open_stream(world, made["token"], made["worker_id"])
    resp = await world.api.post(f"/api/admin/workers/{made['worker_id']}/token")
    new_token = (await resp.json())["token"]
    assert "rotated" in (await stream.next("shutdown"))["reason"]
    await stream.ended()
    assert (await heartbeat(world, made["token"], worker_id=made["worker_id"],
                            status="idle")).status == 401
    assert (await heartbeat(world, new_token, worker_id=made["worker_id"],
                            status="idle")).status == 200


# --- drain, removal, has_jobs, liveness, ephemeral workers -----------------------------


async def test_a_drained_worker_finishes_its_job_and_takes_no_new_one(
        world: World, clock: SimClock) -> None:
    made = await world.new_worker("box")
    agent = await connect(world, made["token"], gpus=2)
    first = await world.submit(gpus=1)
    run = await agent.next("run")
    await agent.send(type="started", job_id=run["job_id"], attempt=1, pid=7)

    resp = await world.api.post(f"/api/admin/workers/{made['worker_id']}/drain")
    assert resp.status == 200 and (await resp.json())["status"] == "draining"
    assert (await agent.next("drain"))["reason"]
    second = await world.submit(gpus=1)
    assert second["status"] == "queued", "a free GPU, but the worker is draining"
    for _ in range(6):  # it keeps heartbeating well past the timeout: still draining
        clock.advance(world.orch.heartbeat_timeout / 3)
        await heard(world, agent, type="heartbeat", running=[[first["job_id"], 1]])
    await agent.send(type="exited", job_id=first["job_id"], attempt=1, exit_code=0)
    await settle(lambda: world.orch.state.jobs[first["job_id"]].status == "completed")
    await agent.send(type="heartbeat", running=[])
    waiting = await world.job(second["job_id"])
    assert waiting["status"] == "pending" and waiting["reasons"]
    assert (await world.listed(made["worker_id"]) or {})["status"] == "draining"

    other = await world.new_worker("fresh")
    fresh = await connect(world, other["token"])
    assert (await fresh.next("run"))["job_id"] == second["job_id"], "it goes elsewhere"
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(agent.next("run"), 0.3)


async def test_removing_an_online_worker_needs_force_which_fails_its_attempts(
        world: World, clock: SimClock) -> None:
    made = await world.new_worker("box")
    agent = await connect(world, made["token"])
    job = await world.submit()
    run = await agent.next("run")
    await agent.send(type="started", job_id=run["job_id"], attempt=1, pid=7)
    await settle(lambda: world.orch.state.jobs[job["job_id"]].pid is not None)

    resp = await world.api.delete(f"/api/admin/workers/{made['worker_id']}")
    assert resp.status == 409 and "force" in (await resp.json())["error"]
    assert (await world.job(job["job_id"]))["status"] == "running"
    assert await world.listed(made["worker_id"]) is not None

    resp = await world.api.delete(f"/api/admin/workers/{made['worker_id']}",
                                  params={"force": "true"})
    assert resp.status == 200
    assert "removed" in (await agent.next("shutdown"))["reason"]
    assert await world.listed(made["worker_id"]) is None
    # Its agent, refused from now on, stops the attempt; until the lease it held has surely
    # lapsed, the attempt is not given to anyone else.
    assert (await world.job(job["job_id"]))["status"] == "running"
    clock.advance(world.orch.heartbeat_timeout - 1)
    await asyncio.sleep(0.05)
    assert (await world.job(job["job_id"]))["status"] == "running"
    clock.advance(1)
    await settle(lambda: world.orch.state.jobs[job["job_id"]].status == "pending")
    requeued = await world.job(job["job_id"])
    assert (requeued["status"], requeued["attempt"]) == ("pending", 1)
    ended = [r.event for r in await world.orch.log.read(job_id=job["job_id"])
             if isinstance(r.event, ev.AttemptEnded)]
    assert [(e.attempt, e.outcome) for e in ended] == [(1, "lost")]
    assert ended[0].detail.startswith("worker_lost")
    refused = await world.raw("POST", "/api/workers/register", headers=wt(made["token"]),
                              json={"name": "box", "gpu_info": {"count": 1}})
    assert refused.status == 401


async def test_an_offline_worker_is_removed_without_force(world: World, stock: Any) -> None:
    a, _ = stock
    resp = await world.api.post("/api/workers/disconnect", headers=wt(a["token"]),
                                json={"worker_id": a["worker_id"]})
    assert resp.status == 200
    assert (await world.listed(a["worker_id"]) or {})["status"] == "offline"
    resp = await world.api.delete(f"/api/admin/workers/{a['worker_id']}")
    assert resp.status == 200
    assert await world.listed(a["worker_id"]) is None


async def test_the_queue_route_says_whether_a_job_waits_that_this_worker_could_take(
        world: World) -> None:
    made = await world.new_worker("box", gpu_type="a100")
    await register(world, made["token"], count=1)

    async def has_jobs() -> bool:
        resp = await world.api.get("/api/workers/queue", headers=wt(made["token"]),
                                   params={"worker_id": made["worker_id"]})
        assert resp.status == 200
        answer: bool = (await resp.json())["has_jobs"]
        return answer

    assert await has_jobs() is False
    running = await world.submit()
    assert running["status"] == "running"
    assert await has_jobs() is False, "nothing is waiting"
    elsewhere = await world.submit(worker_labels={"gpu_type": "h100"})
    too_big = await world.submit(gpus=2)
    assert elsewhere["status"] == too_big["status"] == "queued"
    assert await has_jobs() is False, "nothing waiting could ever run here"
    mine = await world.submit(worker_labels={"gpu_type": "a1*"})
    assert mine["status"] == "queued"
    assert await has_jobs() is True
    await world.api.post(f"/api/queue/{mine['job_id']}/cancel")
    assert await has_jobs() is False


async def test_heartbeats_never_append_events(world: World, clock: SimClock) -> None:
    ws_made, sse_made = await world.new_worker("agent"), await world.new_worker("stock")
    agent = await connect(world, ws_made["token"])
    await register(world, sse_made["token"])
    before = await world.head()
    for _ in range(40):
        clock.advance(world.orch.heartbeat_timeout / 4)
        await heard(world, agent, type="heartbeat", running=[])
        resp = await heartbeat(world, sse_made["token"], worker_id=sse_made["worker_id"],
                               status="idle", current_job_id=None)
        assert resp.status == 200
    assert await world.head() == before, "ten heartbeat timeouts of heartbeats: no event"
    for made in (ws_made, sse_made):
        assert (await world.listed(made["worker_id"]) or {})["status"] == "idle"


async def test_an_ephemeral_worker_is_told_to_shut_down_after_its_job(world: World) -> None:
    made = await world.new_worker("once", worker_type="ephemeral")
    agent = await connect(world, made["token"])
    first = await world.submit()
    second = await world.submit()
    assert (first["status"], second["status"]) == ("running", "queued")
    run = await agent.next("run")
    await agent.run(run)
    bye = await agent.next()
    assert bye["type"] == "shutdown" and "one job" in bye["reason"]
    await settle(lambda: world.orch.state.jobs[first["job_id"]].status == "completed")
    waiting = await world.job(second["job_id"])
    assert waiting["status"] == "pending", "the second job is not given to it"
