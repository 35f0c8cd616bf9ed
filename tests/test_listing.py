"""``GET /api/jobs``: the web page's jobs table, paged by keyset, against a real server.

Every page continues after the last row of the one before, so walking the pages gives each
matching job exactly once, in the order asked, even while jobs arrive meanwhile.
"""

from __future__ import annotations

from typing import Any

from aiohttp.test_utils import TestClient

from eventq import events as ev
from eventq.server import Orchestrator

Api = TestClient[Any, Any]


async def submit_many(api: Api, names: list[str], **more: Any) -> list[str]:
    jobs = [{"command": ["true"], "name": n, "target": "worker", **more} for n in names]
    resp = await api.post("/api/queue/batch", json={"jobs": jobs})
    assert resp.status == 200, await resp.text()
    ids: list[str] = (await resp.json())["job_ids"]
    return ids


async def walk(api: Api, query: str, limit: int,
               after: str | None = None) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    while True:
        resp = await api.get(f"/api/jobs?{query}&limit={limit}" + (f"&after={after}" if after
                                                                   else ""))
        assert resp.status == 200, await resp.text()
        page = await resp.json()
        rows += page["jobs"]
        after = page["next"]
        if after is None:
            return rows


async def test_pages_give_every_job_once_newest_first(api: Api) -> None:
    ids = await submit_many(api, [f"job-{i:02d}" for i in range(23)])
    rows = await walk(api, "sort=submitted", 5)
    assert [r["job_id"] for r in rows] == ids[::-1]
    first = await (await api.get("/api/jobs?limit=5")).json()
    assert first["total"] == 23 and len(first["jobs"]) == 5


async def test_each_sort_goes_both_ways_with_ties_by_id(api: Api) -> None:
    for i in range(13):  # names repeat: the sort by name has ties
        resp = await api.post("/api/queue/submit", json={
            "command": ["true"], "name": f"n{i % 4}", "target": "worker", "gpus": i % 3})
        assert resp.status == 200, await resp.text()
    for sort in ("name", "user", "status", "priority", "gpus", "submitted"):
        up = await walk(api, f"sort={sort}&order=asc", 4)
        down = await walk(api, f"sort={sort}&order=desc", 3)
        assert [r["job_id"] for r in up] == [r["job_id"] for r in down][::-1], sort
        assert len({r["job_id"] for r in up}) == 13
    by_name = await walk(api, "sort=name&order=asc", 4)
    assert [r["name"] for r in by_name] == sorted(r["name"] for r in by_name)


async def test_a_job_that_arrives_while_paging_neither_repeats_nor_skips_a_row(
        api: Api) -> None:
    ids = await submit_many(api, [f"job-{i}" for i in range(10)])
    first = await (await api.get("/api/jobs?sort=submitted&order=asc&limit=4")).json()
    await submit_many(api, ["late"])
    rest = await walk(api, "sort=submitted&order=asc", 4, after=first["next"])
    seen = [r["job_id"] for r in first["jobs"] + rest]
    assert seen[:10] == ids and len(seen) == 11 and seen[-1] not in ids


async def test_filters_by_status_user_name_and_node(api: Api, orch: Orchestrator) -> None:
    await submit_many(api, ["Train-A", "train-b", "eval"])
    resp = await api.post("/api/queue/submit", json={
        "command": ["true"], "name": "gate", "target": "worker", "requires_approval": True})
    assert (await resp.json())["status"] == "blocked"
    names = {r["name"] for r in await walk(api, "name=TRAIN", 10)}
    assert names == {"Train-A", "train-b"}
    blocked = await walk(api, "status=blocked", 10)
    assert [r["name"] for r in blocked] == ["gate"]
    assert len(await walk(api, "user=admin", 10)) == 4
    assert await walk(api, "user=nobody", 10) == []
    assert await walk(api, "node=local", 10) == []


async def test_rows_by_id_are_those_jobs_as_they_are_now(api: Api) -> None:
    ids = await submit_many(api, ["a", "b", "c"])
    resp = await api.get(f"/api/jobs?ids={ids[2]},{ids[0]},000000000000")
    page = await resp.json()
    assert [r["job_id"] for r in page["jobs"]] == [ids[2], ids[0]]
    assert page["jobs"][0]["status"] == "pending" and "position" in page["jobs"][0]


async def test_bad_parameters_are_refused_naming_them(api: Api) -> None:
    await submit_many(api, ["x"])
    name_cursor = (await (await api.get("/api/jobs?sort=name&limit=1")).json())["next"]
    assert name_cursor is None
    await submit_many(api, ["y"])
    name_cursor = (await (await api.get("/api/jobs?sort=name&limit=1")).json())["next"]
    for query, field in (("sort=size", "sort"), ("order=up", "order"), ("after=%%%", "after"),
                         ("after=bm90IGpzb24", "after"), ("status=done", "status"),
                         ("limit=0", "limit"), (f"sort=priority&after={name_cursor}", "after"),
                         ("ids=" + ",".join(["a"] * 41), "ids"), ("name=" + "n" * 201, "name")):
        resp = await api.get(f"/api/jobs?{query}")
        assert resp.status == 422, (query, await resp.text())
        assert (await resp.json())["field"] == field, query


async def test_a_viewer_lists_jobs_but_an_anonymous_caller_does_not(
        api: Api, orch: Orchestrator, aiohttp_client: Any) -> None:
    from eventq.http.app import make_app

    await submit_many(api, ["seen"])
    resp = await api.post("/api/admin/users", json={"name": "vic", "level": ev.Level.VIEWER})
    token = (await resp.json())["token"]
    viewer = await aiohttp_client(make_app(orch), headers={"Authorization": f"Bearer {token}"})
    rows = (await (await viewer.get("/api/jobs")).json())["jobs"]
    assert [r["name"] for r in rows] == ["seen"]
    nobody = await aiohttp_client(make_app(orch))
    assert (await nobody.get("/api/jobs")).status == 401
