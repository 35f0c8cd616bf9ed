"""GPU inventory: simulated specs, NVML's absence, and GPUs busy with foreign work."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from eventq import events as ev
from eventq import gpus
from eventq.actors.allocator import Allocate, ReportInventory
from eventq.actors.scheduler import Submit
from eventq.server import Orchestrator

MakeOrch = Callable[..., Awaitable[Orchestrator]]


def test_a_simulated_spec_lists_every_gpu_with_its_index() -> None:
    inv = gpus.simulated("2xA100-80GB,1xL4-24GB")
    assert inv.simulated and inv.backend == "simulated"
    assert [(g.index, g.name, g.memory_gb) for g in inv.gpus] == [
        (0, "A100", 80.0), (1, "A100", 80.0), (2, "L4", 24.0)]
    with pytest.raises(gpus.InventorySpecError, match="expected COUNTxNAME"):
        gpus.simulated("lots of gpus")


def test_without_a_driver_nvml_reports_zero_gpus_and_says_why() -> None:
    inv = gpus.from_nvml()
    assert inv.gpus == [] and not inv.simulated
    assert inv.nvml_error is not None and inv.nvml_error.startswith("NVML unavailable")


def test_gpus_0_means_no_local_gpus_and_nvml_is_never_read() -> None:
    inv = gpus.detect("0")
    assert inv.gpus == [] and not inv.simulated and inv.backend == "none"
    assert inv.nvml_error is None and not inv.reads_nvml, "no refresh finds the GPUs later"
    assert gpus.detect(None).reads_nvml is (gpus.from_nvml().nvml_error is None)


async def test_status_marks_the_inventory_simulated(api: TestClient[Any, Any]) -> None:
    body = await (await api.get("/api/system/status?include_allocation=true")).json()
    assert body["gpu_inventory"]["backend"] == "simulated" and body["gpu_inventory"]["simulated"]
    assert body["gpu_allocation"]["available_gpus"] == [0, 1, 2, 3]
    assert all(d["simulated"] for d in body["gpu_allocation"]["devices"])


async def test_a_gpu_filled_by_another_program_is_not_allocatable(make_orch: MakeOrch) -> None:
    limits = ev.Limits(max_concurrent=10, user_max_concurrent=10, local_job_max_concurrent=10)
    orch = await make_orch(limits=limits)
    inventory = gpus.simulated("4xA100-80GB").gpus
    busy = [g if g.index != 2 else ev.GpuInfo(2, g.name, g.memory_gb, 85.0) for g in inventory]
    await orch.allocator.ask(ReportInventory("local", busy, simulated=True))
    job = ev.JobSpec(job_id="j", user="admin", priority=30, command=["sleep", "30"], gpus=3)
    await orch.scheduler.ask(Submit(job, "user:admin"))
    assert orch.state.jobs["j"].gpus == (0, 1, 3), "GPU 2 is busy with foreign work"

    seq = orch.log.head_seq
    slightly_different = [g if g.index != 2 else ev.GpuInfo(2, g.name, g.memory_gb, 90.0)
                          for g in inventory]
    await orch.allocator.ask(ReportInventory("local", slightly_different, simulated=True))
    assert orch.log.head_seq == seq, "memory moving above the threshold records nothing"
    await orch.allocator.ask(ReportInventory("local", inventory, simulated=True))
    assert orch.log.head_seq == seq + 1 and orch.gpu_table.free("local") == {2}


async def test_a_job_gets_the_gpus_it_names_or_waits_for_them(api: TestClient[Any, Any],
                                                              orch: Orchestrator) -> None:
    await api.post("/api/queue/concurrency", json={"local_job_max_concurrent": 4,
                                                   "user_max_concurrent": 4})
    sleeper = {"command": ["sleep", "30"], "gpus": 1}

    async def submit(**fields: Any) -> dict[str, Any]:
        resp = await api.post("/api/queue/submit", json={**sleeper, **fields})
        assert resp.status == 200, await resp.text()
        reply: dict[str, Any] = await resp.json()
        return reply

    named = await submit(device_ids=[2])
    assert named["allocated_gpus"] == [2]
    anywhere = await submit(device_ids=[2], any_gpu=True)
    assert anywhere["allocated_gpus"] == [0], "a preference, not a must, with any_gpu"
    again = await submit(device_ids=[2])
    assert again["status"] == "queued"
    assert again["reasons"] == [{"code": "gpus", "detail": "needs GPUs [2]; [2] not free on "
                                                            "local"}]
    # The allocator itself, the GPUs' one owner, gives no other GPU for a named one.
    seq = orch.log.head_seq
    asked = Allocate(again["job_id"], 1, "local", 1, device_ids=[2])
    assert await orch.allocator.ask(asked) is None
    assert orch.log.head_seq == seq and orch.gpu_table.free("local") == {1, 3}
