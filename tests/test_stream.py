"""The live event stream, as a dashboard reads it: raw SSE from a real server on loopback."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp.test_utils import TestClient

from eventq import events as ev
from eventq.actors.registry import RevokeTokens
from eventq.auth import token_hash
from eventq.http import stream
from eventq.http.app import make_app
from eventq.server import Orchestrator
from tests.helpers import until

AiohttpClient = Callable[..., Awaitable[TestClient[Any, Any]]]
MakeOrch = Callable[..., Awaitable[Orchestrator]]
#: A bound on every wait for the server, never a measure of speed.
PATIENCE = 60


@dataclass
class Frame:
    """One server-sent event as it came over the wire."""

    event: str
    data: Any
    id: str | None
    raw: str


async def next_frame(resp: aiohttp.ClientResponse) -> Frame | None:
    """The next event of an SSE response (comments skipped); None once the stream ends."""
    fields: dict[str, str] = {}
    lines: list[str] = []
    async with asyncio.timeout(PATIENCE):
        while True:
            line = (await resp.content.readline()).decode()
            if not line:
                return None
            line = line.rstrip("\n")
            if not line:
                if fields:
                    return Frame(fields.get("event", "message"), json.loads(fields["data"]),
                                 fields.get("id"), "\n".join(lines))
                continue
            if not line.startswith(":"):
                name, _, value = line.partition(": ")
                fields[name] = value
                lines.append(line)


async def frames_until(resp: aiohttp.ClientResponse, done: Callable[[Frame], bool]) -> list[Frame]:
    got: list[Frame] = []
    while True:
        frame = await next_frame(resp)
        assert frame is not None, f"the stream ended after {[f.event for f in got]}"
        got.append(frame)
        if done(frame):
            return got


def bearer(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def submit(api: TestClient[Any, Any], token: str | None = None,
                 **body: Any) -> dict[str, Any]:
    resp = await api.post("/api/queue/submit", json=body,
                          headers=bearer(token) if token else None)
    reply: dict[str, Any] = await resp.json()
    assert resp.status == 200, reply
    return reply




async def logged_past(orch: Orchestrator, seq: int) -> None:
    await until(lambda: orch.log.head_seq > seq, "the log moved on", seconds=30)


def at_or_past(seq: int) -> Callable[[Frame], bool]:
    return lambda f: int(f.id or 0) >= seq


def parked(**extra: Any) -> dict[str, Any]:
    """A job that waits for an admin's approval: it makes events but never a process."""
    return {"command": ["true"], "gpus": 0, "requires_approval": True, **extra}


async def test_a_dashboard_that_reconnects_with_last_event_id_misses_nothing_and_repeats_nothing(
        api: TestClient[Any, Any], orch: Orchestrator) -> None:
    for _ in range(3):
        await submit(api, **parked())
    first = await api.get("/api/events/stream?after=0")
    assert first.headers["Content-Type"] == "text/event-stream"
    seen = [f for _ in range(4) if (f := await next_frame(first)) is not None]
    first.close()  # gone mid-stream: the history holds more than four events

    for _ in range(3):  # while it is away
        await submit(api, **parked())

    working = True

    async def colleague() -> None:
        for _ in range(1000):
            if not working:
                return
            await submit(api, **parked())

    busy = asyncio.gather(*(colleague() for _ in range(8)))
    for _ in range(6):  # away long enough to miss more than a page, back while others submit
        await logged_past(orch, int(seen[-1].id or 0) + 2 * stream.CATCH_UP_PAGE)
        again = await api.get("/api/events/stream", headers={"Last-Event-ID": seen[-1].id or ""})
        # past what was logged when it came back: these come live
        seen += await frames_until(again, at_or_past(orch.log.head_seq + 4))
        again.close()
    working = False
    await busy
    await orch.log.flush()
    head = orch.log.head_seq
    last = await api.get("/api/events/stream", headers={"Last-Event-ID": seen[-1].id or ""})
    seen += await frames_until(last, lambda f: f.id == str(head))

    logged = await orch.log.read()
    assert [f.id for f in seen] == [str(r.seq) for r in logged] == [str(s)
                                                                 for s in range(1, head + 1)]
    assert [f.event for f in seen] == [r.type for r in logged]
    assert all(f.data["seq"] == int(f.id or 0) and f.data["type"] == f.event for f in seen)


def tiny_receive_buffer(addr_info: Any) -> socket.socket:
    """A client socket that holds almost nothing the server sends and the app does not read."""
    family, type_, proto, _, _ = addr_info
    sock = socket.socket(family, type_, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    return sock


async def test_a_subscriber_that_stops_reading_is_dropped_and_the_others_get_everything(
        orch: Orchestrator, aiohttp_client: AiohttpClient) -> None:
    app = make_app(orch)
    app[stream.QUEUE_COMMITS] = 8
    api = await aiohttp_client(app, headers=bearer(orch.admin_token))
    fast = await api.get("/api/events/stream")
    fast_frames: list[Frame] = []

    async def watch() -> None:
        while (frame := await next_frame(fast)) is not None:
            fast_frames.append(frame)

    watcher = asyncio.create_task(watch())
    async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(socket_factory=tiny_receive_buffer),
            headers=bearer(orch.admin_token)) as session:
        slow = await session.get(api.make_url("/api/events/stream"))
        listening = len(orch.log.durable_subscribers)
        fat = {"notes": "x" * 32_000}
        for _ in range(400):  # until the slow one's buffers are full and it falls behind
            await submit(api, **parked(metadata=fat))
            if len(orch.log.durable_subscribers) < listening:
                break
        await orch.log.flush()
        head = orch.log.head_seq

        slow_frames: list[Frame] = []
        while (frame := await next_frame(slow)) is not None:
            slow_frames.append(frame)
        *events, last = slow_frames
        assert last.event == "dropped" and "behind" in last.data["reason"]
        assert last.data["last_seq"] == int(events[-1].id or 0) < head
        ids = [int(f.id or 0) for f in events]
        assert ids == list(range(ids[0], ids[-1] + 1)), "in order, none missing, none twice"

    await until(lambda: bool(fast_frames) and fast_frames[-1].id == str(head),
                "the fast subscriber saw the head", seconds=30)
    watcher.cancel()
    ids = [int(f.id or 0) for f in fast_frames]
    assert ids == list(range(ids[0], head + 1)) and ids[0] <= int(events[0].id or 0)
    assert "dropped" not in {f.event for f in fast_frames}


async def test_a_researcher_sees_only_their_own_jobs_and_nobody_sees_env(
        api: TestClient[Any, Any], orch: Orchestrator) -> None:
    alice = orch.add_user("alice", ev.Level.RESEARCHER)
    bob = orch.add_user("bob", ev.Level.RESEARCHER)
    hers = await api.get("/api/events/stream", headers=bearer(alice))
    everyone = await api.get("/api/events/stream")
    mine = await submit(api, alice, command=["true"], gpus=0,
                        env={"WANDB_API_KEY": "sekrit-alice"})
    theirs = await submit(api, bob, command=["true"], gpus=0, env={"HF_TOKEN": "sekrit-bob"})
    await until(lambda: all(orch.state.jobs[j["job_id"]].status == "completed"
                            for j in (mine, theirs)), "both jobs completed", seconds=30)
    await api.post("/api/queue/concurrency", json={"max_concurrent": 7})  # a job-less event

    def limits(f: Frame) -> bool:
        return f.event == "limits_changed"
    alice_saw = await frames_until(hers, limits)
    admin_saw = await frames_until(everyone, limits)

    def job_ids(frames: list[Frame]) -> set[str]:
        bodies = [f.data["body"] for f in frames]
        return {b.get("job_id") or b.get("job", {}).get("job_id") for b in bodies} - {None}

    assert job_ids(alice_saw) == {mine["job_id"]}
    assert job_ids(admin_saw) == {mine["job_id"], theirs["job_id"]}
    assert {"job_submitted", "attempt_started", "attempt_ended", "job_completed"} <= {
        f.event for f in alice_saw}
    submitted = [f for f in admin_saw if f.event == "job_submitted"]
    assert len(submitted) == 2 and all("env" not in f.data["body"]["job"] for f in submitted)
    assert not any("sekrit" in f.raw for f in alice_saw + admin_saw)


async def test_open_streams_end_cleanly_when_the_server_shuts_down(
        api: TestClient[Any, Any], orch: Orchestrator) -> None:
    async with aiohttp.ClientSession(headers=bearer(orch.admin_token)) as session:
        watching = await session.get(api.make_url("/api/events/stream?after=0"))
        await orch.log.flush()
        head = str(orch.log.head_seq)
        await frames_until(watching, lambda f: f.id == head)
        await api.server.close()
        assert await next_frame(watching) is None  # a cut-off chunked body would raise here


async def test_a_bad_resume_point_is_refused(api: TestClient[Any, Any]) -> None:
    for query, headers, field in (("?after=-1", {}, "after"), ("?after=x", {}, "after"),
                                  ("", {"Last-Event-ID": "seven"}, "Last-Event-ID"),
                                  ("?after=-1", {"Last-Event-ID": "3"}, "after"),
                                  ("?after=3", {"Last-Event-ID": "seven"}, "Last-Event-ID")):
        resp = await api.get(f"/api/events/stream{query}", headers=headers)
        assert resp.status == 422 and (await resp.json())["field"] == field


async def test_a_stream_opened_with_a_token_closes_when_the_token_is_revoked(
        api: TestClient[Any, Any], orch: Orchestrator) -> None:
    """SPEC 8: REST answers 401 at once, and the open stream ends with a last event saying
    why, delivering nothing after the revocation."""
    alice = orch.add_user("alice", ev.Level.RESEARCHER)
    hers = await api.get("/api/events/stream", headers=bearer(alice))
    mine = await submit(api, alice, **parked())
    await frames_until(hers, lambda f: f.event == "job_blocked")
    revoked = await api.delete("/api/admin/users/alice/tokens")
    assert revoked.status == 200
    assert (await api.get("/api/queue/me", headers=bearer(alice))).status == 401
    await api.post("/api/queue/concurrency", json={"max_concurrent": 7})  # shown to everyone
    await api.post(f"/api/queue/{mine['job_id']}/approve")  # her own job moves on
    after = await frames_until(hers, lambda f: f.event in ("revoked", "limits_changed"))
    assert [f.event for f in after] == ["revoked"], "nothing after the revocation but why"
    assert await next_frame(hers) is None
    assert "revoked" in after[0].data["reason"]
    assert int(after[0].data["last_seq"]) < orch.log.head_seq


async def test_only_the_revoked_tokens_stream_ends_and_a_demotion_narrows_the_view(
        api: TestClient[Any, Any], orch: Orchestrator) -> None:
    """Revoking one token ends only the streams opened with it; a demoted admin's stream
    stays open and shows from then on only what the new level may see."""
    first = orch.add_user("carol", ev.Level.ADMIN)
    second = (await (await api.post("/api/admin/users/carol/tokens")).json())["token"]
    ended = await api.get("/api/events/stream", headers=bearer(first))
    kept = await api.get("/api/events/stream", headers=bearer(second))
    outcome, _ = await orch.registry.ask(RevokeTokens("user:admin", "carol", token_hash(first)))
    await outcome.durable
    await api.post("/api/queue/concurrency", json={"max_concurrent": 6})
    last = await frames_until(ended, lambda f: f.event in ("revoked", "limits_changed"))
    assert [f.event for f in last] == ["revoked"] and await next_frame(ended) is None

    demoted = await api.patch("/api/admin/users/carol", json={"level": "researcher"})
    assert demoted.status == 200
    others = await submit(api, **parked())  # the admin's job: no longer carol's to see
    await api.post("/api/queue/concurrency", json={"max_concurrent": 7})
    seen = await frames_until(kept, lambda f: f.event == "limits_changed"
                              and f.data["body"]["limits"]["max_concurrent"] == 7)
    assert "user_updated" in {f.event for f in seen}
    assert others["job_id"] not in {f.data["body"].get("job_id") for f in seen}
    assert "job_submitted" not in {f.event for f in seen}
