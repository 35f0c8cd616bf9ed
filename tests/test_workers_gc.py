"""A long-lived server keeps its workers' connections out of the cyclic collector's view.

With 10,000 workers connected, every collection that scans their connections stalls the
event loop, and a dispatch with it. A server (``long_lived``) freezes a welcome burst
once it has passed; an orchestrator that comes and goes (as in tests) leaves the
collector alone.
"""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import ClientWebSocketResponse
from aiohttp.test_utils import TestClient

from eventq import gcpause
from eventq.http.app import make_app
from eventq.http.hub import Outbox
from eventq.server import Orchestrator

AiohttpClient = Callable[..., Awaitable[TestClient[Any, Any]]]


async def serving(make_orch: Callable[..., Awaitable[Orchestrator]],
                  aiohttp_client: AiohttpClient, long_lived: bool
                  ) -> tuple[Orchestrator, TestClient[Any, Any]]:
    """An orchestrator (a server's if ``long_lived``) and an admin's client of its API."""
    orch = await make_orch()
    orch.long_lived = long_lived
    return orch, await aiohttp_client(make_app(orch),
                                      headers={"Authorization": f"Bearer {orch.admin_token}"})


async def welcomed(api: TestClient[Any, Any], name: str) -> ClientWebSocketResponse:
    """A new worker ``name``'s connection, past its welcome."""
    made = await (await api.post("/api/admin/workers", json={"name": name})).json()
    ws = await api.ws_connect("/api/workers/ws", headers={"X-Worker-Token": made["token"]})
    await ws.send_json({"type": "hello", "simulated": True, "gpus": []})
    assert (await ws.receive_json(timeout=10))["type"] == "welcome"
    return ws


async def connected_outboxes(make_orch: Callable[..., Awaitable[Orchestrator]],
                             aiohttp_client: AiohttpClient, long_lived: bool) -> list[Outbox]:
    """Ten workers connected and welcomed, past the burst; their connections' outboxes."""
    orch, api = await serving(make_orch, aiohttp_client, long_lived)
    for i in range(10):
        await welcomed(api, f"w{i}")
    await asyncio.sleep(1.3)  # past the burst (gcpause.BURST_SECONDS, 1 s)
    return list(orch.hub.connections.values())


def scanned(objects: list[Outbox]) -> int:
    """How many of ``objects`` the cyclic collector still scans."""
    ids = {id(o) for o in objects}
    return sum(1 for o in gc.get_objects() if id(o) in ids)


async def test_a_servers_welcomed_connections_are_frozen_out_of_the_collectors_scans(
        make_orch: Callable[..., Awaitable[Orchestrator]],
        aiohttp_client: AiohttpClient, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gcpause, "FREEZE_FROM_CONNECTIONS", 1)
    frozen_before = gc.get_freeze_count()
    try:
        outboxes = await connected_outboxes(make_orch, aiohttp_client, long_lived=True)
        assert len(outboxes) == 10 and scanned(outboxes) == 0
    finally:
        gc.unfreeze()  # the test process's later tests collect as before
    assert frozen_before == 0


async def test_an_orchestrator_that_comes_and_goes_leaves_the_collector_alone(
        make_orch: Callable[..., Awaitable[Orchestrator]],
        aiohttp_client: AiohttpClient) -> None:
    outboxes = await connected_outboxes(make_orch, aiohttp_client, long_lived=False)
    assert len(outboxes) == 10 and scanned(outboxes) == 10
    assert gc.get_freeze_count() == 0


class Cycle:
    def __init__(self) -> None:
        self.me = self


async def test_frozen_connections_that_closed_are_freed_by_the_sweep_after_enough_closes(
        make_orch: Callable[..., Awaitable[Orchestrator]],
        aiohttp_client: AiohttpClient, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gcpause, "FREEZE_FROM_CONNECTIONS", 1)
    monkeypatch.setattr(gcpause, "CLOSES_PER_SWEEP", 3)
    monkeypatch.setattr(gcpause, "_closed", 0)
    orch, api = await serving(make_orch, aiohttp_client, long_lived=True)
    try:
        sockets = [await welcomed(api, f"w{i}") for i in range(4)]
        held = Cycle()  # what a connection holds in a cycle (aiohttp's objects do)
        await asyncio.sleep(1.3)  # frozen with the connections
        gone = weakref.ref(held)
        del held  # garbage now, but frozen: no collection looks at it
        for ws in sockets[:3]:
            await ws.close()
        for _ in range(200):
            if len(orch.hub.connections) == 1:
                break
            await asyncio.sleep(0.01)
        await sockets[3].send_json({"type": "heartbeat", "running": [], "beat": 1})
        await asyncio.sleep(1.3)  # the heartbeat's freeze, after the sweep
        assert gone() is None
        await sockets[3].close()
    finally:
        gc.unfreeze()


async def test_a_server_with_few_workers_leaves_the_collector_alone(
        make_orch: Callable[..., Awaitable[Orchestrator]],
        aiohttp_client: AiohttpClient) -> None:
    """Ten connections are a short scan: freezing them would only keep other cycles."""
    outboxes = await connected_outboxes(make_orch, aiohttp_client, long_lived=True)
    assert len(outboxes) == 10 and scanned(outboxes) == 10
    assert gc.get_freeze_count() == 0


async def test_a_frozen_cycle_is_freed_after_the_sweep_period_with_no_connection_closed(
        make_orch: Callable[..., Awaitable[Orchestrator]],
        aiohttp_client: AiohttpClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """A freeze keeps any cycle that outlived a young collection (a web page's stream, a
    request's exception), not only a connection's: with the workers all staying, a full
    sweep still comes within ``SWEEP_SECONDS``, so such garbage does not pile up."""
    monkeypatch.setattr(gcpause, "FREEZE_FROM_CONNECTIONS", 1)
    monkeypatch.setattr(gcpause, "SWEEP_SECONDS", 0.5)
    _, api = await serving(make_orch, aiohttp_client, long_lived=True)
    try:
        ws = await welcomed(api, "w")
        held = Cycle()  # some other part's cycle, alive at the freeze
        await asyncio.sleep(1.3)
        assert gc.get_freeze_count() > 0
        gone = weakref.ref(held)
        del held  # garbage now, frozen; no connection closes
        await ws.send_json({"type": "heartbeat", "running": [], "beat": 1})
        await asyncio.sleep(1.3)  # the heartbeat's freeze, after the sweep its period asks
        assert gone() is None
        await ws.close()
    finally:
        gc.unfreeze()
