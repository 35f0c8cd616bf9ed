"""Shared fixtures: a real orchestrator on a real SQLite file, on a simulated clock."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from eventq import gpus
from eventq.clock import SimClock
from eventq.events import Limits
from eventq.http.app import make_app
from eventq.server import Orchestrator
from tests.cluster import Cluster

AiohttpClient = Callable[..., Awaitable[TestClient[Any, Any]]]


def kill_attempts(orch: Orchestrator) -> None:
    """Tests leave nothing behind: a stopped server leaves jobs running by design."""
    for pgid in list(orch.node.pids.values()):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)


@pytest.fixture
def clock() -> SimClock:
    return SimClock()


@pytest.fixture
async def make_orch(tmp_path: Path,
                    clock: SimClock) -> AsyncIterator[Callable[..., Awaitable[Orchestrator]]]:
    """Start an orchestrator: ``await make_orch(gpus="4xA100-80GB", limits=Limits(...))``."""
    started: list[Orchestrator] = []

    async def start(gpu_spec: str = "4xA100-80GB", limits: Limits | None = None,
                    data_dir: Path | None = None, grace: float = 2.0) -> Orchestrator:
        orch = Orchestrator(data_dir or tmp_path / "data", gpus.detect(gpu_spec or None), clock,
                            grace_seconds=grace, limits=limits)
        await orch.start()
        started.append(orch)
        return orch

    try:
        yield start
    finally:
        for orch in started:
            kill_attempts(orch)
            await orch.stop()


@pytest.fixture
async def orch(make_orch: Callable[..., Awaitable[Orchestrator]]) -> AsyncIterator[Orchestrator]:
    o = await make_orch()
    try:
        yield o
    finally:
        kill_attempts(o)
        await o.stop()


@pytest.fixture
async def api(orch: Orchestrator, aiohttp_client: AiohttpClient) -> TestClient[Any, Any]:
    """A real aiohttp server on loopback, the client sending the admin's token."""
    return await aiohttp_client(make_app(orch),
                                headers={"Authorization": f"Bearer {orch.admin_token}"})


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """Real server and worker processes, all ended after the test (``tests/cluster.py``)."""
    made = Cluster(tmp_path)
    try:
        yield made
    finally:
        made.close()
