"""An operator scrapes ``/metrics`` and sees the queue, the GPUs and the log as they are."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from eventq import events as ev
from eventq.http.app import make_app
from eventq.server import Orchestrator
from tests.helpers import until

AiohttpClient = Callable[..., Awaitable[TestClient[Any, Any]]]
MakeOrch = Callable[..., Awaitable[Orchestrator]]
ROOMY = ev.Limits(max_concurrent=10, user_max_concurrent=10, local_job_max_concurrent=10)
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(api: TestClient[Any, Any]) -> Samples:
    resp = await api.get("/metrics")
    assert resp.status == 200 and resp.content_type == "text/plain"
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(await resp.text())
            for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def waits_for(tmp_path: Path, name: str) -> list[str]:
    return ["sh", "-c", f"while [ ! -e {tmp_path}/{name} ]; do sleep 0.02; done"]




async def submit(api: TestClient[Any, Any], token: str, **body: Any) -> str:
    resp = await api.post("/api/queue/submit", json=body,
                          headers={"Authorization": f"Bearer {token}"})
    assert resp.status == 200, await resp.text()
    job_id: str = (await resp.json())["job_id"]
    return job_id


async def test_a_scrape_shows_the_queue_the_gpus_and_the_log(
        make_orch: MakeOrch, aiohttp_client: AiohttpClient, tmp_path: Path) -> None:
    orch = await make_orch(limits=ROOMY)
    alice = orch.add_user("alice", ev.Level.RESEARCHER, "alpha")
    bob = orch.add_user("bob", ev.Level.RESEARCHER, "beta")
    await orch.log.flush()
    commits_before, committed_before = orch.log.commits, orch.log.committed_events
    api = await aiohttp_client(make_app(orch),
                               headers={"Authorization": f"Bearer {orch.admin_token}"})

    quick = await submit(api, alice, command=["true"], gpus=0)
    await until(lambda: orch.state.jobs[quick].status == "completed")
    a = await submit(api, alice, command=waits_for(tmp_path, "a"), gpus=2)
    b = await submit(api, bob, command=waits_for(tmp_path, "b"), gpus=1)
    waiting = await submit(api, alice, command=["true"], gpus=2)
    await until(lambda: all(orch.state.jobs[j].status == "running" for j in (a, b)))
    await orch.log.flush()

    seen = await scrape(api)
    assert value(seen, "eventq_events_appended_total") == orch.log.head_seq
    assert value(seen, "eventq_jobs", status="running") == 2
    assert value(seen, "eventq_jobs", status="pending") == 1
    assert value(seen, "eventq_jobs", status="completed") == 1
    assert value(seen, "eventq_jobs", status="failed") == 0
    assert value(seen, "eventq_queue_depth") == 1
    assert value(seen, "eventq_running_jobs", user="alice", team="alpha") == 1
    assert value(seen, "eventq_running_jobs", user="bob", team="beta") == 1
    assert value(seen, "eventq_gpus", node="local") == 4
    assert value(seen, "eventq_gpus_allocated", node="local") == 3
    assert value(seen, "eventq_gpus_free", node="local") == 1
    assert value(seen, "eventq_dispatch_latency_seconds_count") == 3
    assert value(seen, "eventq_submit_to_dispatch_seconds_count") == 3
    assert value(seen, "eventq_log_commits_total") == orch.log.commits
    assert value(seen, "eventq_log_commit_batch_events_count") == \
        orch.log.commits - commits_before > 0
    assert value(seen, "eventq_log_commit_batch_events_sum") == \
        orch.log.committed_events - committed_before

    (tmp_path / "a").touch()
    (tmp_path / "b").touch()
    await until(lambda: all(orch.state.jobs[j].status == "completed" for j in (a, b, waiting)))
    await orch.log.flush()
    after = await scrape(api)
    assert value(after, "eventq_events_appended_total") == orch.log.head_seq
    assert value(after, "eventq_jobs", status="completed") == 4
    assert value(after, "eventq_queue_depth") == 0
    assert not [k for k in after if k[0] == "eventq_running_jobs"], "nobody runs anything"
    assert value(after, "eventq_gpus_allocated", node="local") == 0
    assert value(after, "eventq_gpus_free", node="local") == 4
    assert value(after, "eventq_dispatch_latency_seconds_count") == 4
    waited = value(after, "eventq_submit_to_dispatch_seconds_sum")
    assert waited is not None and waited > 0


async def test_each_server_counts_only_its_own_work(
        make_orch: MakeOrch, aiohttp_client: AiohttpClient, tmp_path: Path) -> None:
    busy = await make_orch(limits=ROOMY, data_dir=tmp_path / "busy")
    idle = await make_orch(limits=ROOMY, data_dir=tmp_path / "idle")
    busy_api = await aiohttp_client(make_app(busy),
                                    headers={"Authorization": f"Bearer {busy.admin_token}"})
    idle_api = await aiohttp_client(make_app(idle),
                                    headers={"Authorization": f"Bearer {idle.admin_token}"})
    assert busy.admin_token is not None
    job = await submit(busy_api, busy.admin_token, command=["true"], gpus=1)
    await until(lambda: busy.state.jobs[job].status == "completed")

    assert value(await scrape(busy_api), "eventq_jobs", status="completed") == 1
    assert value(await scrape(busy_api), "eventq_dispatch_latency_seconds_count") == 1
    assert value(await scrape(idle_api), "eventq_jobs", status="completed") == 0
    assert value(await scrape(idle_api), "eventq_dispatch_latency_seconds_count") == 0
    assert not [m for m in REGISTRY.collect() if m.name.startswith("eventq_")]


async def test_metrics_need_a_token(orch: Orchestrator, aiohttp_client: AiohttpClient) -> None:
    anonymous = await aiohttp_client(make_app(orch))
    resp = await anonymous.get("/metrics")
    assert resp.status == 401 and "error" in await resp.json()
    viewer = orch.add_user("scraper", ev.Level.VIEWER)
    resp = await anonymous.get("/metrics", headers={"Authorization": f"Bearer {viewer}"})
    assert resp.status == 200
