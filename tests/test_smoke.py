"""A user submits a job over HTTP and it runs on the GPUs it was given."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp.test_utils import TestClient

from eventq.server import Orchestrator


async def wait_status(api: TestClient[Any, Any], job_id: str, status: str) -> dict[str, Any]:
    for _ in range(500):
        job = await (await api.get(f"/api/jobs/{job_id}")).json()
        if job["status"] == status:
            return job  # type: ignore[no-any-return]
        await asyncio.sleep(0.01)
    raise AssertionError(f"job {job_id} is {job['status']}, never {status}")


async def test_submitted_job_runs_with_its_gpus(api: TestClient[Any, Any],
                                                orch: Orchestrator) -> None:
    resp = await api.post("/api/queue/submit", json={
        "command": ["sh", "-c", "echo $CUDA_VISIBLE_DEVICES $EVENTQ_JOB_ID $EVENTQ_ATTEMPT"],
        "gpus": 2})
    reply = await resp.json()
    assert resp.status == 200
    assert reply["status"] == "running" and reply["allocated_gpus"] == [0, 1]
    await wait_status(api, reply["job_id"], "completed")
    out = (orch.data_dir / "jobs" / reply["job_id"] / "1" / "stdout.log").read_text()
    assert out.split() == ["0,1", reply["job_id"], "1"]
