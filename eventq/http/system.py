"""``/api/system/status``: the machine, the GPU inventory and (optionally) the allocation."""

from __future__ import annotations

import os
from typing import Any

from aiohttp import web

from eventq.http.common import ORCH
from eventq.http.queue import flag
from eventq.server import Orchestrator

routes = web.RouteTableDef()


def _memory_percent() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        total = int(info["MemTotal"].split()[0])
        return round(100.0 * (total - int(info["MemAvailable"].split()[0])) / total, 1)
    except (OSError, KeyError, ValueError):
        return None


def allocation(orch: Orchestrator) -> dict[str, Any]:
    node = orch.gpu_table.nodes["local"]
    free = orch.gpu_table.free("local")
    devices = [{"index": g.index, "name": g.name, "memory_gb": g.memory_gb,
                "allocated": g.index in node.held,
                "job_id": node.held[g.index][0] if g.index in node.held else None,
                "allocatable": g.index in node.held or g.index in free,
                "simulated": node.simulated} for g in node.gpus.values()]
    return {"allocated_gpus": sorted(node.held), "available_gpus": sorted(free),
            "running_local_jobs": orch.state.counts.local_jobs, "devices": devices}


@routes.get("/api/system/status")
async def status(request: web.Request) -> web.Response:
    orch = request.app[ORCH]
    node = orch.gpu_table.nodes["local"]
    body: dict[str, Any] = {
        "timestamp": orch.clock.now(),
        "load_avg_5min": os.getloadavg()[1],
        "memory_percent": _memory_percent(),
        "gpus": [{"index": g.index, "name": g.name, "memory_gb": g.memory_gb}
                 for g in node.gpus.values()],
        "gpu_inventory": {"backend": orch.inventory.backend, "count": len(node.gpus),
                          "simulated": node.simulated, "nvml_error": node.nvml_error,
                          "capabilities": {}},
    }
    if flag(request, "include_allocation"):
        body["gpu_allocation"] = allocation(orch)
    return web.json_response(body)
