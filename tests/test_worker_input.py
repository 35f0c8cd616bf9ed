"""A worker that says something impossible is refused, and nothing is recorded.

Every case talks to a real server on loopback: eventq's agent protocol over a real
websocket, the stock worker's over REST. A refused hello ends the connection with an
``error`` message and close code 4400 before the worker is known to be online, so no job
is ever sent to GPUs that cannot exist; a bad message after the hello is answered with
an ``error`` and the connection goes on.
"""

from __future__ import annotations

import io
import json
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from eventq.server import Orchestrator

A100 = {"index": 0, "name": "A100", "memory_gb": 80.0}


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


async def new_worker(api: TestClient[Any, Any]) -> dict[str, Any]:
    resp = await api.post("/api/admin/workers", json={"name": "box"})
    assert resp.status == 201
    made: dict[str, Any] = await resp.json()
    return made


def hello(**fields: Any) -> dict[str, Any]:
    return {"type": "hello", "simulated": True, "gpus": [A100], **fields}


def gpu(**fields: Any) -> dict[str, Any]:
    return {**A100, **fields}


BAD_HELLOS = [
    pytest.param(hello(gpus=[gpu(index=2**70)]), id="index-2-to-the-70"),
    pytest.param(hello(gpus=[gpu(index=-1, memory_gb=-5)]), id="index-minus-1-negative-memory"),
    pytest.param(hello(gpus=[gpu(index=4096)]), id="index-past-4095"),
    pytest.param(hello(gpus=[gpu(), gpu()]), id="the-same-index-twice"),
    pytest.param(hello(gpus=[gpu(memory_gb=-1)]), id="negative-memory"),
    pytest.param(hello(gpus=[gpu(memory_gb=1e300)]), id="absurd-memory"),
    pytest.param(hello(gpus=[gpu(foreign_memory_percent=150)]), id="percent-past-100"),
    pytest.param(hello(gpus=[gpu(foreign_memory_percent=-1)]), id="negative-percent"),
    pytest.param(hello(gpus=[gpu(name="A" * 201)]), id="gpu-name-too-long"),
    pytest.param(hello(gpus=[gpu(name="A100\x1b[2J")]), id="control-characters-in-name"),
    pytest.param(hello(gpus=[gpu(index=i) for i in range(4097)]), id="more-than-4096-gpus"),
    pytest.param(hello(name="n" * 201), id="worker-name-too-long"),
    pytest.param(hello(labels={f"k{i}": "v" for i in range(65)}), id="more-than-64-labels"),
    pytest.param(hello(labels={"k" * 129: "v"}), id="label-key-too-long"),
    pytest.param(hello(labels={"k": "v" * 257}), id="label-value-too-long"),
    pytest.param(hello(labels={"": "v"}), id="empty-label-key"),
    pytest.param(hello(running=[["j" * 65, 1]]), id="running-job-id-too-long"),
    pytest.param(hello(running=[["job", 0]]), id="running-attempt-zero"),
    pytest.param(hello(running=[["job", 2**70]]), id="running-attempt-2-to-the-70"),
    pytest.param(hello(accepts_until=-1), id="accepts-until-before-1970"),
    pytest.param(hello(gpus="all"), id="gpus-not-a-list"),
]


@pytest.mark.parametrize("greeting", BAD_HELLOS)
async def test_an_impossible_hello_is_refused_and_the_worker_stays_offline(
        orch: Orchestrator, api: TestClient[Any, Any], greeting: dict[str, Any]) -> None:
    worker = await new_worker(api)
    await orch.log.flush()
    before = orch.log.head_seq
    ws = await api.ws_connect("/api/workers/ws", headers={"X-Worker-Token": worker["token"]})
    try:
        await ws.send_str(text_of(greeting))
        refusal = await ws.receive_json(timeout=10)
        assert refusal["type"] == "error" and "hello" in refusal["error"], refusal
        closed = await ws.receive(timeout=10)
        assert closed.type == aiohttp.WSMsgType.CLOSE and ws.close_code == 4400
    finally:
        await ws.close()
    assert worker["worker_id"] not in orch.hub.connections
    await orch.log.flush()
    assert orch.log.head_seq == before, "a refused hello recorded something"
    job = await (await api.post("/api/queue/submit", json={
        "command": ["true"], "gpus": 1, "target": "worker"})).json()
    assert job["status"] == "queued" and job["reasons"][0]["code"] == "no_worker", job


def text_of(message: dict[str, Any]) -> str:
    """The standard encoder writes 2**70 as the number it is (aiohttp's would too)."""
    return json.dumps(message)


@pytest.mark.parametrize("raw", [
    pytest.param('{"type": "progress", "job_id": "j", "attempt": 1, "progress": '
                 + nested(2_000) + "}", id="progress"),
    pytest.param('{"extra": ' + nested(2_000) + ', "type": "started", "job_id": "j", '
                 '"attempt": 1}', id="an-unknown-field"),
])
async def test_a_deeply_nested_message_is_answered_and_the_connection_kept(
        orch: Orchestrator, api: TestClient[Any, Any], raw: str) -> None:
    worker = await new_worker(api)
    ws = await api.ws_connect("/api/workers/ws", headers={"X-Worker-Token": worker["token"]})
    try:
        await ws.send_json(hello())
        assert (await ws.receive_json(timeout=10))["type"] == "welcome"
        await ws.send_str(raw)
        error = await ws.receive_json(timeout=10)
        assert error["type"] == "error" and "nested too deeply" in error["error"], error
        # Still connected and still heard: the next message is read and answered.
        await ws.send_json({"type": "log", "job_id": "nope", "attempt": 1,
                            "stream": "stdout", "data": "x"})
        answer = await ws.receive_json(timeout=10)
        assert answer["type"] == "error" and "not this worker's" in answer["error"], answer
        assert not ws.closed and worker["worker_id"] in orch.hub.connections
    finally:
        await ws.close()


@pytest.mark.parametrize("message", [
    pytest.param({"type": "started", "job_id": "j", "attempt": 2**70}, id="attempt-2-to-the-70"),
    pytest.param({"type": "started", "job_id": "j", "attempt": 1, "pid": 2**40}, id="absurd-pid"),
    pytest.param({"type": "exited", "job_id": "j", "attempt": 1, "exit_code": 2**70},
                 id="absurd-exit-code"),
    pytest.param({"type": "exited", "job_id": "j", "attempt": 1, "exit_code": 1,
                  "detail": "d" * 65_537}, id="detail-past-64-kib"),
    pytest.param({"type": "heartbeat", "running": [["j", -1]]}, id="negative-attempt"),
])
async def test_an_impossible_report_is_answered_and_changes_nothing(
        orch: Orchestrator, api: TestClient[Any, Any], message: dict[str, Any]) -> None:
    worker = await new_worker(api)
    ws = await api.ws_connect("/api/workers/ws", headers={"X-Worker-Token": worker["token"]})
    try:
        await ws.send_json(hello())
        assert (await ws.receive_json(timeout=10))["type"] == "welcome"
        await orch.log.flush()
        before = orch.log.head_seq
        await ws.send_str(text_of(message))
        error = await ws.receive_json(timeout=10)
        assert error["type"] == "error" and "bad message" in error["error"], error
        await orch.log.flush()
        assert orch.log.head_seq == before and not ws.closed
    finally:
        await ws.close()


BAD_REGISTRATIONS = [
    pytest.param({"name": "box", "gpu_info": {"count": 1, "vram_gb": -1}}, "gpu_info",
                 id="negative-vram"),
    pytest.param({"name": "box", "gpu_info": {"count": 1, "vram_gb": 1e300}}, "gpu_info",
                 id="absurd-vram"),
    pytest.param({"name": "box", "gpu_info": {"count": 4097}}, "gpu_info", id="4097-gpus"),
    pytest.param({"name": "box", "gpu_info": {"count": 1, "name": "G" * 201}}, "gpu_info",
                 id="gpu-name-too-long"),
    pytest.param({"name": "box", "gpu_info": {"count": 1, "driver": "x\x00"}}, "gpu_info",
                 id="nul-in-driver"),
    pytest.param({"name": "b\x00x"}, "name", id="nul-in-name"),
    pytest.param({"name": "box", "provider": "p" * 201}, "provider", id="provider-too-long"),
    pytest.param({"name": "box", "labels": {f"k{i}": "v" for i in range(65)}}, "labels",
                 id="more-than-64-labels"),
    pytest.param({"name": "box", "current_job_id": "j" * 65}, "current_job_id",
                 id="job-id-too-long"),
]


@pytest.mark.parametrize(("body", "field"), BAD_REGISTRATIONS)
async def test_an_impossible_registration_names_its_field(
        orch: Orchestrator, api: TestClient[Any, Any], body: dict[str, Any], field: str) -> None:
    worker = await new_worker(api)
    await orch.log.flush()
    before = orch.log.head_seq
    resp = await api.post("/api/workers/register", json=body,
                          headers={"X-Worker-Token": worker["token"]})
    assert resp.status == 422, await resp.text()
    assert (await resp.json())["field"].split(".")[0] == field
    await orch.log.flush()
    assert orch.log.head_seq == before


@pytest.mark.parametrize(("path", "raw"), [
    ("/api/workers/heartbeat",
     '{"worker_id": "WID", "status": "idle", "job_progress": ' + nested(1_000) + "}"),
    ("/api/workers/job/nope/status", '{"status": "training", "progress": ' + nested(1_000) + "}"),
])
async def test_a_stock_worker_report_nested_too_deeply_is_a_422(
        orch: Orchestrator, api: TestClient[Any, Any], path: str, raw: str) -> None:
    worker = await new_worker(api)
    resp = await api.post(path, data=io.BytesIO(raw.replace("WID", worker["worker_id"]).encode()),
                          headers={"X-Worker-Token": worker["token"],
                                   "Content-Type": "application/json"})
    assert resp.status == 422, await resp.text()
    assert "nested too deeply" in (await resp.json())["error"]
