"""Completion callbacks: a job's end POSTed to a real receiver on loopback, retried and
recorded; the ``--on-finish`` hook run as a real process. Neither can hold the queue."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import structlog
from aiohttp.test_utils import TestClient

from eventq import events as ev
from eventq import gpus, replay
from eventq.callbacks.notifier import CallbackSettings
from eventq.callbacks.owed import RetryPolicy, TryResult, decide_try
from eventq.callbacks.urls import shown, url_problem
from eventq.cli.why import story_of
from eventq.clock import SimClock
from eventq.http.app import make_app
from eventq.log import connect_readonly
from eventq.server import Orchestrator
from tests.conftest import kill_attempts
from tests.helpers import until
from tests.receiver import AiohttpServer, Receiver, receiving

AiohttpClient = Callable[..., Awaitable[TestClient[Any, Any]]]
Started = tuple[Orchestrator, TestClient[Any, Any]]
Start = Callable[..., Awaitable[Started]]


@pytest.fixture
async def receiver(aiohttp_server: AiohttpServer) -> AsyncIterator[Receiver]:
    async with receiving(aiohttp_server) as made:
        yield made


@pytest.fixture
async def start(tmp_path: Path, clock: SimClock,
                aiohttp_client: AiohttpClient) -> AsyncIterator[Start]:
    """``orch, api = await start(CallbackSettings(...))``: a real orchestrator and its API."""
    started: list[Started] = []

    async def go(callbacks: CallbackSettings | None = None) -> Started:
        orch = Orchestrator(tmp_path / "data", gpus.detect("2xA100-80GB"), clock,
                            grace_seconds=2.0, callbacks=callbacks or CallbackSettings())
        await orch.start()
        api = await aiohttp_client(make_app(orch),
                                   headers={"Authorization": f"Bearer {orch.admin_token}"})
        started.append((orch, api))
        return orch, api

    try:
        yield go
    finally:
        for orch, api in started:
            await api.close()
            kill_attempts(orch)
            await orch.stop()


async def submit(api: TestClient[Any, Any], **body: Any) -> str:
    resp = await api.post("/api/queue/submit", json={"gpus": 0, **body})
    reply = await resp.json()
    assert resp.status == 200, reply
    job_id: str = reply["job_id"]
    return job_id


async def recorded(orch: Orchestrator, *kinds: type[ev.Event]) -> list[Any]:
    await orch.log.flush()
    return [r.event for r in await orch.log.read() if isinstance(r.event, kinds)]


def ended(orch: Orchestrator, job_id: str) -> bool:
    return orch.state.jobs[job_id].status in ("completed", "failed", "cancelled")


# --- the POST --------------------------------------------------------------------------


async def test_a_job_that_ends_is_posted_once_with_its_facts_and_no_secrets(
        start: Start, receiver: Receiver, clock: SimClock) -> None:
    orch, api = await start()
    job_id = await submit(api, name="train", command=["sh", "-c", "sleep 0.2; exit 3"],
                          env={"HF_TOKEN": "hf_secretvalue0123456789"}, notify_url=receiver.url())
    submitted = clock.now()
    clock.advance(90)  # the attempt ends a minute and a half later
    await until(lambda: len(receiver.got) == 1, "the receiver got the job's end")
    [body] = receiver.got
    assert body == {
        "event": "job.ended", "notification_id": body["notification_id"], "try": 1,
        "target": "job", "job_id": job_id, "name": "train", "user": "admin", "team": None,
        "status": "failed", "exit_code": 3, "attempt": 1, "max_attempts": 3,
        "reason": "exit code 3", "node": "local",
        "submitted_at": "2023-11-14T22:13:20.000+00:00", "submitted_at_epoch": submitted,
        "started_at": "2023-11-14T22:13:20.000+00:00", "started_at_epoch": submitted,
        "ended_at": "2023-11-14T22:14:50.000+00:00", "ended_at_epoch": submitted + 90}
    assert "hf_secret" not in str(receiver.headers) + str(body)
    assert receiver.headers[0]["Idempotency-Key"] == body["notification_id"]
    assert receiver.headers[0]["Content-Type"] == "application/json"
    await until(lambda: not orch.notifications.owed, "the delivery is recorded")
    [delivered] = await recorded(orch, ev.NotificationDelivered)
    assert (delivered.job_id, delivered.target, delivered.tries, delivered.status) == \
        (job_id, "job", 1, 200)
    assert body["notification_id"] == f"{job_id}.{delivered.ending}.job"


async def test_the_servers_url_hears_of_every_end_and_a_jobs_own_url_too(
        start: Start, receiver: Receiver) -> None:
    orch, api = await start(CallbackSettings(notify_url=receiver.url("/all")))
    assert await recorded(orch, ev.ServerNotifyUrlSet) == [
        ev.ServerNotifyUrlSet(url=receiver.url("/all"))]
    done = await submit(api, command=["true"], notify_url=receiver.url("/mine"))
    parked = await submit(api, command=["true"], requires_approval=True)
    assert (await api.post(f"/api/queue/{parked}/cancel")).status == 200
    await until(lambda: len(receiver.got) == 3, "three notifications")
    got = sorted((b["job_id"], b["target"], b["status"], b["reason"]) for b in receiver.got)
    assert got == sorted([(done, "job", "completed", None), (done, "server", "completed", None),
                          (parked, "server", "cancelled", "cancelled by admin")])


async def test_a_running_job_cancelled_is_notified_once_its_process_is_gone(
        start: Start, receiver: Receiver, tmp_path: Path) -> None:
    _, api = await start()
    pid_file = tmp_path / "pid"
    job_id = await submit(api, notify_url=receiver.url(),
                          command=["sh", "-c", f"echo $$ > {pid_file}; exec sleep 60"])
    await until(lambda: pid_file.exists() and pid_file.read_text().strip() != "", "it runs")
    assert (await api.post(f"/api/queue/{job_id}/cancel")).status == 200
    await until(lambda: len(receiver.got) == 1, "the cancel is notified")
    assert not runs(int(pid_file.read_text()))
    body = receiver.got[0]
    assert (body["status"], body["exit_code"], body["reason"]) == \
        ("cancelled", 128 + signal.SIGTERM, "cancelled by admin")


# --- retries ---------------------------------------------------------------------------


async def test_a_receiver_that_fails_twice_gets_it_on_the_third_try(
        start: Start, receiver: Receiver, clock: SimClock) -> None:
    orch, api = await start()
    receiver.answers = [503, 500]
    job_id = await submit(api, command=["true"], notify_url=receiver.url())
    key = await owed_key(orch)
    for tries, wait in ((1, 15), (2, 45)):
        await until(lambda n=tries: tries_of(orch, key) == n,  # type: ignore[misc]
                    f"try {tries} failed and is recorded")
        clock.advance(wait - 1)
        await asyncio.sleep(0.05)
        assert len(receiver.got) == tries  # not before its time
        clock.advance(1)
    await until(lambda: key not in orch.notifications.owed, "delivered on the third try")
    assert [b["try"] for b in receiver.got] == [1, 2, 3]
    assert len({b["notification_id"] for b in receiver.got}) == 1
    failed = await recorded(orch, ev.NotificationFailed)
    assert [(f.tries, f.status, f.error) for f in failed] == [
        (1, 503, "HTTP 503 Service Unavailable"), (2, 500, "HTTP 500 Internal Server Error")]
    [delivered] = await recorded(orch, ev.NotificationDelivered)
    assert delivered.tries == 3
    story = story_of(job_id, replay.job_history(connect_readonly(orch.log.path), job_id))
    assert story is not None
    told = [(s.state, s.detail) for s in story.steps if "notif" in s.state]
    assert told == [
        ("notify failed", "the job's --notify URL, try 1: HTTP 503 Service Unavailable; "
                          "next try 15 s later"),
        ("notify failed", "the job's --notify URL, try 2: HTTP 500 Internal Server Error; "
                          "next try 45 s later"),
        ("notified", "the job's --notify URL took it (HTTP 200) on try 3")]


async def test_an_unreachable_url_is_tried_five_times_over_ten_minutes_then_given_up(
        start: Start, clock: SimClock, unused_tcp_port: int) -> None:
    """A restart between two tries goes on from the log: the same tries, the same times."""
    orch, api = await start()
    await submit(api, command=["true"], notify_url=f"http://127.0.0.1:{unused_tcp_port}/x")
    key = await owed_key(orch)
    ended_at = orch.notifications.owed[key].ending.ended_at
    for tries in range(1, 5):
        await until(lambda n=tries, o=orch: tries_of(o, key) == n,  # type: ignore[misc]
                    f"try {tries} failed and is recorded")
        if tries == 2:
            owed = dict(orch.notifications.owed)
            await api.close()
            await orch.stop()
            orch, api = await start()
            assert orch.notifications.owed == owed
        clock.advance(RetryPolicy().delay_after(tries))
    await until(lambda: key not in orch.notifications.owed, "given up after the fifth try")
    failed = await recorded(orch, ev.NotificationFailed)
    assert [f.tries for f in failed] == [1, 2, 3, 4, 5]
    assert [None if f.retry_at is None else f.retry_at - ended_at for f in failed] == \
        [15, 60, 195, 600, None]
    assert all(f"127.0.0.1:{unused_tcp_port}" in f.error and f.status is None for f in failed)


async def owed_key(orch: Orchestrator) -> Any:
    await until(lambda: len(orch.notifications.owed) == 1, "a notification is owed")
    return next(iter(orch.notifications.owed))


def tries_of(orch: Orchestrator, key: Any) -> int | None:
    owed = orch.notifications.owed.get(key)
    return None if owed is None else owed.tries


def test_each_try_decides_the_next_or_gives_up() -> None:
    policy = RetryPolicy()
    assert [policy.delay_after(n) for n in (1, 2, 3, 4)] == [15, 45, 135, 405]
    assert sum(policy.delay_after(n) for n in range(1, policy.tries)) == 600
    owed = _owed(tries=4)
    last = decide_try(("j", 9, "job"), owed, TryResult(None, "refused"), 100.0, policy)
    assert last == ev.NotificationFailed(job_id="j", ending=9, target="job", tries=5,
                                         error="refused", retry_at=None)
    kept = decide_try(("j", 9, "job"), owed, TryResult(204), 100.0, policy)
    assert kept == ev.NotificationDelivered(job_id="j", ending=9, target="job", tries=5,
                                            status=204)
    redirected = decide_try(("j", 9, "job"), _owed(0), TryResult(302, "HTTP 302 Found"), 100.0,
                            policy)
    assert isinstance(redirected, ev.NotificationFailed) and redirected.retry_at == 115.0


def _owed(tries: int) -> Any:
    from eventq.callbacks.owed import Ending, Owed

    ending = Ending(job_id="j", ending=9, name="n", user="u", team=None, status="completed",
                    attempt=1, max_attempts=3, exit_code=0, reason=None, node="local",
                    submitted_at=1.0, started_at=2.0, ended_at=3.0)
    return Owed(ending, "job", "http://h/x", tries=tries)


# --- nothing holds the queue -------------------------------------------------------------


async def test_a_receiver_that_never_answers_and_a_hook_that_hangs_hold_no_job_back(
        start: Start, receiver: Receiver) -> None:
    """One job runs at a time here (the local node's limit): each next job starts only
    after the one before has ended, while every earlier notification is still unanswered
    and every earlier hook still runs."""
    receiver.hanging = True
    orch, api = await start(CallbackSettings(on_finish="sleep 60", post_timeout=300))
    jobs = [await submit(api, command=["true"], notify_url=receiver.url()) for _ in range(6)]
    await until(lambda: all(ended(orch, j) for j in jobs), "every job ran and ended")
    assert [orch.state.jobs[j].status for j in jobs] == ["completed"] * 6
    await until(lambda: len(receiver.got) >= 4, "the receiver holds the tries it got")
    assert await recorded(orch, ev.NotificationDelivered, ev.NotificationFailed,
                          ev.HookRan) == []
    assert orch.notifier.hooks is not None and len(orch.notifier.hooks.tasks) == 6
    assert len(orch.notifier.deliveries) == 6


# --- the --on-finish hook ----------------------------------------------------------------


async def test_the_hook_gets_the_jobs_facts_and_none_of_its_environment(
        start: Start, tmp_path: Path) -> None:
    seen = tmp_path / "seen"
    orch, api = await start(CallbackSettings(on_finish=f"env > {seen}/$EVENTQ_JOB_ID"))
    seen.mkdir()
    job_id = await submit(api, name="eval", command=["sh", "-c", "exit 4"],
                          env={"WANDB_API_KEY": "wandb-secret-value"})
    [ran] = await wait_recorded(orch, ev.HookRan)
    assert (ran.job_id, ran.outcome, ran.exit_code) == (job_id, "exited", 0)
    env = dict(line.split("=", 1) for line in (seen / job_id).read_text().splitlines()
               if "=" in line)
    assert {k: env[k] for k in ("EVENTQ_JOB_ID", "EVENTQ_JOB_NAME", "EVENTQ_USER",
                                "EVENTQ_STATUS", "EVENTQ_EXIT_CODE", "EVENTQ_ATTEMPT",
                                "EVENTQ_REASON")} == {
        "EVENTQ_JOB_ID": job_id, "EVENTQ_JOB_NAME": "eval", "EVENTQ_USER": "admin",
        "EVENTQ_STATUS": "failed", "EVENTQ_EXIT_CODE": "4", "EVENTQ_ATTEMPT": "1",
        "EVENTQ_REASON": "exit code 4"}
    assert env["EVENTQ_ENDED_AT"].endswith("+00:00")
    assert "WANDB_API_KEY" not in env and "wandb-secret-value" not in (seen / job_id).read_text()


async def test_a_failing_hook_is_logged_and_recorded(start: Start) -> None:
    orch, api = await start(CallbackSettings(on_finish="echo cannot reach slack >&2; exit 7"))
    with structlog.testing.capture_logs() as logs:
        job_id = await submit(api, command=["true"])
        [ran] = await wait_recorded(orch, ev.HookRan)
    assert (ran.job_id, ran.outcome, ran.exit_code, ran.detail) == \
        (job_id, "exited", 7, "exit code 7")
    [line] = [entry for entry in logs if entry["event"] == "hook_failed"]
    assert (line["job_id"], line["exit_code"], line["output"]) == \
        (job_id, 7, "cannot reach slack")


async def test_a_hook_past_its_timeout_is_stopped_with_what_it_started(
        start: Start, tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    hook = f"sleep 60 & echo $! > {pids}; echo $$ >> {pids}; wait"
    orch, api = await start(CallbackSettings(on_finish=hook, on_finish_timeout=0.5))
    await submit(api, command=["true"])
    [ran] = await wait_recorded(orch, ev.HookRan)
    assert (ran.outcome, ran.detail) == ("timeout", "still running after 0.5 s: stopped")
    assert not any(runs(int(pid)) for pid in pids.read_text().split())


def runs(pid: int) -> bool:
    """Is ``pid`` a live process (not gone, not a zombie an init has yet to reap)?"""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[-1].split()[0] != b"Z"
    except FileNotFoundError:
        return False


async def wait_recorded(orch: Orchestrator, kind: type[ev.Event], count: int = 1) -> list[Any]:
    for _ in range(1000):
        found = await recorded(orch, kind)
        if len(found) >= count:
            return found
        await asyncio.sleep(0.01)
    raise AssertionError(f"never recorded: {count} {kind.__name__}")


# --- what a submission may name ----------------------------------------------------------


@pytest.mark.parametrize(("url", "why"), [
    ("ftp://example.com/x", "must be an http:// or https:// URL (not ftp)"),
    ("example.com/hook", "must be an http:// or https:// URL (not relative)"),
    ("http:///hook", "names no host"),
    ("http://example.com:99999/", "is not a URL (Port out of range 0-65535)"),
    ("http://exa mple.com/", "must not contain spaces or control characters"),
])
async def test_a_url_that_cannot_be_notified_is_refused_and_nothing_recorded(
        start: Start, url: str, why: str) -> None:
    orch, api = await start()
    seq = orch.log.head_seq
    resp = await api.post("/api/queue/submit", json={"command": ["true"], "notify_url": url})
    assert resp.status == 422
    assert await resp.json() == {"error": f"notify_url {why}", "field": "notify_url"}
    batch = await api.post("/api/queue/batch", json={"jobs": [
        {"command": ["true"]}, {"command": ["true"], "notify_url": url}]})
    assert batch.status == 422
    assert (await batch.json())["detail"] == [f"row 2: notify_url {why}"]
    assert orch.log.head_seq == seq and orch.state.jobs == {}


async def test_a_url_past_its_bound_is_refused_naming_the_field(start: Start) -> None:
    orch, api = await start()
    resp = await api.post("/api/queue/submit", json={
        "command": ["true"], "notify_url": "https://example.com/" + "a" * 2048})
    assert resp.status == 422
    body = await resp.json()
    assert body["field"] == "notify_url" and "2048" in body["error"]
    assert orch.state.jobs == {}


def test_a_url_is_shown_by_its_origin_only() -> None:
    assert shown("https://hooks.slack.com/services/T0/B0/XyZsecret") == \
        "https://hooks.slack.com/<redacted>"
    assert shown("http://user:pw@127.0.0.1:8080/") == "http://127.0.0.1:8080/<redacted>"
    assert shown("https://example.com") == "https://example.com"
    assert url_problem("https://example.com/hook?x=1") is None


async def test_a_batch_and_an_import_name_a_url_for_each_job(
        start: Start, receiver: Receiver) -> None:
    orch, api = await start()
    batch = await api.post("/api/queue/batch", json={"jobs": [
        {"command": ["true"], "gpus": 0, "notify_url": receiver.url("/batch")},
        {"command": ["true"], "gpus": 0}]})
    assert batch.status == 200, await batch.text()
    imported = await api.post("/api/queue/import", json={
        "csv": "task\na\nb\n", "command": ["true"], "gpus": 0,
        "notify_url": receiver.url("/import")})
    assert imported.status == 200, await imported.text()
    await until(lambda: len(receiver.got) == 3, "three ends notified")
    assert sorted(receiver.paths) == ["/batch", "/import", "/import"]
    ids = (await batch.json())["job_ids"] + (await imported.json())["job_ids"]
    assert [orch.state.jobs[j].spec.notify_url for j in ids] == [
        receiver.url("/batch"), None, receiver.url("/import"), receiver.url("/import")]


async def test_an_end_durable_only_as_the_server_stops_is_sent_after_the_next_start(
        start: Start, receiver: Receiver, tmp_path: Path) -> None:
    """The stopping server sends nothing and starts no hook once it began to stop: the
    end is owed in the log, and the next start sends it."""
    hooked = tmp_path / "hooked"
    orch, api = await start(CallbackSettings(on_finish=f"touch {hooked}"))
    job_id = await submit(api, command=["true"], requires_approval=True,
                          notify_url=receiver.url())
    await api.close()
    orch.log.append("user:admin", [ev.JobCancelled(job_id=job_id)])  # as a cancel decides
    await orch.stop()  # the cancel becomes durable as the log closes
    assert receiver.got == [] and orch.notifier.deliveries == {}
    assert not hooked.exists()
    orch, _ = await start()
    await until(lambda: len(receiver.got) == 1, "sent after the restart")
    assert (receiver.got[0]["job_id"], receiver.got[0]["status"]) == (job_id, "cancelled")
