"""The server is killed with SIGKILL and restarted: nothing acknowledged is lost, no job
runs twice, no GPU is held twice.

Every job appends to a ledger when its process starts and ends, so the checks read what
really ran, not only what eventq recorded. The first test kills a real server at random
moments under load; the others start a real server on the exact log a kill leaves in each
window of a dispatch (a kill leaves a prefix of the log: group commit writes whole batches).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest

from eventq import events as ev
from eventq import gpus, runner
from eventq.log import EventLog
from tools import statecheck
from tools.crashkit import Harness, second_server
from tools.ledger import job_command, read_ledger

pytestmark = pytest.mark.slow

JOB = "a1b2c3d4e5f6"


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    async with Harness(tmp_path, seed=20240611) as h:
        yield h


def spec(h: Harness, gpu_count: int = 2, sleep: float = 0.05,
         max_attempts: int = 3) -> ev.JobSpec:
    return ev.JobSpec(job_id=JOB, user="admin", priority=30, name="crash", gpus=gpu_count,
                      max_attempts=max_attempts, command=job_command(h.ledger, sleep))


async def leave_log(h: Harness, events: list[ev.Event]) -> None:
    """The log as a kill left it: these events durable, nothing after them."""
    h.data_dir.mkdir(parents=True)
    log = await EventLog.open(h.data_dir / "events.db", time.time)
    log.start()
    inventory = gpus.detect("4xA100-80GB")
    log.append("system", [ev.NodeInventoryReported(node="local", gpus=inventory.gpus,
                                                   simulated=True), *events])
    await log.flush()
    await log.close()


def attempts_run(h: Harness, job_id: str) -> list[tuple[int, int]]:
    """(attempt, times started) of every attempt of the job that really ran."""
    return sorted((a, len(run.starts)) for (j, a), run in read_ledger(h.ledger).items()
                  if j == job_id)


async def reap(pid: int, timeout: float = 10.0) -> None:
    """Wait for our own child to end (bounded), then reap it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return
        if done:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"process {pid} still runs after {timeout}s")


def lost_attempts(events: list[dict[str, object]]) -> list[object]:
    return [e["body"] for e in events
            if e["type"] == "attempt_ended" and e["body"]["outcome"] == "lost"]  # type: ignore[index]


async def test_acknowledged_jobs_survive_random_kills(harness: Harness) -> None:
    """After every restart, and at the end, the server shows the state its log replays to."""
    await harness.start()
    for _ in range(5):
        await harness.crash_point()
    found = await harness.finish()
    assert found.acked > 0 and found.restarts >= 5
    assert found.problems() == {}, json.dumps(found.counts())
    assert found.verify["ok"] is True
    assert found.coverage["state compared"] == 6, json.dumps(found.coverage)


async def test_the_state_check_tells_a_live_state_from_the_one_the_log_replays_to(
        harness: Harness) -> None:
    await leave_log(harness, [
        ev.JobSubmitted(job=spec(harness)),
        ev.GpusAllocated(job_id=JOB, attempt=1, node="local", gpus=[0, 1]),
        ev.AttemptDispatched(job_id=JOB, attempt=1, node="local", gpus=[0, 1]),
    ])
    replayed = statecheck.replay_to(harness.data_dir / "events.db", 4)
    dispatched = statecheck.JobView("dispatched", 1, "local", (0, 1))
    assert replayed.jobs == {JOB: dispatched}
    assert replayed.holders == {("local", 0): JOB, ("local", 1): JOB}
    assert statecheck.differences(replayed, replayed) == []
    live = statecheck.State({JOB: statecheck.JobView("running", 1, "local", (0, 1))},
                            {("local", 0): JOB})
    assert statecheck.differences(live, replayed) == [
        f"job {JOB}: live {live.jobs[JOB]}, replayed {dispatched}",
        f"GPU local:1: live holder None, replayed {JOB}"]


@pytest.mark.parametrize("left", ["submitted", "gpus reserved"])
async def test_job_waiting_at_the_kill_runs_once_after_the_restart(
        harness: Harness, left: str) -> None:
    """JobSubmitted was durable (and maybe GpusAllocated), AttemptDispatched was not.

    The restarted server dispatches the job itself: nothing was lost, so no attempt may be
    charged. It is allowed one attempt, so a wrongly charged one fails it unrun.
    """
    events: list[ev.Event] = [ev.JobSubmitted(job=spec(harness, max_attempts=1))]
    if left == "gpus reserved":
        events.append(ev.GpusAllocated(job_id=JOB, attempt=1, node="local", gpus=[0, 1]))
    await leave_log(harness, events)
    await harness.start()
    job = await harness.wait_for(JOB)
    events_seen = await harness.events(JOB)
    assert lost_attempts(events_seen) == []
    assert job["status"] == "completed" and job["attempt"] == 1
    assert attempts_run(harness, JOB) == [(1, 1)]
    if left == "gpus reserved":
        assert [e["body"]["gpus"] for e in events_seen if e["type"] == "gpus_released"
                and e["body"]["reason"] == "orphaned"] == [[0, 1]]


async def test_kill_after_dispatch_before_the_process_started_runs_the_next_attempt_once(
        harness: Harness) -> None:
    await leave_log(harness, [
        ev.JobSubmitted(job=spec(harness)),
        ev.GpusAllocated(job_id=JOB, attempt=1, node="local", gpus=[0, 1]),
        ev.AttemptDispatched(job_id=JOB, attempt=1, node="local", gpus=[0, 1]),
    ])
    await harness.start()
    job = await harness.wait_for(JOB)
    assert job["status"] == "completed" and job["attempt"] == 2
    assert [b["attempt"] for b in lost_attempts(await harness.events(JOB))] == [1]  # type: ignore[index]
    assert attempts_run(harness, JOB) == [(2, 1)]


@pytest.mark.parametrize("when", ["still running", "exited while the server was down"])
async def test_process_started_before_the_kill_is_adopted_never_rerun(
        harness: Harness, when: str) -> None:
    """The process started; AttemptStarted never became durable."""
    gate = harness.data_dir.parent / "gate"
    job_spec = gated(spec(harness), gate)
    await leave_log(harness, [
        ev.JobSubmitted(job=job_spec),
        ev.GpusAllocated(job_id=JOB, attempt=1, node="local", gpus=[0, 1]),
        ev.AttemptDispatched(job_id=JOB, attempt=1, node="local", gpus=[0, 1]),
    ])
    directory = runner.attempt_dir(harness.data_dir, JOB, 1)
    pid = runner.spawn(job_spec, 1, [0, 1], directory)
    try:
        if when != "still running":
            gate.touch()
            await reap(pid)
        await harness.start()
        if when == "still running":
            # The job waits for the gate, so it is still running however slow the start.
            await until_event(harness, "attempt_started")
            gate.touch()
        job = await harness.wait_for(JOB)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        await reap(pid)
    assert job["status"] == "completed" and job["attempt"] == 1 and job["exit_code"] == 0
    assert attempts_run(harness, JOB) == [(1, 1)]
    if when == "still running":
        started = [e["body"] for e in await harness.events(JOB) if e["type"] == "attempt_started"]
        assert started == [{"job_id": JOB, "attempt": 1, "pid": pid, "adopted": True}]


def gated(job: ev.JobSpec, gate: Path) -> ev.JobSpec:
    """The job, made to wait until ``gate`` exists before it runs its command."""
    wait = f"while [ ! -e {shlex.quote(str(gate))} ]; do sleep 0.02; done; exec \"$@\""
    return msgspec.structs.replace(job, command=["sh", "-c", wait, "gated", *job.command])


async def until_event(h: Harness, kind: str, seconds: float = 30.0) -> None:
    """Wait until the job's log holds an event of ``kind``."""
    for _ in range(int(seconds / 0.05)):
        if any(e["type"] == kind for e in await h.events(JOB)):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"never happened: {kind}")


async def test_kill_after_attempt_ended_before_release_gives_the_gpus_back(
        harness: Harness) -> None:
    await leave_log(harness, [
        ev.JobSubmitted(job=spec(harness, gpu_count=4)),
        ev.GpusAllocated(job_id=JOB, attempt=1, node="local", gpus=[0, 1, 2, 3]),
        ev.AttemptDispatched(job_id=JOB, attempt=1, node="local", gpus=[0, 1, 2, 3]),
        ev.AttemptStarted(job_id=JOB, attempt=1, pid=999_999),
        ev.AttemptEnded(job_id=JOB, attempt=1, outcome="exited", exit_code=0),
        ev.JobCompleted(job_id=JOB),
    ])
    await harness.start()
    after = await harness.submit(sleep=0.01, gpus=4)
    assert (await harness.wait_for(after))["status"] == "completed"
    assert (await harness.job(JOB))[1]["status"] == "completed"
    assert attempts_run(harness, JOB) == []
    assert harness.replay_verify()["ok"] is True


@pytest.mark.parametrize("spelling", ["a symlink, then its real path", "a relative path"])
async def test_job_running_at_the_kill_runs_once_whatever_the_data_dir_is_called(
        harness: Harness, tmp_path: Path, spelling: str) -> None:
    """The operator names the data directory by a symlink or a relative path."""
    if spelling == "a relative path":
        first = then = "data"  # relative to the directory the server runs in
    else:
        harness.data_dir.mkdir()
        (tmp_path / "eventq-home").symlink_to(harness.data_dir)
        first, then = str(tmp_path / "eventq-home"), str(harness.data_dir)
    harness.data_dir_arg = first
    await harness.start()
    job_id = await harness.submit(sleep=1.0, gpus=1)
    await harness.wait_for(job_id, ("running",))
    await harness.kill()
    harness.data_dir_arg = then
    await harness.start()
    job = await harness.wait_for(job_id)
    assert attempts_run(harness, job_id) == [(1, 1)]
    assert job["status"] == "completed" and job["attempt"] == 1


async def test_second_server_on_the_same_data_dir_refuses(harness: Harness) -> None:
    await harness.start()
    first = harness.server_pid
    refused = second_server(harness.data_dir)
    assert refused.returncode != 0
    assert "another eventq server" in refused.stderr
    assert f"pid {first}" in refused.stderr and str(harness.data_dir) in refused.stderr
    # The running server is undisturbed.
    assert json.loads((harness.data_dir / "server.json").read_text())["pid"] == first
    assert (await harness.wait_for(await harness.submit(sleep=0.01, gpus=1)))["status"] == \
        "completed"
