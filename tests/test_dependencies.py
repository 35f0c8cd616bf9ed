"""Pipelines: dependencies, their failures and retries, batches, and begin times."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from eventq import events as ev
from eventq.clock import SimClock
from eventq.http.app import make_app
from eventq.server import Orchestrator
from tests.helpers import until

AiohttpClient = Callable[..., Awaitable[TestClient[Any, Any]]]
ROOMY = ev.Limits(max_concurrent=20, user_max_concurrent=20, local_job_max_concurrent=20)


@pytest.fixture
async def world(make_orch: Callable[..., Awaitable[Orchestrator]],
                aiohttp_client: AiohttpClient) -> tuple[Orchestrator, TestClient[Any, Any]]:
    orch = await make_orch(limits=ROOMY)
    api = await aiohttp_client(make_app(orch),
                               headers={"Authorization": f"Bearer {orch.admin_token}"})
    return orch, api


def step(ledger: Path, name: str, fail_flag: Path | None = None) -> dict[str, Any]:
    """A job that records its start and end, and fails while ``fail_flag`` exists."""
    fail = f'[ -e {fail_flag} ] && exit 1; ' if fail_flag else ""
    return {"name": name, "gpus": 0, "command": ["sh", "-c", (
        f"echo {name} start $(date +%s%N) >> {ledger}; {fail}sleep 0.2; "
        f"echo {name} end $(date +%s%N) >> {ledger}")]}


def times(ledger: Path) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for line in ledger.read_text().splitlines():
        name, what, at = line.split()
        out.setdefault(name, {})[what] = int(at)
    return out




async def pipeline(api: TestClient[Any, Any], tmp_path: Path,
                   fail_flag: Path | None = None) -> dict[str, str]:
    ledger = tmp_path / "ledger"
    jobs = [step(ledger, "prep", fail_flag), {**step(ledger, "a"), "depends_on": ["prep"]},
            {**step(ledger, "b"), "depends_on": ["prep"]},
            {**step(ledger, "train"), "depends_on": ["a", "b"]}]
    resp = await api.post("/api/queue/batch", json={"jobs": jobs})
    reply = await resp.json()
    assert resp.status == 200, reply
    return dict(zip(["prep", "a", "b", "train"], reply["job_ids"], strict=True))


async def test_a_pipeline_runs_in_dependency_order(world: Any, tmp_path: Path) -> None:
    orch, api = world
    ids = await pipeline(api, tmp_path)
    listed = {j["name"]: j for j in (await (await api.get("/api/queue")).json())["jobs"]}
    assert listed["train"]["status"] == "waiting"
    assert {r["code"] for r in listed["train"]["reasons"]} == {"dependency"}
    await until(lambda: orch.state.jobs[ids["train"]].status == "completed")
    t = times(tmp_path / "ledger")
    assert t["a"]["start"] >= t["prep"]["end"] and t["b"]["start"] >= t["prep"]["end"]
    assert t["a"]["start"] < t["b"]["end"] and t["b"]["start"] < t["a"]["end"], "in parallel"
    assert t["train"]["start"] >= max(t["a"]["end"], t["b"]["end"])
    records = await orch.log.read()
    done = next(r.seq for r in records if isinstance(r.event, ev.JobCompleted)
                and r.event.job_id == ids["prep"])
    ready = [r.seq for r in records if isinstance(r.event, ev.JobReady)
             and r.event.job_id in (ids["a"], ids["b"])]
    assert ready and min(ready) > done and all(s - done < 6 for s in ready), \
        "the dependants were released by the completion itself, not by a timer"


async def test_a_failed_step_blocks_the_rest_until_it_is_retried(world: Any,
                                                                 tmp_path: Path) -> None:
    orch, api = world
    flag = tmp_path / "fail"
    flag.touch()
    ids = await pipeline(api, tmp_path, fail_flag=flag)
    await until(lambda: orch.state.jobs[ids["prep"]].status == "failed")
    await asyncio.sleep(0.05)
    for name in ("a", "b", "train"):
        job = await (await api.get(f"/api/jobs/{ids[name]}")).json()
        assert job["status"] == "waiting"
        assert {r["code"] for r in job["reasons"]} == {"dependency_failed"}, name
        assert {r["code"] for r in job["recorded_reasons"]} == {"dependency_failed"}, name
    flag.unlink()
    retried = await api.post(f"/api/queue/{ids['prep']}/retry")
    assert retried.status == 200
    await until(lambda: orch.state.jobs[ids["train"]].status == "completed")
    assert orch.state.jobs[ids["prep"]].attempt == 2


async def test_cycles_and_unknown_dependencies_are_refused_with_their_rows(world: Any) -> None:
    orch, api = world
    seq = orch.log.head_seq
    cycle = [{"name": "x", "command": ["true"], "gpus": 0, "depends_on": ["z"]},
             {"name": "y", "command": ["true"], "gpus": 0, "depends_on": ["x"]},
             {"name": "z", "command": ["true"], "gpus": 0, "depends_on": ["y"]}]
    resp = await api.post("/api/queue/batch", json={"jobs": cycle})
    body = await resp.json()
    assert resp.status == 422 and "cycle" in body["error"] and "rows [" in body["error"]
    unknown = [{"name": "p", "command": ["true"], "gpus": 0},
               {"name": "q", "command": ["true"], "gpus": 0, "depends_on": ["nope"]}]
    resp = await api.post("/api/queue/batch", json={"jobs": unknown})
    body = await resp.json()
    assert resp.status == 422 and body["detail"] == ["row 2: depends_on: no job or name 'nope'"]
    single = await api.post("/api/queue/submit", json={"command": ["true"],
                                                       "depends_on": ["nope"]})
    assert single.status == 422 and (await single.json())["field"] == "depends_on"
    assert orch.log.head_seq == seq and orch.state.jobs == {}, "nothing was recorded"


async def test_a_batch_with_one_row_the_log_cannot_store_records_nothing(world: Any) -> None:
    orch, api = world
    seq = orch.log.head_seq
    rows = [{"name": "fine", "command": ["true"], "gpus": 0},
            {"name": "huge", "command": ["true"], "gpus": 0, "metadata": {"steps": 2**70}},
            {"name": "after", "command": ["true"], "gpus": 0, "depends_on": ["fine"]}]
    resp = await api.post("/api/queue/batch", json={"jobs": rows})
    body = await resp.json()
    assert resp.status == 422 and body["field"] == "jobs"
    assert body["error"].startswith("row 2: metadata cannot be stored"), body
    assert orch.log.head_seq == seq and orch.state.jobs == {}, "nothing was recorded"


async def test_a_unique_name_may_be_depended_on_and_an_ambiguous_one_may_not(
        world: Any, tmp_path: Path) -> None:
    _, api = world
    for _ in range(2):
        await api.post("/api/queue/submit", json={"name": "twice", "command": ["true"],
                                                  "gpus": 0})
    await api.post("/api/queue/submit", json={"name": "once", "command": ["true"], "gpus": 0})
    ok = await api.post("/api/queue/submit", json={"command": ["true"], "gpus": 0,
                                                   "depends_on": ["once"]})
    assert ok.status == 200
    bad = await api.post("/api/queue/submit", json={"command": ["true"], "gpus": 0,
                                                    "depends_on": ["twice"]})
    assert bad.status == 422 and "used by 2 jobs" in (await bad.json())["error"]


async def test_a_job_waits_for_its_begin_time(world: Any, clock: SimClock) -> None:
    orch, api = world
    later = clock.now() + 3600
    reply = await (await api.post("/api/queue/submit", json={
        "command": ["true"], "gpus": 0, "begin_at": later})).json()
    assert reply["status"] == "queued"
    assert [r["code"] for r in reply["reasons"]] == ["begin_time"]
    clock.advance(1800)
    await asyncio.sleep(0.02)
    assert orch.state.jobs[reply["job_id"]].status == "waiting"
    clock.advance(1801)
    await until(lambda: orch.state.jobs[reply["job_id"]].status == "completed")
