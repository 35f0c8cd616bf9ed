"""Slurm starts eventq workers on demand (SPEC 12), against a real single-node Slurm.

``../shared/tools/slurm-local.sh install`` brings one up (CI does, as root). Others may use
the same Slurm at the same time: every story looks only at the jobs whose names carry its
own prefix, never assumes an empty queue, and cancels what its server submitted.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import shutil
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from eventq import events as ev
from tests.cluster import EVENTQ, Cluster, Server, clean_env, wait_for
from tests.serverproc import refused_start

SLURM_COMMANDS = ("sbatch", "squeue", "scancel", "scontrol")
PARTITION = "debug"


def _why_no_slurm() -> str | None:
    missing = [c for c in SLURM_COMMANDS if shutil.which(c) is None]
    if missing:
        return f"Slurm is not installed here (no {', '.join(missing)}); " \
               "../shared/tools/slurm-local.sh install brings one up"
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=20)
        part = subprocess.run(["sinfo", "--noheader", f"--partition={PARTITION}"],
                              capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"Slurm does not answer: {exc}"
    if "is UP" not in ping.stdout:
        return f"slurmctld is not up: {ping.stdout.strip() or ping.stderr.strip()}"
    if not part.stdout.strip():
        return f"Slurm has no partition {PARTITION}"
    return None


WHY_NO_SLURM = _why_no_slurm()
pytestmark = [pytest.mark.skipif(WHY_NO_SLURM is not None, reason=WHY_NO_SLURM or ""),
              pytest.mark.slow,
              # Slurm may be busy with someone else's benchmark: its tasks then wait.
              pytest.mark.timeout(300)]
SLOW = 120.0


def squeue(prefix: str, *more: str) -> list[str]:
    """``name|id|state|reason`` of this story's Slurm jobs (pending and running ones, unless
    ``more`` asks for others)."""
    out = subprocess.run(["squeue", "--noheader", "--array", "--format=%j|%i|%T|%r", *more],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    return [line for line in out.splitlines() if line.startswith(f"{prefix}-")]


def cancel_all(prefix: str) -> None:
    """Cancel every Slurm job of this story, and wait until Slurm has ended them."""
    ids = {line.split("|")[1].split("_")[0] for line in squeue(prefix)}
    if ids:
        subprocess.run(["scancel", *sorted(ids)], capture_output=True, timeout=30, check=False)
    with contextlib.suppress(AssertionError):
        wait_for(lambda: not squeue(prefix), "this story's Slurm jobs to end", 30)


def recorded(server: Server, kind: type[ev.Event]) -> list[Any]:
    """The events of one type in the server's log, decoded."""
    tag = ev.EVENT_TAGS[kind]
    with contextlib.closing(sqlite3.connect(f"file:{server.data / 'events.db'}?mode=ro",
                                            uri=True)) as db:
        rows = db.execute("SELECT body, v FROM events WHERE type = ? ORDER BY seq",
                          (tag,)).fetchall()
    return [ev.decode(body, v) for body, v in rows]


def reasons(server: Server, job_id: str) -> str:
    found = server.call("GET", f"/api/queue/position/{job_id}").get("reasons") or []
    return "; ".join(f"{r['code']}: {r['detail']}" for r in found)


def eventq(server: Server, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EVENTQ, *args, "--data-dir", str(server.data)], capture_output=True,
                          text=True, timeout=60, env=clean_env(), check=False)


@pytest.fixture
def slurm(cluster: Cluster) -> Iterator[Callable[..., tuple[Server, str]]]:
    """Start a server that asks Slurm for workers; its jobs are cancelled afterwards."""
    prefixes: list[str] = []

    def start(*args: str) -> tuple[Server, str]:
        prefix = f"eventq-test-{secrets.token_hex(3)}"
        prefixes.append(prefix)
        server = cluster.server(heartbeat_timeout=3.0, args=(
            "--slurm-partition", PARTITION, "--slurm-worker-gpus", "1xA100-80GB",
            "--slurm-idle-timeout", "2", "--slurm-job-name", prefix, *args))
        server.call("POST", "/api/queue/concurrency",
                    {"user_max_concurrent": 10, "max_concurrent": 10})
        return server, prefix

    try:
        yield start
    finally:
        for prefix in prefixes:
            cancel_all(prefix)


def test_workers_slurm_starts_run_the_jobs_then_idle_out_and_leave(
        slurm: Callable[..., tuple[Server, str]]) -> None:
    server, prefix = slurm()
    jobs = [server.submit("sleep 1") for _ in range(3)]
    for job_id in jobs:
        done = server.wait_job(job_id, "completed", SLOW)
        worker = next(w for w in recorded(server, ev.WorkerCreated)
                      if w.worker_id == done["node"])
        assert worker.provider == "slurm" and worker.worker_type == "ephemeral"
    requested = recorded(server, ev.WorkersRequested)
    assert requested and set(jobs) == {j for r in requested for j in r.for_jobs}
    assert len(recorded(server, ev.WorkersRequestSubmitted)) == len(requested)
    started = [e for e in recorded(server, ev.RequestedWorkerChanged) if e.state == "running"]
    assert started and all(e.node for e in started), "each start names its node"
    made = {w for r in requested for w in r.workers}
    # Idle for 2 s, each worker is drained and its task cancelled; Slurm ends it; its
    # worker goes offline and its record is removed.
    wait_for(lambda: made <= {e.worker_id for e in recorded(server, ev.WorkerRemoved)},
             "every worker Slurm started to be removed", SLOW)
    assert not squeue(prefix), "nothing of this server's is left in Slurm"
    wait_for(lambda: not list((server.data / "slurm").glob("*.out")),
             "the output files of the tasks that ended and whose workers left to go")
    cancelled = recorded(server, ev.RequestedWorkersCancelled)
    assert any("idle" in e.reason for e in cancelled)
    lost = [e.reason for e in recorded(server, ev.WorkerLost)]
    assert lost and all("slurm job" in why and "ended" in why for why in lost)
    verified = eventq(server, "replay", "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    first = next(j for j in jobs if j in requested[0].for_jobs)
    told = json.loads(eventq(server, "replay", "why", first, "--format", "json").stdout)
    assert any(s["state"] == "slurm" and s["detail"].startswith("asked for")
               for s in told["steps"])
    # The provider asks at once for the first job and then for the rest, and the first worker
    # to connect takes the queue's head: a job may run on a worker another's request brought.
    # Each job's story names the worker Slurm started and where, whichever request it was.
    for job_id in jobs:
        waits = json.loads(eventq(server, "replay", "why", job_id, "--format", "json")
                           .stdout)["provider_waits"]
        assert [w["node"] is not None for w in waits] == [True], "it ran on one Slurm started"
        line = eventq(server, "replay", "why", job_id).stdout
        said = "for Slurm to start a worker" if waits[0]["for_this_job"] else \
            "ran on a worker Slurm started"
        assert f"{said} on {waits[0]['node']}" in line, line


def test_a_request_cancelled_by_hand_is_asked_again_while_the_job_waits(
        slurm: Callable[..., tuple[Server, str]]) -> None:
    server, prefix = slurm("--slurm-extra=--hold")  # held in Slurm: its tasks never start
    job_id = server.submit("true")
    wait_for(lambda: "pending: JobHeldUser" in reasons(server, job_id),
             "the job to say what Slurm is doing", SLOW)
    first = recorded(server, ev.WorkersRequestSubmitted)[0]
    subprocess.run(["scancel", first.batch_id], check=True, timeout=30)
    second = wait_for(lambda: recorded(server, ev.WorkersRequestSubmitted)[1:],
                      "a new request for the job that still waits", SLOW)[0]
    assert second.request_id != first.request_id
    assert len(squeue(prefix)) == 1 and squeue(prefix)[0].split("|")[1] == f"{second.batch_id}_0"
    gone = recorded(server, ev.WorkersRequested)[0].workers[0]
    wait_for(lambda: gone in {e.worker_id for e in recorded(server, ev.WorkerRemoved)},
             "the first request's worker to be removed", SLOW)
    assert server.job(job_id)["status"] == "pending"


def test_max_workers_holds_the_second_request(
        slurm: Callable[..., tuple[Server, str]]) -> None:
    server, prefix = slurm("--slurm-extra=--hold", "--slurm-max-workers", "1")
    first, second = server.submit("true"), server.submit("true")
    wait_for(lambda: "1 of 1 workers asked for (--slurm-max-workers 1)"
             in reasons(server, second), "the second job to say what holds it", SLOW)
    wait_for(lambda: squeue(prefix), "the first request to reach Slurm", SLOW)
    requested = recorded(server, ev.WorkersRequested)
    assert [(len(r.workers), r.for_jobs) for r in requested] == [(1, [first])]
    assert len(squeue(prefix)) == 1


def test_a_demand_that_disappears_cancels_its_pending_request(
        slurm: Callable[..., tuple[Server, str]]) -> None:
    server, prefix = slurm("--slurm-extra=--hold")
    job_id = server.submit("true")
    wait_for(lambda: squeue(prefix), "the request to wait in Slurm", SLOW)
    server.call("POST", f"/api/queue/{job_id}/cancel")
    cancelled = wait_for(lambda: recorded(server, ev.RequestedWorkersCancelled),
                         "the request to be cancelled", SLOW)
    assert cancelled[0].tasks == [0] and "no waiting job needs it" in cancelled[0].reason
    wait_for(lambda: not squeue(prefix), "Slurm to drop the cancelled task", SLOW)
    worker = recorded(server, ev.WorkersRequested)[0].workers[0]
    wait_for(lambda: worker in {e.worker_id for e in recorded(server, ev.WorkerRemoved)},
             "its worker to be removed", SLOW)


def test_a_worker_with_little_time_left_takes_no_long_job_and_none_is_asked_for_it(
        slurm: Callable[..., tuple[Server, str]]) -> None:
    # Each task has 3 minutes, the last one kept free: a worker takes jobs of 2 minutes.
    server, prefix = slurm("--slurm-time", "3:00", "--slurm-margin-time", "60",
                           "--slurm-idle-timeout", "60")
    short = server.submit("true", estimated_runtime=5)
    worker = server.wait_job(short, "completed", SLOW)["node"]
    long = server.submit("true", estimated_runtime=600)
    wait_for(lambda: "slurm workers have 120s for jobs" in reasons(server, long),
             "the long job to say why Slurm cannot help", SLOW)
    said = reasons(server, long)
    assert f"worker {worker} has" in said and "left in its allocation" in said, \
        "the worker knows its Slurm time limit"
    assert server.job(long)["status"] == "pending"
    assert len(recorded(server, ev.WorkersRequested)) == 1
    assert len(squeue(prefix)) == 1, "only the first worker's task"


def test_a_task_slurm_ends_under_a_running_job_is_a_lost_worker(
        slurm: Callable[..., tuple[Server, str]]) -> None:
    server, prefix = slurm()
    job_id = server.submit("sleep 300")
    first = server.wait_job(job_id, "running", SLOW)["node"]
    task = next(line.split("|")[1] for line in squeue(prefix) if "RUNNING" in line)
    subprocess.run(["scancel", task], check=True, timeout=30)  # a person, or a node failure
    # Its heartbeats stop, or squeue says the task ended: whichever tells first, it is lost.
    wait_for(lambda: first in {e.worker_id for e in recorded(server, ev.WorkerLost)},
             "the worker to be lost", SLOW)
    again = wait_for(lambda: (job := server.job(job_id))["attempt"] == 2
                     and job["status"] == "running" and job, "a second attempt", SLOW)
    assert again["node"] != first
    ended = server.ends(job_id)[0]
    assert ended["outcome"] == "lost" and "worker_lost" in ended["detail"]
    server.call("POST", f"/api/queue/{job_id}/cancel")
    wait_for(lambda: first in {e.worker_id for e in recorded(server, ev.WorkerRemoved)},
             "the ended task's worker to be removed", SLOW)


def test_a_restarted_server_keeps_watching_the_requests_it_made(
        slurm: Callable[..., tuple[Server, str]]) -> None:
    server, prefix = slurm("--slurm-extra=--hold")
    job_id = server.submit("true")
    wait_for(lambda: "pending: JobHeldUser" in reasons(server, job_id), "the request", SLOW)
    assert server.proc is not None
    server.proc.terminate()
    server.proc.wait(timeout=30)
    server.start()
    wait_for(lambda: "pending: JobHeldUser" in reasons(server, job_id),
             "the new server to say what Slurm is doing", SLOW)
    assert len(recorded(server, ev.WorkersRequested)) == 1, "the same request, not a new one"
    server.call("POST", f"/api/queue/{job_id}/cancel")
    wait_for(lambda: not squeue(prefix), "its request to be cancelled", SLOW)


def test_a_partition_slurm_does_not_know_stops_the_start_with_one_line(tmp_path: Path) -> None:
    refusal = refused_start(tmp_path / "data", tmp_path / "err",
                            "--slurm-partition", "no-such-partition")
    assert refusal.code == 2
    assert refusal.stderr[-1].startswith("eventq: --slurm-partition no-such-partition: ")
