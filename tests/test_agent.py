"""``eventq worker`` as an operator runs it: real orchestrator and worker processes.

Each story starts an ``eventq server`` (heartbeat timeout shortened to 2 s) and one or
two ``eventq worker`` processes with simulated GPUs on loopback, then does what people
do: submit, cancel, kill -9 a worker or the orchestrator, restart, rotate a token, drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestServer

from eventq.runner import is_ours
from tests.cluster import (
    EVENTQ,
    HEARTBEAT_TIMEOUT,
    Cluster,
    Worker,
    clean_env,
    free_port,
    gone,
    wait_for,
)
from tests.helpers import fill, tmpfs
from tools.ledger import assert_no_overlaps, job_command, read_ledger

pytestmark = pytest.mark.slow
T = TypeVar("T")
AiohttpServer = Callable[[web.Application], Any]


def test_a_job_for_labelled_workers_runs_there_with_its_gpus_and_its_log(
        cluster: Cluster) -> None:
    server = cluster.server()
    big = cluster.worker(server, "box-a100", "--labels", "location=us-west", "--persistent",
                         gpus="2xA100-80GB", labels={"gpu_type": "a100"})
    small = cluster.worker(server, "box-l4", "--trainer", 'sh -c \'cat "$CONFIG_PATH"\'',
                           gpus="1xL4-24GB", worker_type="ephemeral", labels={"gpu_type": "l4"},
                           via_env=True)

    job = server.submit("echo gpus=$CUDA_VISIBLE_DEVICES job=$EVENTQ_JOB_ID "
                        "attempt=$EVENTQ_ATTEMPT; echo warning >&2", gpus=2,
                        worker_labels={"gpu_type": "a100*", "location": "us-*"})
    done = server.wait_job(job, "completed")
    assert done["node"] == big.worker_id
    assert server.call("GET", f"/api/jobs/{job}/logs") == f"gpus=0,1 job={job} attempt=1\n"
    assert server.call("GET", f"/api/jobs/{job}/logs?stream=stderr") == "warning\n"

    # a config job runs the worker's trainer with CONFIG_PATH; the ephemeral worker then stops
    config_job = server.call("POST", "/api/queue/submit", {
        "config": {"learning_rate": 0.0001}, "gpus": 1, "target": "worker",
        "worker_labels": {"gpu_type": "l4"}})["job_id"]
    assert server.wait_job(config_job, "completed")["node"] == small.worker_id
    assert json.loads(server.call("GET", f"/api/jobs/{config_job}/logs")) == {
        "learning_rate": 0.0001}
    assert small.proc is not None and small.proc.wait(timeout=10) == 0
    assert "an ephemeral worker runs one job" in small.output()
    shutdown = next(line for line in small.output().splitlines() if "] shutdown " in line)
    assert "completed=1" in shutdown and "left_running=0" in shutdown
    assert big.proc is not None and big.proc.poll() is None, "the persistent worker goes on"


def test_cancelling_a_remote_job_stops_its_whole_process_group(cluster: Cluster,
                                                               tmp_path: Path) -> None:
    server = cluster.server()
    cluster.worker(server, "box")
    child_file = tmp_path / "child.pid"
    # a job that ignores SIGTERM and leaves a child behind: only the group's SIGKILL ends both
    job = server.submit(f"trap '' TERM; sleep 300 & echo $! > {child_file}; wait")
    server.wait_job(job, "running")
    child = int(wait_for(lambda: child_file.exists() and child_file.read_text().strip(),
                         "the job's child to start"))

    server.call("POST", f"/api/queue/{job}/cancel")
    wait_for(lambda: gone(child), "the job's child to be killed")
    server.wait_job(job, "cancelled")
    assert [e["outcome"] for e in wait_for(lambda: server.ends(job), "the attempt's end")] \
        == ["cancelled"]


def test_a_remote_job_past_its_max_runtime_is_stopped_as_timed_out(cluster: Cluster,
                                                                  tmp_path: Path) -> None:
    server = cluster.server()
    cluster.worker(server, "box")
    pid_file = tmp_path / "pid"
    job = server.submit(f"echo $$ > {pid_file}; exec sleep 300", max_runtime=1)
    server.wait_job(job, "failed")
    assert [e["outcome"] for e in server.ends(job)] == ["timeout"]
    assert gone(int(pid_file.read_text()))


def test_a_job_cancelled_while_its_worker_was_away_is_stopped_when_it_returns(
        cluster: Cluster) -> None:
    server = cluster.server(heartbeat_timeout=6.0)
    worker = cluster.worker(server, "box")
    job = server.submit("sleep 300")
    server.wait_job(job, "running")
    worker.kill9()
    server.call("POST", f"/api/queue/{job}/cancel")

    worker.start()  # back within the heartbeat timeout: it keeps the attempt, which is cancelled
    ends = wait_for(lambda: server.ends(job), "the cancelled attempt to be stopped", timeout=5)
    assert [e["outcome"] for e in ends] == ["cancelled"]


def test_a_worker_killed_mid_job_loses_it_and_attempt_2_runs_on_the_other(
        cluster: Cluster, tmp_path: Path) -> None:
    server = cluster.server()
    workers = [cluster.worker(server, "one"), cluster.worker(server, "two")]
    ledger = tmp_path / "ledger"
    job = server.submit(f'echo "$EVENTQ_ATTEMPT" >> {ledger}; '
                        'if [ "$EVENTQ_ATTEMPT" = 1 ]; then sleep 300; fi; echo finished')
    first = server.wait_job(job, "running")["node"]
    lost = next(w for w in workers if w.worker_id == first)
    other = next(w for w in workers if w is not lost)

    lost.kill9()
    done = server.wait_job(job, "completed")
    assert (done["attempt"], done["node"]) == (2, other.worker_id)
    ends = server.ends(job)
    assert ends[0]["outcome"] == "lost" and ends[0]["detail"].startswith("worker_lost")
    assert ledger.read_text().split() == ["1", "2"]
    assert server.worker(lost.worker_id)["status"] == "offline"
    assert server.call("GET", f"/api/jobs/{job}/logs") == "finished\n"


def test_an_orchestrator_killed_and_restarted_keeps_the_remote_job_which_runs_once(
        cluster: Cluster, tmp_path: Path) -> None:
    # The worker's lease (8 s of a 10 s offline timeout, with its 1 s grace) must outlast the
    # restart, or the agent rightly stops its job: a loaded machine restarts slowly.
    server = cluster.server(port=free_port(), heartbeat_timeout=10.0)
    worker = cluster.worker(server, "box")
    ledger = tmp_path / "ledger"
    job = server.submit(f"echo ran >> {ledger}; sleep 3; echo done")
    server.wait_job(job, "running")

    assert server.proc is not None
    server.proc.kill()
    server.proc.wait(timeout=10)
    server.start()
    done = server.wait_job(job, "completed")
    assert done["attempt"] == 1 and done["node"] == worker.worker_id
    assert ledger.read_text() == "ran\n", "the job ran exactly once"
    assert [e["outcome"] for e in server.ends(job)] == ["exited"]
    assert server.count_events("worker_lost") == 0
    assert worker.connections() == 2, "the worker came back by itself"


def test_a_restarted_worker_adopts_its_running_job_instead_of_running_it_again(
        cluster: Cluster, tmp_path: Path) -> None:
    server = cluster.server(heartbeat_timeout=6.0)
    worker = cluster.worker(server, "box")
    ledger, release = tmp_path / "ledger", tmp_path / "release"
    job = server.submit(f"echo ran >> {ledger}; while [ ! -e {release} ]; do sleep 0.05; done; "
                        "echo done")
    server.wait_job(job, "running")
    wait_for(ledger.exists, "the job to start")

    worker.kill9()
    worker.start()
    release.touch()
    done = server.wait_job(job, "completed")
    assert done["attempt"] == 1
    assert ledger.read_text() == "ran\n"
    assert server.call("GET", f"/api/jobs/{job}/logs") == "done\n"
    assert "adopted" in worker.output()


def test_a_job_that_prints_nothing_for_many_heartbeats_keeps_its_worker_online(
        cluster: Cluster) -> None:
    server = cluster.server()
    worker = cluster.worker(server, "box")
    job = server.submit(f"sleep {HEARTBEAT_TIMEOUT * 2}")  # eight heartbeat periods of silence
    server.wait_job(job, "completed")
    assert [e["outcome"] for e in server.ends(job)] == ["exited"]
    assert server.count_events("worker_lost") == 0
    assert "disconnected" not in worker.output()


def test_rotating_the_token_stops_the_job_the_worker_exits_saying_why_and_it_runs_once_more(
        cluster: Cluster, tmp_path: Path) -> None:
    server = cluster.server()
    worker = cluster.worker(server, "box")
    ledger = tmp_path / "ledger"
    job = server.submit(shlex.join(job_command(ledger, 3.0)))
    server.wait_job(job, "running")
    wait_for(ledger.exists, "the job to start")

    rotated = server.call("POST", f"/api/admin/workers/{worker.worker_id}/token")
    assert rotated["handed_to_live_agent"] is False
    assert worker.proc is not None
    assert worker.proc.wait(timeout=15) != 0
    said = worker.output()
    assert "refused this worker's token (HTTP 401)" in said
    assert "the worker's token was rotated" in said
    assert "left_running=0" in said, "a worker that may not report stops what it runs"
    assert read_ledger(ledger)[(job, 1)].ends, "attempt 1's process was stopped"
    lost = server.wait_job(job, "pending")
    assert [e["outcome"] for e in server.ends(job)] == ["lost"]

    worker.token = rotated["token"]
    worker.start("--gpus", "1xA100-80GB")
    assert server.wait_job(job, "completed")["attempt"] == lost["attempt"] + 1 == 2
    runs = assert_no_overlaps(ledger)
    assert sorted(runs) == [(job, 1), (job, 2)]


def test_a_token_rotated_with_keep_running_reaches_the_live_agent_and_its_job_runs_once(
        cluster: Cluster, tmp_path: Path) -> None:
    server = cluster.server(port=free_port())
    worker = cluster.worker(server, "box")
    ledger = tmp_path / "ledger"
    job = server.submit(shlex.join(job_command(ledger, 2.0)))
    server.wait_job(job, "running")

    rotated = server.call("POST",
                          f"/api/admin/workers/{worker.worker_id}/token?keep_running=true")
    assert rotated["handed_to_live_agent"] is True
    assert server.wait_job(job, "completed")["attempt"] == 1
    assert "token_rotated" in worker.output()

    # The agent reconnects with the token it was handed: the old one works no more.
    assert server.proc is not None
    server.proc.kill()
    server.proc.wait(timeout=10)
    before = worker.connections()
    server.start()
    wait_for(lambda: worker.connections() > before, "the worker to reconnect")
    assert worker.proc is not None and worker.proc.poll() is None
    assert server.worker(worker.worker_id)["status"] != "offline"
    assert sorted(assert_no_overlaps(ledger)) == [(job, 1)]


def test_a_drained_worker_finishes_its_job_and_takes_no_new_one(cluster: Cluster,
                                                                tmp_path: Path) -> None:
    server = cluster.server()
    drained = cluster.worker(server, "drained")
    release = tmp_path / "release"
    first = server.submit(f"while [ ! -e {release} ]; do sleep 0.05; done; echo finished")
    server.wait_job(first, "running")
    other = cluster.worker(server, "other")

    server.call("POST", f"/api/admin/workers/{drained.worker_id}/drain")
    second = server.submit("sleep 300")
    assert server.wait_job(second, "running")["node"] == other.worker_id
    release.touch()
    assert server.wait_job(first, "completed")["node"] == drained.worker_id
    third = server.call("POST", "/api/queue/submit",
                        {"command": "true", "gpus": 1, "target": "worker"})
    assert third["status"] == "queued", "the idle drained worker takes no new job"
    assert server.worker(drained.worker_id)["status"] == "draining"
    assert drained.proc is not None and drained.proc.poll() is None, "it keeps running"
    assert "draining" in drained.output()


def test_a_worker_with_a_time_budget_takes_what_fits_then_leaves(cluster: Cluster,
                                                                  tmp_path: Path) -> None:
    """job-scheduler-v2's --max-runtime/--margin-time on an HPC allocation."""
    server = cluster.server()
    hpc = cluster.worker(server, "hpc", "--max-runtime", "3600", "--margin-time", "300")
    too_long = server.submit("true", estimated_runtime=4000)
    short = server.submit(f"echo ran > {tmp_path / 'short'}", estimated_runtime=60)
    assert server.wait_job(short, "completed")["node"] == hpc.worker_id
    waiting = server.job(too_long)
    assert waiting["status"] == "pending"
    assert "left in its allocation" in waiting["reasons"][0]["detail"]
    assert hpc.proc is not None
    assert hpc.proc.wait(timeout=20) == 0, "nothing more fits: it leaves cleanly"
    assert "time budget" in hpc.output()
    other = cluster.worker(server, "other")
    assert server.wait_job(too_long, "completed")["node"] == other.worker_id


# --- the protocol, against an orchestrator played by hand ------------------------------


class Connection:
    """One agent connection, seen from the orchestrator's side."""

    def __init__(self, ws: web.WebSocketResponse, done: asyncio.Event) -> None:
        self.ws, self.done = ws, done

    async def send(self, **message: Any) -> None:
        await self.ws.send_json(message)

    async def next(self) -> dict[str, Any]:
        frame = await asyncio.wait_for(self.ws.receive(), 15)
        assert frame.type == WSMsgType.TEXT, f"the agent closed the connection: {frame}"
        message: dict[str, Any] = json.loads(frame.data)
        return message

    async def until(self, done: Callable[[list[dict[str, Any]]], bool]) -> list[dict[str, Any]]:
        seen: list[dict[str, Any]] = []
        while not done(seen):
            seen.append(await self.next())
        return seen

    async def closed(self) -> None:
        frame = await asyncio.wait_for(self.ws.receive(), 15)
        assert frame.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING), frame


class ScriptedOrchestrator:
    """``/api/workers/ws`` answered by the test, message by message."""

    TOKEN = "wt_scripted"

    def __init__(self) -> None:
        self.connections: asyncio.Queue[Connection] = asyncio.Queue()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/api/workers/ws", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("X-Worker-Token") != self.TOKEN:
            return web.json_response({"error": "bad token"}, status=401)
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        done = asyncio.Event()
        await self.connections.put(Connection(ws, done))
        await done.wait()  # the test talks on it until it is done with it
        return ws

    async def accept(self) -> Connection:
        return await asyncio.wait_for(self.connections.get(), 15)


def run_message(job_id: str, command: str, gpus: list[int] | None = None) -> dict[str, Any]:
    return {"type": "run", "job_id": job_id, "attempt": 1, "command": command,
            "gpus": gpus or [0], "env": {}, "cwd": None, "config": {}, "max_runtime": None}


def ended(*job_ids: str) -> Callable[[list[dict[str, Any]]], bool]:
    return lambda seen: {m["job_id"] for m in seen if m["type"] == "exited"} >= set(job_ids)


@pytest.fixture
async def scripted(aiohttp_server: AiohttpServer,
                   tmp_path: Path) -> Any:
    orchestrator = ScriptedOrchestrator()
    server: TestServer = await aiohttp_server(orchestrator.app())
    agents: list[subprocess.Popen[bytes]] = []

    def start() -> subprocess.Popen[bytes]:
        with open(tmp_path / "agent.out", "ab") as out:
            agent = subprocess.Popen(
                [EVENTQ, "worker", "--url", str(server.make_url("")).rstrip("/"),
                 "--token", ScriptedOrchestrator.TOKEN, "--gpus", "2xA100-80GB",
                 "--labels", "zone=b", "--data-dir", str(tmp_path / "agent"), "--grace", "1"],
                stdout=out, stderr=out, env=clean_env())
        agents.append(agent)
        return agent

    yield orchestrator, start
    for agent in agents:
        if agent.poll() is None:
            agent.kill()
        agent.wait(timeout=10)
    for pid_file in tmp_path.glob("agent/jobs/*/*/pid"):
        with contextlib.suppress(ProcessLookupError, ValueError, PermissionError):
            pid = int(pid_file.read_text())
            if is_ours(pid, pid_file.parent):
                os.killpg(pid, signal.SIGKILL)


async def test_a_run_sent_twice_starts_once_and_heartbeats_go_on_while_the_job_is_silent(
        scripted: Any, tmp_path: Path) -> None:
    orchestrator, start = scripted
    start()
    conn = await orchestrator.accept()
    hello = await conn.next()
    assert (hello["type"], hello["running"], hello["labels"], hello["simulated"]) == (
        "hello", [], {"zone": "b"}, True)
    assert [g["index"] for g in hello["gpus"]] == [0, 1]
    await conn.send(type="welcome", worker_id="w_1", heartbeat_seconds=0.2, keep=[], stop=[])

    ledger = tmp_path / "ledger"
    await conn.ws.send_str("this is not json")
    await conn.send(type="a_message_from_the_future")
    run = run_message("j1", f"echo ran >> {ledger}; echo gpus=$CUDA_VISIBLE_DEVICES; sleep 1",
                      gpus=[1])
    await conn.ws.send_json(run)
    await conn.ws.send_json(run)
    seen = await conn.until(ended("j1"))
    kinds = [m["type"] for m in seen]
    assert kinds.count("started") == 1 and ledger.read_text() == "ran\n"
    silent = kinds[kinds.index("started"):kinds.index("exited")]
    assert silent.count("heartbeat") >= 2, "heartbeats go on while the job prints nothing"
    assert "".join(m["data"] for m in seen if m["type"] == "log") == "gpus=1\n"
    assert {k: seen[-1][k] for k in ("job_id", "attempt", "outcome", "exit_code")} == {
        "job_id": "j1", "attempt": 1, "outcome": "exited", "exit_code": 0}
    conn.done.set()


async def test_a_restarted_agent_reports_what_ended_while_away_and_stops_what_was_given_away(
        scripted: Any, tmp_path: Path) -> None:
    orchestrator, start = scripted
    agent = start()
    conn = await orchestrator.accept()
    await conn.next()
    await conn.send(type="welcome", worker_id="w_1", heartbeat_seconds=5, keep=[], stop=[])
    given_away_pid, ledger, release = tmp_path / "pid", tmp_path / "ledger", tmp_path / "release"
    await conn.ws.send_json(run_message("given", f"echo $$ > {given_away_pid}; exec sleep 300"))
    await conn.ws.send_json(run_message(
        "kept", f"echo ran >> {ledger}; while [ ! -e {release} ]; do sleep 0.05; done; echo bye",
        gpus=[1]))
    await conn.until(lambda seen: [m["type"] for m in seen].count("started") == 2)

    agent.kill()
    agent.wait(timeout=10)
    await conn.closed()
    conn.done.set()
    release.touch()  # "kept" ends while no agent watches it
    wait_for((tmp_path / "agent/jobs/kept/1/exit").exists, "the job to end")

    start()
    conn = await orchestrator.accept()
    hello = await conn.next()
    assert sorted(hello["running"]) == [["given", 1], ["kept", 1]]
    await conn.send(type="welcome", worker_id="w_1", heartbeat_seconds=5,
                    keep=[["kept", 1]], stop=[["given", 1]])
    seen = await conn.until(ended("kept", "given"))
    exits = {m["job_id"]: m for m in seen if m["type"] == "exited"}
    assert (exits["kept"]["outcome"], exits["kept"]["exit_code"]) == ("exited", 0)
    assert "".join(m["data"] for m in seen if m["type"] == "log" and m["job_id"] == "kept") \
        == "bye\n", "its output from while the agent was away, sent once"
    assert exits["given"]["outcome"] == "cancelled"
    assert gone(int(given_away_pid.read_text()))

    # the same run again is not started again, whatever arrives after it
    await conn.ws.send_json(run_message("kept", f"echo ran >> {ledger}"))
    await conn.ws.send_json(run_message("later", "true"))
    seen = await conn.until(ended("later"))
    assert [m["job_id"] for m in seen if m["type"] == "started"] == ["later"]
    assert ledger.read_text() == "ran\n"
    conn.done.set()


def test_a_worker_whose_lines_lost_their_reader_runs_its_jobs(cluster: Cluster,
                                                               tmp_path: Path) -> None:
    """Whoever read the worker's output went away (journald restarted, a ``tee`` ended):
    its next line raised ``BrokenPipeError`` and the worker exited with 141, leaving its
    jobs to wait for a worker that would never come back. Lines are lost now; jobs are not."""
    server = cluster.server()
    created = server.call("POST", "/api/admin/workers",
                          {"name": "quiet", "worker_type": "persistent", "labels": {}})
    proc = subprocess.Popen(
        [EVENTQ, "worker", "--url", server.url, "--token", created["token"], "--data-dir",
         str(tmp_path / "quiet"), "--grace", "1", "--gpus", "1xA100-80GB"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=clean_env())
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if b"] connected " in line:
                break
        proc.stdout.close()  # the reader goes away
        jobs = [server.submit("echo ran", gpus=1) for _ in range(3)]
        for job in jobs:
            server.wait_job(job, "completed")
        assert proc.poll() is None
    finally:
        proc.terminate()
        code = proc.wait(15)
    assert code == 0


def test_a_worker_frees_its_gpu_only_once_a_daemon_the_job_forked_is_gone(
        cluster: Cluster, tmp_path: Path) -> None:
    """A daemon the job forked out of its process group (``setsid``) is stopped with the
    attempt, found by the attempt's variables, and the next job on that GPU starts after."""
    server = cluster.server()
    cluster.worker(server, "solo")
    ledger, stray = tmp_path / "ledger", tmp_path / "stray"
    daemon = (f"setsid sh -c 'echo $$ > {stray}; "
              f"trap \"sleep 0.5; echo left >> {ledger}; exit\" TERM; "
              f"echo up >> {ledger}; while :; do sleep 0.05; done' & "
              f"until grep -q up {ledger} 2>/dev/null; do sleep 0.01; done")
    try:
        first = server.submit(daemon, gpus=1)
        second = server.submit(f"echo next >> {ledger}", gpus=1)
        server.wait_job(second, "completed")
        assert server.job(first)["status"] == "completed"
        assert ledger.read_text().split() == ["up", "left", "next"]
        assert gone(int(stray.read_text()))
    finally:  # a daemon that was not stopped must not outlive the test
        with contextlib.suppress(ProcessLookupError, ValueError, FileNotFoundError):
            os.kill(int(stray.read_text()), signal.SIGKILL)


def test_a_worker_whose_disk_filled_keeps_its_lease_and_its_running_job(
        cluster: Cluster, tmp_path: Path) -> None:
    """The lease file was renewed as a new file renamed over the old: with the worker's
    disk full (a job's checkpoints, a dataset cache) every renewal failed, the agent took
    that for a lost connection, and the watchdog stopped the healthy job as lost. The
    renewal now writes over the file's own bytes and needs no room."""
    server = cluster.server()
    with tmpfs(tmp_path / "disk", "1m") as disk:
        created = server.call("POST", "/api/admin/workers",
                              {"name": "full", "worker_type": "persistent", "labels": {}})
        worker = Worker(server, disk / "full", created)
        cluster.workers.append(worker)
        worker.start("--gpus", "1xA100-80GB")
        job = server.submit("sleep 4", gpus=1)  # it writes nothing: a full disk is no harm
        server.wait_job(job, "running")
        fill(disk)
        done = server.wait_job(job, "completed")
        assert done["node"] == created["worker_id"]
        assert "lease_lapsed" not in worker.output() and "connect_failed" not in worker.output()


def test_a_restarted_worker_stops_a_daemon_of_an_attempt_that_vanished_while_it_was_away(
        cluster: Cluster, tmp_path: Path) -> None:
    """The agent was killed, then the attempt's group (no exit code: it vanished), and a
    daemon it forked out of the group lived on. The restarted agent stops the daemon
    before it reports the attempt lost, so the retry never starts beside it. (It reported
    a vanished attempt as exited without a code, and the job failed for good.)"""
    server = cluster.server(heartbeat_timeout=6.0)
    worker = cluster.worker(server, "box")
    ledger, stray = tmp_path / "ledger", tmp_path / "stray"
    job = server.submit(
        f'if [ "$EVENTQ_ATTEMPT" = 1 ]; then setsid sh -c \'echo $$ > {stray}; '
        f'trap "echo left >> {ledger}; exit" TERM; while :; do sleep 0.05; done\' & '
        f'sleep 300; else echo next >> {ledger}; fi')
    wait_for(lambda: stray.exists() and stray.read_text().strip(), "the daemon")
    daemon = int(stray.read_text())
    try:
        worker.kill9()
        pgid = int((worker.data / "jobs" / job / "1" / "pid").read_text())
        os.killpg(pgid, signal.SIGKILL)
        wait_for(lambda: gone(pgid), "the attempt's wrapper to be gone")
        worker.start("--gpus", "1xA100-80GB")
        done = server.wait_job(job, "completed")
        assert done["attempt"] == 2  # the vanished one was lost, not a failure of the job
        assert ledger.read_text().split() == ["left", "next"]
        assert gone(daemon)
    finally:  # a daemon that was not stopped must not outlive the test
        with contextlib.suppress(ProcessLookupError):
            os.kill(daemon, signal.SIGKILL)
