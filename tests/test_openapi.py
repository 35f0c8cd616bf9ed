"""The OpenAPI document describes the API as it really is.

A client generated from ``/api/openapi.json`` can rely on it: every route the server has is
in it and nothing else, and requests built from it (valid ones and invalid ones) get answers
it documents. Requests come from schemathesis and go to a real server on loopback; it speaks
blocking HTTP, so it runs in a thread while the server serves on the test's loop.

No job can run during the fuzz (fuzzed commands are random text that must never reach a
shell): every submission it makes is sent with ``target: "worker"``, and no worker process
exists (the fuzzed worker routes only record what a worker says), and the test checks that
nothing was dispatched to this machine. The shapes of running, finished and failed jobs are
checked separately, with real jobs whose commands the test chose.
"""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hypothesis
import requests
import schemathesis
from aiohttp.test_utils import TestClient
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from eventq import events as ev
from eventq.http.app import make_app
from eventq.server import Orchestrator
from tests.helpers import until

AiohttpClient = Callable[..., Awaitable[TestClient[Any, Any]]]
MakeOrch = Callable[..., Awaitable[Orchestrator]]
Schema = Any  # schemathesis' OpenApiSchema

#: Streams that stay open until the client leaves: they cannot be answered "once".
NOT_FUZZED = {"/api/events/stream", "/api/workers/stream", "/api/workers/ws"}
#: Examples per operation and mode (valid, invalid): about 1,800 requests, a few seconds.
EXAMPLES = 40
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]
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


async def test_the_document_is_valid_openapi_3_1(api: TestClient[Any, Any]) -> None:
    doc = await (await api.get("/api/openapi.json")).json()
    assert doc["openapi"] == "3.1.0"
    schemathesis.openapi.from_dict(doc).validate()
    submit = doc["paths"]["/api/queue/submit"]["post"]
    assert submit["requestBody"]["content"]["application/json"]["schema"] == \
        {"$ref": "#/components/schemas/SubmitRequest"}
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"


async def test_anyone_may_read_the_document_but_nothing_else(
        orch: Orchestrator, aiohttp_client: AiohttpClient) -> None:
    anonymous = await aiohttp_client(make_app(orch))
    doc = await anonymous.get("/api/openapi.json")
    assert doc.status == 200 and (await doc.json())["openapi"].startswith("3.1")
    queue = await anonymous.get("/api/queue")
    assert queue.status == 401 and "error" in await queue.json()


def credentials(headers: dict[str, str]) -> type:
    """An auth provider: every request carries these headers, except those that test auth."""

    class Credentials:
        def get(self, case: Any, context: Any) -> dict[str, str]:
            return headers

        def set(self, case: Any, data: dict[str, str], context: Any) -> None:
            case.headers = {**(case.headers or {}), **data}

    return Credentials


def load(doc: dict[str, Any], headers: dict[str, str]) -> Schema:
    schema = schemathesis.openapi.from_dict(doc)
    schema.auth(refresh_interval=None)(credentials(headers))
    return schema


@dataclass
class Fuzz:
    """Sends generated requests from a thread and checks every answer."""

    orch: Orchestrator
    base_url: str
    served: set[tuple[str, str]]
    #: Existing names to aim path parameters at (query parameters: ``known_query``).
    known: dict[str, list[str]] = field(default_factory=dict)
    known_query: dict[str, list[str]] = field(default_factory=dict)
    only_query: set[tuple[str, str]] = field(default_factory=set)
    statuses: dict[int, int] = field(default_factory=dict)
    session: requests.Session = field(default_factory=requests.Session)
    #: Principal of every event appended, by seq: what a caller recorded, not the system.
    recorded_by: dict[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.orch.log.subscribe(lambda r: self.recorded_by.__setitem__(r.seq, r.principal))

    def recorded_by_callers(self, after: int) -> list[int]:
        """Seqs appended after ``after`` on a caller's behalf (a user or a worker)."""
        return [seq for seq, who in list(self.recorded_by.items())
                if seq > after and who != "system"]

    def run(self, schema: Schema) -> None:
        paths = schema.raw_schema["paths"]
        # Where only query parameters can be wrong: no body, and no path (no job to depend on).
        self.only_query = {(m.upper(), p) for p, ops in paths.items() for m, op in ops.items()
                         if "requestBody" not in op and "{" not in p}
        inputless = {(m.upper(), p) for p, ops in paths.items()
                     for m, op in ops.items() if not {"requestBody", "parameters"} & set(op)}
        for result in schema.get_all_operations():
            operation = result.ok()
            key = (operation.method.upper(), operation.path)
            if operation.path in NOT_FUZZED or key not in self.served:
                continue
            self.fuzz(operation, GenerationMode.POSITIVE)
            if key not in inputless:
                self.fuzz(operation, GenerationMode.NEGATIVE)

    def fuzz(self, operation: Any, mode: GenerationMode) -> None:
        @hypothesis.settings(max_examples=EXAMPLES, deadline=None, database=None,
                             derandomize=True, phases=[hypothesis.Phase.generate],
                             suppress_health_check=list(hypothesis.HealthCheck))
        @hypothesis.given(case=operation.as_strategy(generation_mode=mode), data=st.data())
        def one(case: Any, data: st.DataObject) -> None:
            self.aim(case, data)
            status = self.call(case)
            if mode is GenerationMode.POSITIVE and (case.method, case.path) in self.only_query:
                # Only parameters could be wrong, and these ones are valid.
                assert status != 422, f"valid parameters refused: {case.query}"

        one()

    def call(self, case: Any) -> int:
        """Send one case; its answer must be documented, and a refusal must record nothing."""
        before = self.orch.log.head_seq
        # A bound on a hung request (a failure), not a measure of speed.
        response = case.call(base_url=self.base_url, session=self.session, timeout=10)
        self.statuses[response.status_code] = self.statuses.get(response.status_code, 0) + 1
        case.validate_response(response, checks=CHECKS)
        if 400 <= response.status_code < 500:
            assert "error" in response.json(), response.text
            # Jobs started earlier may go on recording their own progress meanwhile.
            assert not self.recorded_by_callers(before), f"refused, yet recorded: {response.text}"
        status: int = response.status_code
        return status

    def aim(self, case: Any, data: st.DataObject) -> None:
        """Point parameters at jobs, users and workers that exist, some of the time."""
        known = {**self.known, "job_id": list(self.orch.state.jobs)}
        for params, names in ((case.path_parameters, known), (case.query, self.known_query)):
            for name in set(params or {}) & names.keys():
                params[name] = data.draw(st.sampled_from([*names[name], params[name]]))
        if case.query and "follow" in case.query:
            case.query["follow"] = "false"
        bodies = case.body.get("jobs") if isinstance(case.body, dict) and \
            case.operation.path == "/api/queue/batch" else [case.body]
        for body in bodies if isinstance(bodies, list) else []:
            if isinstance(body, dict) and case.operation.path.startswith("/api/queue/"):
                body["target"] = "worker"
        gpu_info = case.body.get("gpu_info") if isinstance(case.body, dict) else None
        if isinstance(gpu_info, dict) and isinstance(gpu_info.get("count"), int):
            # Unbounded for now (test_a_worker_cannot_claim_a_million_gpus); keep it small.
            gpu_info["count"] %= 9


async def seed(api: TestClient[Any, Any]) -> None:
    """Jobs in each state a person can act on: waiting, blocked, held, cancelled, rejected."""
    async def submit(**extra: Any) -> str:
        resp = await api.post("/api/queue/submit",
                              json={"command": ["true"], "target": "worker", **extra})
        assert resp.status == 200
        job_id: str = (await resp.json())["job_id"]
        return job_id

    await submit()
    await submit(requires_approval=True)
    await submit(no_wait=True)
    assert (await api.post(f"/api/queue/{await submit()}/hold")).status == 200
    assert (await api.post(f"/api/queue/{await submit()}/cancel")).status == 200


async def connect(orch: Orchestrator, aiohttp_client: AiohttpClient,
                  **headers: str) -> tuple[TestClient[Any, Any], Schema, str]:
    assert orch.admin_token is not None
    admin = {"Authorization": f"Bearer {orch.admin_token}"}
    api = await aiohttp_client(make_app(orch), headers=admin)
    doc = await (await api.get("/api/openapi.json")).json()
    return api, load(doc, {**admin, **headers}), str(api.make_url("/")).rstrip("/")


async def new_worker(api: TestClient[Any, Any], name: str) -> dict[str, Any]:
    resp = await api.post("/api/admin/workers", json={"name": name})
    assert resp.status == 201
    worker: dict[str, Any] = await resp.json()
    return worker


async def test_fuzzed_requests_get_documented_answers_and_refusals_record_nothing(
        make_orch: MakeOrch, aiohttp_client: AiohttpClient) -> None:
    orch = await make_orch()
    orch.add_user("alice", ev.Level.RESEARCHER, "alpha")
    api, _, _ = await connect(orch, aiohttp_client)
    agent, spare = await new_worker(api, "agent"), await new_worker(api, "spare")
    api, schema, base_url = await connect(orch, aiohttp_client, **{
        "X-Worker-Token": agent["token"]})
    await seed(api)
    seeded = orch.log.head_seq

    # Admin routes act on the spare (never on the fuzzing worker's own token); worker routes
    # name the calling worker, or another one.
    fuzz = Fuzz(orch, base_url, served(api), {"name": ["alice"],
                                              "worker_id": [spare["worker_id"]]},
                {"worker_id": [agent["worker_id"], spare["worker_id"]]})
    await asyncio.to_thread(fuzz.run, schema)

    assert {200, 201, 401, 403, 404, 409, 422} <= fuzz.statuses.keys(), fuzz.statuses
    assert orch.log.head_seq > seeded, "no fuzzed request was accepted"
    here = [r for r in await orch.log.read(limit=10**6)
            if isinstance(r.event, ev.AttemptDispatched) and r.event.node == "local"]
    assert here == [] and not orch.node.pids, "a fuzzed job was started on this machine"


def waits_for(tmp_path: Path, name: str) -> list[str]:
    return ["sh", "-c", f"while [ ! -e {tmp_path}/{name} ]; do sleep 0.02; done"]




async def test_replies_about_real_jobs_match_the_document(
        make_orch: MakeOrch, aiohttp_client: AiohttpClient, tmp_path: Path) -> None:
    """Running, finished, failed and waiting jobs, as every reading route shows them."""
    orch = await make_orch(limits=ROOMY)
    api, schema, base_url = await connect(orch, aiohttp_client)

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

    def read_everything() -> None:
        fuzz = Fuzz(orch, base_url, served(api))

        def call(method: str, path: str, **kw: Any) -> int:
            return fuzz.call(schema[path][method].Case(
                headers={"Authorization": f"Bearer {orch.admin_token}"}, **kw))

        for job in jobs:
            assert call("GET", "/api/jobs/{job_id}", path_parameters={"job_id": job}) == 200
            assert call("GET", "/api/jobs/{job_id}/events",
                        path_parameters={"job_id": job}) == 200
            assert call("GET", "/api/queue/position/{job_id}",
                        path_parameters={"job_id": job}) == 200
        assert call("GET", "/api/queue", query={"include_completed": "true"}) == 200
        for path in ("/api/queue/stats", "/api/queue/me", "/api/queue/concurrency",
                     "/api/admin/users", "/metrics"):
            assert call("GET", path) == 200
        assert call("GET", "/api/system/status", query={"include_allocation": "true"}) == 200
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
