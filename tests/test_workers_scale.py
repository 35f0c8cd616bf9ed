"""A fleet of workers on one orchestrator: connection bursts, token look-ups, restarts.

Real parts only: the real ``eventq server`` process, real websockets on loopback, and the
agent's own reconnection backoff (``eventq.agent.agent.Backoff``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import selectors
import signal
import socket
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestClient

from eventq import events as ev
from eventq import policy
from eventq.actors.allocator import GpuTable, Release, decide_release
from eventq.agent.agent import Backoff
from eventq.cli.serve import _listen
from eventq.events import JobSpec, Limits
from eventq.http.app import make_app
from eventq.log import Record
from eventq.policy import Counts, NodeView
from eventq.server import Orchestrator
from tests.serverproc import LISTENING, Server, end, first_line, running, spawn

AiohttpClient = Callable[..., Awaitable[TestClient[Any, Any]]]
BURST = 300  # more than aiohttp's default listen backlog (128)
FLEET = 200


@contextlib.contextmanager
def connecting(port: int, count: int) -> Iterator[list[socket.socket]]:
    """``count`` non-blocking connections to ``port`` under way; all closed at the end."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket()
            socks.append(sock)
            sock.setblocking(False)
            assert sock.connect_ex(("127.0.0.1", port)) in (0, errno.EINPROGRESS)
        yield socks
    finally:
        for sock in socks:
            sock.close()


def established(socks: list[socket.socket], seconds: float) -> int:
    """How many finished their handshake within ``seconds`` (none is accepted meanwhile)."""
    with selectors.DefaultSelector() as selector:
        for sock in socks:
            selector.register(sock, selectors.EVENT_WRITE, sock)
        done: set[socket.socket] = set()
        loop_until = seconds
        while len(done) < len(socks) and loop_until > 0:
            for key, _ in selector.select(0.1):
                sock = key.data
                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                    done.add(sock)
                selector.unregister(sock)
            loop_until -= 0.1
        return len(done)


async def test_a_burst_of_connections_waits_for_a_busy_server_instead_of_being_dropped(
        ) -> None:
    """After a restart every worker reconnects at once while the server is busy welcoming:
    the kernel must queue them all, not drop those past a short backlog."""
    runners: list[web.AppRunner] = []
    try:
        port = await _listen(runners, web.Application(), "127.0.0.1", 0, None)
        # The event loop is not run meanwhile: nothing is accepted, as in a busy server.
        with connecting(port, BURST) as socks:
            assert established(socks, 3.0) == BURST
    finally:
        for runner in runners:
            await runner.cleanup()


async def test_each_worker_token_opens_only_its_own_worker_after_rotation_and_removal(
        make_orch: Callable[..., Awaitable[Orchestrator]],
        aiohttp_client: AiohttpClient) -> None:
    orch = await make_orch()
    api = await aiohttp_client(make_app(orch),
                               headers={"Authorization": f"Bearer {orch.admin_token}"})
    made = [await (await api.post("/api/admin/workers", json={"name": f"w{i}"})).json()
            for i in range(3)]
    rotated = await (await api.post(f"/api/admin/workers/{made[1]['worker_id']}/token")).json()
    assert (await api.delete(f"/api/admin/workers/{made[2]['worker_id']}")).status == 200

    async def welcomed_as(token: str) -> str | int:
        try:
            ws = await api.ws_connect("/api/workers/ws", headers={"X-Worker-Token": token})
        except aiohttp.WSServerHandshakeError as exc:
            return exc.status
        async with ws:
            await ws.send_json({"type": "hello", "simulated": True, "gpus": []})
            welcome = await ws.receive_json(timeout=10)
            return str(welcome["worker_id"])

    assert await welcomed_as(made[0]["token"]) == made[0]["worker_id"]
    assert await welcomed_as(rotated["token"]) == made[1]["worker_id"]
    assert await welcomed_as(made[1]["token"]) == 401  # its old token
    assert await welcomed_as(made[2]["token"]) == 401  # removed
    assert await welcomed_as("wt_" + "0" * 40) == 401
    made_again = await api.post("/api/admin/workers", json={"name": "w2"})
    assert made_again.status == 201  # a removed worker's name is free again
    assert (await api.post("/api/admin/workers", json={"name": "w0"})).status == 409


class Fleet:
    """Workers on real websockets: hello, then reconnect after the agent's backoff."""

    def __init__(self, url: str, tokens: list[str]) -> None:
        self.url, self.tokens = url, tokens
        #: worker index -> how many times it was welcomed.
        self.welcomes = [0] * len(tokens)
        self.changed = asyncio.Event()

    async def worker(self, session: aiohttp.ClientSession, index: int) -> None:
        backoff = Backoff()
        while True:
            try:
                async with session.ws_connect(
                        self.url + "/api/workers/ws",
                        headers={"X-Worker-Token": self.tokens[index]}) as ws:
                    await ws.send_json({"type": "hello", "simulated": True, "running": [],
                                        "gpus": [{"index": 0, "name": "A100",
                                                  "memory_gb": 80}]})
                    welcome = await ws.receive_json(timeout=30)
                    backoff.reset(float(welcome["heartbeat_seconds"]))
                    self.welcomes[index] += 1
                    self.changed.set()
                    await ws.send_json({"type": "heartbeat", "running": [], "beat": 1})
                    async for _ in ws:
                        pass
            except (aiohttp.ClientError, OSError, TimeoutError, TypeError, ValueError):
                pass
            await asyncio.sleep(backoff.next())

    async def until_all_welcomed(self, times: int) -> None:
        while min(self.welcomes) < times:
            self.changed.clear()
            await asyncio.wait_for(self.changed.wait(), 60)


def restart(server: Server, data_dir: Path, stderr: Path, port: int) -> Server:
    """kill -9, then a new server on the same data directory and port."""
    os.killpg(server.proc.pid, signal.SIGKILL)
    server.proc.wait(10)
    proc = spawn(data_dir, stderr, "--port", str(port))
    line = first_line(proc, 60)
    if line is None or not line.startswith(LISTENING):
        end(proc)
        raise AssertionError(f"the server did not restart: {line!r} {stderr.read_text()}")
    return Server(proc, server.url, server.token)


async def test_two_hundred_workers_are_all_welcomed_back_after_a_kill_9(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with running(data_dir, tmp_path / "first.err") as server:
        tokens = [server.call("POST", "/api/admin/workers", {"name": f"sim-{i}"})[1]["token"]
                  for i in range(FLEET)]
        port = int(server.url.rsplit(":", 1)[1].split("/")[0])
        fleet = Fleet(server.url, tokens)
        again: Server | None = None
        connector = aiohttp.TCPConnector(limit=0)  # a connection per worker
        async with aiohttp.ClientSession(connector=connector) as session:
            tasks = [asyncio.create_task(fleet.worker(session, i)) for i in range(FLEET)]
            try:
                await fleet.until_all_welcomed(1)
                status, listed = await asyncio.to_thread(server.call, "GET",
                                                         "/api/admin/workers")
                assert status == 200
                again = await asyncio.to_thread(restart, server, data_dir,
                                                tmp_path / "second.err", port)
                await fleet.until_all_welcomed(2)
                status, listed = await asyncio.to_thread(again.call, "GET",
                                                         "/api/admin/workers")
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                if again is not None:
                    end(again.proc)
    assert status == 200
    rows = listed if isinstance(listed, list) else listed["workers"]
    assert sorted(row["status"] for row in rows) == ["idle"] * FLEET


def test_a_plan_copies_only_the_nodes_it_places_on_and_leaves_the_callers_views_alone(
        ) -> None:
    """Placement views are shared between decisions (``NodeViews``): a plan that places
    works on copies, whichever nodes it touches."""
    nodes = [NodeView(f"w{i}", False, {0}, 1, idle_since=float(i)) for i in range(50)]
    specs = [JobSpec(job_id=f"j{i}", user="u", priority=50, command=["true"],
                     target="worker") for i in range(3)]
    waiting = [SimpleNamespace(spec=spec) for spec in specs]
    limits = Limits(max_concurrent=10, user_max_concurrent=10)
    plan = policy.plan(iter(waiting), Counts(), limits, nodes, 0.0)
    assert [(p.job_id, p.node) for p in plan.placements] == [
        ("j0", "w0"), ("j1", "w1"), ("j2", "w2")]  # the idle longest first, one job each
    assert all(n.free == {0} and n.ends == [] for n in nodes)


def test_nodes_are_tried_workers_idle_longest_first_then_busy_then_the_local_node() -> None:
    nodes = [NodeView("local", True, {0, 1}, 2, idle_since=0.0),
             NodeView("busy-a", False, set(), 1), NodeView("late", False, {0}, 1,
                                                          idle_since=30.0),
             NodeView("big", False, {0, 1}, 2, idle_since=40.0),
             NodeView("early", False, {0}, 1, idle_since=10.0, labels={"zone": "eu"}),
             NodeView("busy-b", False, set(), 1)]

    def tried(**spec: Any) -> list[str]:
        job = JobSpec(job_id="j", user="u", priority=50, command=["true"], **spec)
        return [n.name for n in policy.fitting_nodes(job, nodes)]

    assert tried() == ["early", "late", "big", "busy-a", "busy-b", "local"]
    assert tried(target="worker") == ["early", "late", "big", "busy-a", "busy-b"]
    assert tried(target="local") == ["local"]
    assert tried(gpus=2) == ["big", "local"]
    assert tried(gpus=0) == ["local"]  # a CPU job stays home unless it asks for a worker
    assert tried(gpus=0, target="worker") == ["early", "late", "big", "busy-a", "busy-b"]
    assert tried(worker_labels={"zone": "e*"}) == ["early", "local"]


def test_a_release_finds_the_gpus_an_attempt_holds_and_only_those() -> None:
    table = GpuTable()
    gpus = [ev.GpuInfo(i, "A100", 80.0) for i in range(2)]
    fold: list[ev.AnyEvent] = [ev.NodeInventoryReported(node=n, gpus=gpus, simulated=True)
                               for n in ("a", "b")]
    fold += [ev.GpusAllocated(job_id="j1", attempt=1, node="a", gpus=[0, 1]),
             ev.GpusAllocated(job_id="j2", attempt=1, node="b", gpus=[1]),
             ev.GpusAllocated(job_id="j2", attempt=2, node="b", gpus=[0])]
    for seq, e in enumerate(fold, 1):
        table.evolve(Record(seq, 0.0, "system", e, b""))
    assert decide_release(table, Release("j1", 1)) == [ev.GpusReleased(
        job_id="j1", attempt=1, node="a", gpus=[0, 1], reason="ended")]
    assert table.held_by("j2", 1) == {"b": [1]} and table.held_by("j2", 2) == {"b": [0]}
    after: list[ev.AnyEvent] = [*decide_release(table, Release("j1", 1)),
                                ev.WorkerRemoved(worker_id="b")]
    for seq, e in enumerate(after, 10):
        table.evolve(Record(seq, 0.0, "system", e, b""))
    assert table.held_by("j1", 1) == {} and decide_release(table, Release("j1", 1)) == []
    assert table.held_by("j2", 1) == {}  # its worker was removed, and its GPUs with it
