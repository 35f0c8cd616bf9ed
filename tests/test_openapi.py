"""The OpenAPI document describes the API as it really is.

A client generated from ``/api/openapi.json`` can rely on it: every route the server has is
in it and nothing else, and requests built from it (valid ones and invalid ones, from every
kind of caller) get answers it documents, never a 5xx. The fuzzing itself lives in
``tools/fuzzkit.py`` (``tools/fuzz_api.py`` runs it at any size); requests go to a real
server on loopback from a thread while the server serves on the test's loop.

No job can run during the fuzz (fuzzed commands are random text that must never reach a
shell): every submission is sent with ``target: "worker"``, no worker process exists, and
the test checks that nothing was dispatched to this machine. The shapes of running,
finished and failed jobs are checked separately, with real jobs whose commands the test
chose.
"""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import schemathesis
from aiohttp.test_utils import TestClient

from eventq import events as ev
from eventq.http.app import make_app
from eventq.server import Orchestrator
from tests.helpers import until
from tools import fuzzkit

AiohttpClient = Callable[..., Awaitable[TestClient[Any, Any]]]
MakeOrch = Callable[..., Awaitable[Orchestrator]]

#: Valid and invalid examples per operation, for each caller that may use it: about 2,000
#: requests in all (tools/fuzz_api.py sends more).
EXAMPLES = 4
ROOMY = ev.Limits(max_concurrent=10, user_max_concurrent=10, local_job_max_concurrent=10)


def served(api: TestClient[Any, Any]) -> set[tuple[str, str]]:
    return {(route.method, route.resource.canonical) for route in api.server.app.router.routes()
            if route.method != "HEAD" and route.resource is not None}


def documented(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, ops in doc["paths"].items() for method in ops}


async def test_the_document_lists_every_route_of_the_app_and_no_other(
        api: TestClient[Any, Any]) -> None:
    doc = await (await api.get("/api/openapi.json")).json()
    assert served(api) - documented(doc) == set(), "routes the document does not describe"
    assert documented(doc) - served(api) == set(), "documented routes the server lacks"


async def test_the_document_is_valid_openapi_3_2(api: TestClient[Any, Any]) -> None:
    """3.2: the first version that describes each event of an event stream (itemSchema)."""
    doc = await (await api.get("/api/openapi.json")).json()
    assert doc["openapi"] == "3.2.0"
    schemathesis.openapi.from_dict(doc).validate()
    submit = doc["paths"]["/api/queue/submit"]["post"]
    assert submit["requestBody"]["content"]["application/json"]["schema"] == \
        {"$ref": "#/components/schemas/SubmitRequest"}
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"


async def test_anyone_may_read_the_document_but_nothing_else(
        orch: Orchestrator, aiohttp_client: AiohttpClient) -> None:
    anonymous = await aiohttp_client(make_app(orch))
    doc = await anonymous.get("/api/openapi.json")
    assert doc.status == 200 and (await doc.json())["openapi"].startswith("3.2")
    queue = await anonymous.get("/api/queue")
    assert queue.status == 401 and "error" in await queue.json()


def base_url(api: TestClient[Any, Any]) -> str:
    return str(api.make_url("/")).rstrip("/")


async def new_worker(api: TestClient[Any, Any], name: str) -> dict[str, Any]:
    resp = await api.post("/api/admin/workers", json={"name": name})
    assert resp.status == 201
    worker: dict[str, Any] = await resp.json()
    return worker


async def test_every_caller_gets_documented_answers_and_refusals_record_nothing(
        make_orch: MakeOrch, aiohttp_client: AiohttpClient) -> None:
    """An admin, a lead, a researcher, a viewer, a worker and nobody each fuzz every
    operation: no 5xx, no answer the document does not describe, no refusal that records."""
    orch = await make_orch()
    users = fuzzkit.user_callers(orch)
    api = await aiohttp_client(make_app(orch))
    fuzz = fuzzkit.Fuzz(orch, base_url(api), served(api), users, examples=EXAMPLES)
    tally = await asyncio.to_thread(fuzz.run)
    assert tally.server_errors == [], tally.problems()
    assert tally.violations == [], tally.problems()
    assert {200, 201, 401, 403, 404, 405, 409, 422} <= tally.statuses.keys(), tally.summary()
    assert orch.log.head_seq > fuzz.seeded, "no fuzzed request was accepted"
    here = [r for r in await orch.log.read(limit=10**6)
            if isinstance(r.event, ev.AttemptDispatched) and r.event.node == "local"]
    assert here == [] and not orch.node.pids, "a fuzzed job was started on this machine"


def waits_for(tmp_path: Path, name: str) -> list[str]:
    return ["sh", "-c", f"while [ ! -e {tmp_path}/{name} ]; do sleep 0.02; done"]


async def test_replies_about_real_jobs_match_the_document(
        make_orch: MakeOrch, aiohttp_client: AiohttpClient, tmp_path: Path) -> None:
    """Running, finished, failed and waiting jobs, as every reading route shows them."""
    orch = await make_orch(limits=ROOMY)
    admin = {"Authorization": f"Bearer {orch.admin_token}"}
    api = await aiohttp_client(make_app(orch), headers=admin)
    schema = fuzzkit.load(await (await api.get("/api/openapi.json")).json(), admin)

    async def submit(**body: Any) -> str:
        resp = await api.post("/api/queue/submit", json=body)
        assert resp.status == 200, await resp.text()
        job_id: str = (await resp.json())["job_id"]
        return job_id

    done = await submit(command=["true"], gpus=0)
    failed = await submit(command=["false"], gpus=0, metadata={"run": 1})
    running = await submit(command=waits_for(tmp_path, "go"), gpus=2, max_runtime=600)
    waiting = await submit(command=["true"], gpus=4, estimated_runtime=60)
    blocked = await submit(command=["true"], requires_approval=True)
    await until(lambda: orch.state.jobs[done].status == "completed"
                and orch.state.jobs[failed].status == "failed"
                and orch.state.jobs[running].status == "running")
    jobs = [done, failed, running, waiting, blocked]

    fuzz = fuzzkit.Fuzz(orch, base_url(api), served(api), {"admin": admin})

    def read_everything() -> None:
        def call(method: str, path: str, **kw: Any) -> int:
            return fuzz.call(schema[path][method].Case(headers=admin, **kw))

        for job in jobs:
            assert call("GET", "/api/jobs/{job_id}", path_parameters={"job_id": job}) == 200
            assert call("GET", "/api/jobs/{job_id}/events",
                        path_parameters={"job_id": job}) == 200
            assert call("GET", "/api/queue/position/{job_id}",
                        path_parameters={"job_id": job}) == 200
            assert call("GET", "/api/jobs/{job_id}/reasons",
                        path_parameters={"job_id": job}) == 200
        head = orch.log.head_seq
        for at in sorted({0, 1, head // 3, head // 2, head}):  # the past, as the page reads it
            assert call("GET", "/api/replay/state", query={"at": str(at)}) == 200
        assert call("GET", "/api/gpus/timeline", query={"since": "0"}) == 200
        assert call("POST", "/api/session/code") == 201
        assert call("GET", "/api/queue", query={"include_completed": "true"}) == 200
        for path in ("/api/queue/stats", "/api/queue/me", "/api/queue/concurrency",
                     "/api/admin/users", "/metrics"):
            assert call("GET", path) == 200
        assert call("GET", "/api/system/status", query={"include_allocation": "true"}) == 200
        # Event streams, event by event: the log from its start, and two ended attempts'
        # output followed to its end.
        assert call("GET", "/api/events/stream", query={"after": "0"}) == 200
        for job in (done, failed):
            assert call("GET", "/api/jobs/{job_id}/logs", path_parameters={"job_id": job},
                        query={"follow": "true", "stream": "all"}) == 200
        for gpus in (1, 4):
            assert call("POST", "/api/queue/submit", media_type="application/json",
                        body={"command": ["true"], "gpus": gpus, "dry_run": True}) == 200
        assert call("POST", "/api/queue/{job_id}/cancel",
                    path_parameters={"job_id": running}) == 200
        for _ in range(500):  # the attempt's end and release are recorded after the reply
            held = {h[0] for n in orch.gpu_table.nodes.values() for h in n.held.values()}
            if not orch.state.jobs[running].active and running not in held:
                break
            time.sleep(0.01)
        assert call("POST", "/api/queue/{job_id}/cancel",
                    path_parameters={"job_id": running}) == 409

    await asyncio.to_thread(read_everything)
    assert not orch.state.jobs[running].active
    assert fuzz.tally.server_errors == fuzz.tally.violations == [], fuzz.tally.problems()


async def test_a_stock_workers_stream_matches_the_document(
        make_orch: MakeOrch, aiohttp_client: AiohttpClient) -> None:
    """Each event of the stream, as the stock worker reads it: here a job to run."""
    orch = await make_orch()
    admin = {"Authorization": f"Bearer {orch.admin_token}"}
    api = await aiohttp_client(make_app(orch), headers=admin)
    worker = await new_worker(api, "stock")
    token = {"X-Worker-Token": worker["token"]}
    registered = await api.post("/api/workers/register", headers=token, json={
        "name": "stock", "gpu_info": {"name": "A100", "vram_gb": 80, "count": 1}})
    assert registered.status == 200
    job = await (await api.post("/api/queue/submit", json={
        "command": ["true"], "target": "worker", "gpus": 1})).json()
    assert job["status"] == "running", job  # dispatched: sent once the stream opens
    schema = fuzzkit.load(await (await api.get("/api/openapi.json")).json(), token)
    fuzz = fuzzkit.Fuzz(orch, base_url(api), served(api), {"admin": admin})
    case = schema["/api/workers/stream"]["GET"].Case(
        headers=token, query={"worker_id": worker["worker_id"]})
    assert await asyncio.to_thread(fuzz.call, case) == 200
    assert fuzz.tally.server_errors == fuzz.tally.violations == [], fuzz.tally.problems()


async def test_draining_a_draining_worker_answers_at_once(
        orch: Orchestrator, api: TestClient[Any, Any]) -> None:
    worker = await new_worker(api, "spare")
    drain = f"/api/admin/workers/{worker['worker_id']}/drain"
    assert (await api.post(drain)).status == 200
    again = await asyncio.wait_for(api.post(drain), timeout=5)  # a bound, not a measure
    assert again.status == 200 and (await again.json())["status"] == "draining"


async def test_a_worker_cannot_claim_a_million_gpus(
        orch: Orchestrator, api: TestClient[Any, Any]) -> None:
    worker = await new_worker(api, "boasts")
    before = orch.log.head_seq
    resp = await api.post("/api/workers/register", headers={"X-Worker-Token": worker["token"]},
                          json={"name": "boasts", "gpu_info": {"count": 1_000_000}})
    assert resp.status == 422 and "gpu_info" in (await resp.json())["error"]
    assert orch.log.head_seq == before


async def test_every_refusal_is_json_even_from_the_router(api: TestClient[Any, Any]) -> None:
    """SPEC 10: JSON everywhere. Unknown paths, wrong methods and oversized bodies too."""
    refused = [await api.get("/api/no-such-route"), await api.delete("/api/queue"),
               await api.post("/api/queue/submit", data=io.BytesIO(b"x" * (65 * 2**20)))]
    assert [r.status for r in refused] == [404, 405, 413]
    for resp in refused:
        assert resp.content_type == "application/json", await resp.text()
        assert "error" in await resp.json()


async def test_a_wrong_method_is_told_which_ones_the_route_has(
        api: TestClient[Any, Any]) -> None:
    """RFC 9110: a 405 carries Allow; here it is JSON as well, like every refusal."""
    for method, path, allowed in (("DELETE", "/api/queue", {"GET", "HEAD"}),
                                  ("PUT", "/api/queue/concurrency", {"GET", "HEAD", "POST"}),
                                  ("GET", "/api/queue/submit", {"POST"})):
        resp = await api.request(method, path)
        assert resp.status == 405 and "error" in await resp.json()
        assert {m.strip() for m in resp.headers.get("Allow", "").split(",")} == allowed, \
            resp.headers
