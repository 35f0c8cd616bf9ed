"""A notification the log owes survives the server: a real ``eventq server`` is killed with
SIGKILL between a job's end and its delivery, or started on the log such a kill leaves, and
the receiver (a real aiohttp server on loopback) gets the end once it is back, never again
once the log holds it delivered."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from eventq import events as ev
from eventq import gpus
from eventq.log import EventLog, connect_readonly, iter_verified
from tests import serverproc
from tests.helpers import until
from tests.receiver import AiohttpServer, Receiver, receiving

pytestmark = pytest.mark.slow

JOB = "a1b2c3d4e5f6"


@dataclass
class Servers:
    """Real server processes on one data directory, each ended after the test."""

    data_dir: Path
    stderr: Path
    procs: list[subprocess.Popen[str]] = field(default_factory=list)
    url: str = ""
    token: str = ""

    async def start(self, *flags: str) -> subprocess.Popen[str]:
        info = self.data_dir / "server.json"
        info.unlink(missing_ok=True)  # a killed server leaves its own behind
        proc = serverproc.spawn(self.data_dir, self.stderr, *flags)
        self.procs.append(proc)

        def up() -> bool:
            assert proc.poll() is None, self.stderr.read_text()
            with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
                return bool(json.loads(info.read_text())["pid"] == proc.pid)
            return False

        await until(up, "the server to start", seconds=30)
        found = json.loads(info.read_text())
        self.url, self.token = found["url"], (self.data_dir / "admin.token").read_text().strip()
        return proc

    async def submit(self, **body: Any) -> str:
        async with aiohttp.ClientSession() as session, session.post(
                f"{self.url}/api/queue/submit", json={"gpus": 0, **body},
                headers={"Authorization": f"Bearer {self.token}"}) as resp:
            reply = await resp.json()
            assert resp.status == 200, reply
            job_id: str = reply["job_id"]
            return job_id

    def recorded(self, kind: type[ev.Event]) -> list[Any]:
        conn = connect_readonly(self.data_dir / "events.db")
        try:
            return [r.event for r in iter_verified(conn) if isinstance(r.event, kind)]
        finally:
            conn.close()

    async def until_recorded(self, kind: type[ev.Event], count: int = 1) -> list[Any]:
        for _ in range(1500):
            found = self.recorded(kind)
            if len(found) >= count:
                return found
            await asyncio.sleep(0.02)
        raise AssertionError(f"never recorded: {count} {kind.__name__}")


@pytest.fixture
async def receiver(aiohttp_server: AiohttpServer) -> AsyncIterator[Receiver]:
    async with receiving(aiohttp_server) as made:
        yield made


@pytest.fixture
async def servers(tmp_path: Path) -> AsyncIterator[Servers]:
    made = Servers(tmp_path / "data", tmp_path / "server.log")
    try:
        yield made
    finally:
        for proc in made.procs:
            await asyncio.to_thread(serverproc.end, proc)


async def leave_log(data_dir: Path, events: list[ev.Event]) -> None:
    """The log as a kill left it: these events durable, nothing after them."""
    data_dir.mkdir(parents=True)
    log = await EventLog.open(data_dir / "events.db", time.time)
    log.start()
    inventory = gpus.detect("2xA100-80GB")
    log.append("system", [ev.NodeInventoryReported(node="local", gpus=inventory.gpus,
                                                   simulated=True), *events])
    await log.flush()
    await log.close()


def ended_job(url: str) -> list[ev.Event]:
    spec = ev.JobSpec(job_id=JOB, user="admin", priority=30, name="left", gpus=1,
                      command=["true"], notify_url=url)
    return [ev.JobSubmitted(job=spec),
            ev.GpusAllocated(job_id=JOB, attempt=1, node="local", gpus=[0]),
            ev.AttemptDispatched(job_id=JOB, attempt=1, node="local", gpus=[0]),
            ev.AttemptStarted(job_id=JOB, attempt=1, pid=999_999),
            ev.AttemptEnded(job_id=JOB, attempt=1, outcome="exited", exit_code=0),
            ev.GpusReleased(job_id=JOB, attempt=1, node="local", gpus=[0], reason="ended"),
            ev.JobCompleted(job_id=JOB)]


@pytest.mark.parametrize("left", ["owed", "delivered"])
async def test_the_log_a_kill_left_is_notified_after_the_restart_exactly_as_it_owes(
        servers: Servers, receiver: Receiver, left: str) -> None:
    events = ended_job(receiver.url())
    if left == "delivered":  # seq 8 is the JobCompleted above, after the inventory
        events.append(ev.NotificationDelivered(job_id=JOB, ending=8, target="job", tries=1,
                                               status=200))
    await leave_log(servers.data_dir, events)
    await servers.start()
    later = await servers.submit(command=["true"], notify_url=receiver.url())
    await until(lambda: any(b["job_id"] == later for b in receiver.got), "the later job's end",
                seconds=30)
    await servers.until_recorded(ev.NotificationDelivered, 2)
    left_over = [b for b in receiver.got if b["job_id"] == JOB]
    if left == "owed":
        assert [(b["notification_id"], b["status"], b["try"]) for b in left_over] == \
            [(f"{JOB}.8.job", "completed", 1)]
    else:
        assert left_over == []
    assert [d.job_id for d in servers.recorded(ev.NotificationDelivered)] == [JOB, later]


async def test_a_server_killed_while_the_receiver_holds_the_post_sends_it_once_restarted(
        servers: Servers, receiver: Receiver) -> None:
    receiver.hanging = True
    first = await servers.start()
    job_id = await servers.submit(name="nightly", command=["true"],
                                  notify_url=receiver.url("/services/T0/B0/s3cretpath"))
    await until(lambda: len(receiver.got) == 1, "the POST reached the receiver", seconds=30)
    first.kill()  # SIGKILL between the end (durable) and its delivery
    await asyncio.to_thread(first.wait)
    assert servers.recorded(ev.NotificationDelivered) == []
    receiver.hanging = False
    receiver.release.set()

    await servers.start()
    await until(lambda: len(receiver.got) == 2, "sent again after the restart", seconds=30)
    assert receiver.got[1] == receiver.got[0]  # the same notification, still its first try
    await servers.until_recorded(ev.NotificationDelivered)
    await asyncio.to_thread(serverproc.end, servers.procs[-1])

    await servers.start()
    later = await servers.submit(command=["true"], notify_url=receiver.url())
    await until(lambda: len(receiver.got) == 3, "the later job's end", seconds=30)
    assert receiver.got[2]["job_id"] == later  # and nothing more of the first
    [delivered, _] = await servers.until_recorded(ev.NotificationDelivered, 2)
    assert (delivered.job_id, delivered.tries) == (job_id, 1)
    assert servers.recorded(ev.NotificationFailed) == []

    why = await asyncio.to_thread(serverproc.eventq, "replay", "why", job_id, "--data-dir",
                                  str(servers.data_dir))
    assert "notified" in why.stdout and "took it (HTTP 200) on try 1" in why.stdout
    shown = await asyncio.to_thread(serverproc.eventq, "replay", "show", "--job", job_id,
                                    "--data-dir", str(servers.data_dir))
    assert f'"notify_url": "{receiver.base}/<redacted>"' in shown.stdout
    assert "s3cretpath" not in shown.stdout + why.stdout


async def test_eventq_server_notifies_its_url_and_runs_its_hook_for_each_end(
        servers: Servers, receiver: Receiver, tmp_path: Path) -> None:
    ran = tmp_path / "ran"
    await servers.start("--notify-url", receiver.url("/all"),
                        "--on-finish", f'echo "$EVENTQ_STATUS $EVENTQ_EXIT_CODE" >> {ran}')
    job_id = await servers.submit(command=["sh", "-c", "exit 2"])
    await until(lambda: len(receiver.got) == 1, "the server's URL got the end", seconds=30)
    assert (receiver.got[0]["job_id"], receiver.got[0]["target"]) == (job_id, "server")
    [hook] = await servers.until_recorded(ev.HookRan)
    assert (hook.job_id, hook.exit_code, ran.read_text()) == (job_id, 0, "failed 2\n")


def test_a_bad_notify_url_is_refused_by_the_server_and_by_submit(tmp_path: Path) -> None:
    refused = serverproc.refused_start(tmp_path / "data", tmp_path / "err",
                                       "--notify-url", "ftp://example.com/hook")
    assert refused.code == 2
    assert refused.stderr[-1].endswith(
        "--notify-url must be an http:// or https:// URL (not ftp)")
    assert not (tmp_path / "data" / "events.db").exists()
    with serverproc.running(tmp_path / "data", tmp_path / "err2") as server:
        done = serverproc.eventq("jobs", "submit", "--url", server.url, "--token", server.token,
                                 "--notify", "hooks.example.com/x", "--", "true")
        assert done.returncode != 0
        assert "notify_url must be an http:// or https:// URL (not relative)" in done.stderr
        assert server.call("GET", "/api/queue?include_completed=true")[1]["jobs"] == []
