"""``/api/admin/workers``: create workers, rotate their tokens, drain and remove them.

Creating a worker or rotating its token answers how to start it on its machine, at the
URL the server advertises to other machines (``eventq server --advertise-url``, else its
host's name when it listens beyond loopback)."""

from __future__ import annotations

import shlex
from typing import Any, Literal

import msgspec
from aiohttp import web

from eventq.actors.registry import CreateWorker, DrainWorker, RemoveWorker, RotateWorkerToken
from eventq.actors.scheduler import Outcome
from eventq.http import bounds as b
from eventq.http.common import ORCH, ApiError, decode_body, require_admin
from eventq.http.queue import flag
from eventq.server import Orchestrator

routes = web.RouteTableDef()


class NewWorker(msgspec.Struct, forbid_unknown_fields=True):
    name: b.ShortName
    worker_type: Literal["ephemeral", "persistent"] = "persistent"
    labels: b.Labels = {}


def worker_dict(orch: Orchestrator, worker_id: str) -> dict[str, Any]:
    w = orch.workers.by_id[worker_id]
    active = orch.state.node_active.get(worker_id, {})
    node = orch.gpu_table.nodes.get(worker_id)
    return {"worker_id": w.worker_id, "name": w.name, "worker_type": w.worker_type,
            "status": orch.workers.status(worker_id, len(active)).value, "labels": w.labels,
            "transport": w.transport, "current_jobs": sorted(active),
            "gpus": [{"index": g.index, "name": g.name, "memory_gb": g.memory_gb}
                     for g in node.gpus.values()] if node else [],
            "simulated": node.simulated if node else False,
            "connected": worker_id in orch.hub.connections, "offline_reason": w.offline_reason,
            "last_seen": orch.registry.last_seen.get(worker_id)}


async def _ask(request: web.Request, message: Any) -> str | None:
    outcome, token = await request.app[ORCH].registry.ask(message)
    assert isinstance(outcome, Outcome)
    if outcome.durable is not None:
        await outcome.durable
    return token  # type: ignore[no-any-return]


def _known(request: web.Request) -> str:
    worker_id = request.match_info["worker_id"]
    if worker_id not in request.app[ORCH].workers.by_id:
        raise ApiError(404, f"no worker {worker_id}")
    return worker_id


@routes.get("/api/admin/workers")
async def list_workers(request: web.Request) -> web.Response:
    require_admin(request)
    orch = request.app[ORCH]
    return web.json_response({"workers": [worker_dict(orch, w) for w in orch.workers.by_id]})


@routes.post("/api/admin/workers")
async def create_worker(request: web.Request) -> web.Response:
    admin = require_admin(request)
    orch = request.app[ORCH]
    body = decode_body(await request.read(), NewWorker)
    token = await _ask(request, CreateWorker(admin.principal, body.name, body.worker_type,
                                             body.labels))
    worker = orch.workers.by_id[orch.workers.by_name[body.name]]
    assert token is not None
    return web.json_response({"worker_id": worker.worker_id, "token": token, "name": worker.name,
                              **connection(request, worker.worker_id, token)}, status=201)


def connection(request: web.Request, worker_id: str, token: str) -> dict[str, Any]:
    """How to start the worker on its machine, with eventq's agent or SimpleTuner's own:
    the advertised URL (never a loopback address, unless the server listens only there,
    which the note then says)."""
    orch = request.app[ORCH]
    worker = orch.workers.by_id[worker_id]
    url = orch.advertise_url or str(request.url.origin())
    name = shlex.quote(worker.name)
    persistent = worker.worker_type == "persistent"
    out: dict[str, Any] = {
        "url": url,
        "connection_command": f"eventq worker --url {url} --token {token} --name {name}"
                              + (" --persistent" if persistent else ""),
        # SimpleTuner's worker reads its name and type from the environment too when its
        # URL and token come from there (its flags are ignored then).
        "stock_worker_command": f"SIMPLETUNER_ORCHESTRATOR_URL={url} "
                                f"SIMPLETUNER_WORKER_TOKEN={token} SIMPLETUNER_WORKER_NAME={name}"
                                + (" SIMPLETUNER_WORKER_PERSISTENT=true" if persistent else "")
                                + " simpletuner worker"}
    if orch.advertise_url is None:
        out["note"] = (
            "no other machine can reach this server: it listens on loopback only, so these "
            "commands work on its own machine only. For a GPU machine, restart it with "
            "--host 0.0.0.0 --tls-cert FILE --tls-key FILE (or --insecure on a network you "
            "trust), or with --advertise-url URL where a proxy or tunnel reaches it; then "
            f"`eventq workers token {name}` prints these commands with that address")
    return out


@routes.post("/api/admin/workers/{worker_id}/token")
async def rotate_token(request: web.Request) -> web.Response:
    """A new token; the old one stops working at once. ``?keep_running=true`` hands the new
    one to the worker's live agent, whose attempts go on; otherwise its connection closes, it
    is refused, and it stops its attempts (they are requeued once its lease has lapsed)."""
    admin = require_admin(request)
    worker_id = _known(request)
    keep = flag(request, "keep_running")
    token = await _ask(request, RotateWorkerToken(admin.principal, worker_id, keep))
    assert token is not None
    handed = keep and request.app[ORCH].hub.hand_token(worker_id, token)
    return web.json_response({"worker_id": worker_id, "token": token,
                              "handed_to_live_agent": handed,
                              **connection(request, worker_id, token)})


@routes.post("/api/admin/workers/{worker_id}/drain")
async def drain(request: web.Request) -> web.Response:
    admin = require_admin(request)
    worker_id = _known(request)
    await _ask(request, DrainWorker(admin.principal, worker_id))
    return web.json_response(worker_dict(request.app[ORCH], worker_id))


@routes.delete("/api/admin/workers/{worker_id}")
async def remove(request: web.Request) -> web.Response:
    admin = require_admin(request)
    worker_id = _known(request)
    force = flag(request, "force")
    await _ask(request, RemoveWorker(admin.principal, worker_id, force))
    return web.json_response({"success": True, "worker_id": worker_id})
