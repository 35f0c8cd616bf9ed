"""The order workers are tried in (SPEC 6: the idle longest first), kept between decisions.

A placement among 10,000 idle workers must not sort them all: the scheduler's node views
keep the order and move only the node an event touched. These tests hold that the kept
order is always the one a fresh sort would give, through real websocket workers that
take jobs, finish them, drain, leave and come back; and that a placement reads only the
nodes before the one it takes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp.test_utils import TestClient

from eventq import events as ev
from eventq import policy
from eventq.clock import SimClock
from eventq.events import JobSpec, Limits
from eventq.http.app import make_app
from eventq.policy import Counts, NodeView
from eventq.server import Orchestrator
from tests.helpers import until

AiohttpClient = Callable[..., Awaitable[TestClient[Any, Any]]]
ROOMY = ev.Limits(max_concurrent=20, user_max_concurrent=20, local_job_max_concurrent=20)


def assert_kept_order_is_fresh(orch: Orchestrator) -> None:
    views = orch.scheduler.node_views()
    kept, fresh = orch.scheduler.views.order, policy.node_order(views)
    assert (kept.idle, kept.busy, kept.local) == (fresh.idle, fresh.busy, fresh.local)


class Worker:
    def __init__(self, api: TestClient[Any, Any], name: str, token: str, worker_id: str
                 ) -> None:
        self.api, self.name, self.token, self.worker_id = api, name, token, worker_id
        self.ws: aiohttp.ClientWebSocketResponse | None = None

    async def connect(self) -> None:
        self.ws = await self.api.ws_connect("/api/workers/ws",
                                            headers={"X-Worker-Token": self.token})
        await self.ws.send_json({"type": "hello", "simulated": True, "running": [],
                                 "gpus": [{"index": 0, "name": "A100", "memory_gb": 80}]})
        assert (await self.ws.receive_json(timeout=10))["type"] == "welcome"

    async def run_next(self) -> str:
        """Read its ``run``, start it and end it at once; the job's id."""
        assert self.ws is not None
        while (msg := await self.ws.receive_json(timeout=10))["type"] != "run":
            pass
        job = {"job_id": msg["job_id"], "attempt": msg["attempt"]}
        await self.ws.send_json({"type": "started", "pid": 1, **job})
        await self.ws.send_json({"type": "exited", "exit_code": 0, **job})
        return str(msg["job_id"])


async def test_jobs_go_to_the_worker_idle_longest_as_workers_finish_drain_leave_and_return(
        make_orch: Callable[..., Awaitable[Orchestrator]], aiohttp_client: AiohttpClient,
        clock: SimClock) -> None:
    orch = await make_orch(limits=ROOMY)
    api = await aiohttp_client(make_app(orch),
                               headers={"Authorization": f"Bearer {orch.admin_token}"})
    workers = []
    for i in range(5):
        made = await (await api.post("/api/admin/workers", json={"name": f"w{i}"})).json()
        workers.append(Worker(api, f"w{i}", made["token"], made["worker_id"]))
        await workers[-1].connect()
        clock.advance(1)
    w0, w1, w2, w3, w4 = workers

    async def placed() -> str:
        """Submit a one-GPU job for a worker; the name of the worker it went to."""
        reply = await (await api.post("/api/queue/submit", json={
            "command": ["x"], "gpus": 1, "target": "worker"})).json()
        assert reply["status"] == "running"
        assert_kept_order_is_fresh(orch)
        node = orch.state.jobs[reply["job_id"]].node
        return next(w.name for w in workers if w.worker_id == node)

    async def finish(worker: Worker) -> None:
        job_id = await worker.run_next()
        await until(lambda: orch.state.jobs[job_id].status == "completed")
        clock.advance(1)
        assert_kept_order_is_fresh(orch)

    assert await placed() == "w0"
    assert await placed() == "w1"
    await finish(w0)  # w0 is now the idle latest
    assert await placed() == "w2"
    assert (await api.post(f"/api/admin/workers/{w3.worker_id}/drain")).status == 200
    await until(lambda: not orch.workers.placeable(w3.worker_id))
    assert await placed() == "w4"  # w3 drains: it takes nothing
    await finish(w1)
    assert w0.ws is not None
    await w0.ws.close()
    await until(lambda: w0.worker_id not in orch.hub.connections)
    assert_kept_order_is_fresh(orch)
    await w0.connect()
    clock.advance(1)
    assert await placed() == "w1"  # idle since its job ended, before w0 came back
    assert await placed() == "w0"
    for worker in (w0, w1, w2, w4):
        await finish(worker)
    for worker in workers:
        assert worker.ws is not None
        await worker.ws.close()


class CountingList(list[NodeView]):
    """The nodes a plan is given, counting each read of one of them."""

    reads = 0

    def __getitem__(self, at: Any) -> Any:
        self.reads += 1 if isinstance(at, int) else len(range(*at.indices(len(self))))
        return super().__getitem__(at)

    def __iter__(self) -> Any:
        for node in super().__iter__():
            self.reads += 1
            yield node


def test_a_placement_among_a_thousand_idle_workers_reads_only_the_one_it_takes() -> None:
    nodes = CountingList([NodeView("local", True, {0, 1}, 2)] + [
        NodeView(f"w{i}", False, {0}, 1, idle_since=float(1000 - i)) for i in range(1000)])
    order = policy.node_order(nodes)  # as the scheduler keeps it between decisions
    nodes.reads = 0
    spec = JobSpec(job_id="j", user="u", priority=50, command=["x"], gpus=1, target="worker")
    plan = policy.plan_one(spec, Counts(), Limits(), nodes, None, 0.0, order)
    assert [(p.job_id, p.node) for p in plan.placements] == [("j", "w999")]
    assert nodes.reads <= 3
