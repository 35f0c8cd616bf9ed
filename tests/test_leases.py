"""Never twice, under a worker's faults: the lease and the watchdog, with real processes.

Each story runs a real ``eventq server`` and ``eventq worker`` processes, breaks a worker
as operators and networks do (``kill -9``, ``SIGSTOP``, a rotated token, a forced removal,
a network partition between two network namespaces), and then reads the ledger that the
jobs wrote themselves (``tools/ledger.py``): no job had two attempts alive at once and no
GPU was held by two. A job's end is what its process group says: a watcher outside the
job notes the moment nothing of the group is left, since a SIGKILLed job writes no end.

The offline timeout is 5 s and each agent's grace 1 s, so (``eventq.leases``) a lease runs
3.5 s past the last answered heartbeat and the watchdog's SIGKILL comes 1 s after its
SIGTERM: 0.5 s before the orchestrator gives the attempt up.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from eventq import procgroup
from tests.cluster import Cluster, Server, Worker, free_port, wait_for
from tools.ledger import assert_no_overlaps, job_command, read_ledger

pytestmark = pytest.mark.slow
OFFLINE = 5.0
#: Long enough to outlive every fault a story makes; the runs that matter are stopped.
FIRST_RUN = 60.0


class GroupWatch(threading.Thread):
    """Writes an attempt's ``end`` to the ledger when nothing of its process group is left.

    Polled, so the stamp is a little after the real end: it can only report an overlap
    that did not happen, never hide one that did.
    """

    def __init__(self, ledger: Path, directory: Path, node: str) -> None:
        super().__init__(daemon=True)
        self.ledger, self.directory, self.node = ledger, directory, node
        self.pgid = int(wait_for(lambda: _read(directory / "pid"), f"{directory}/pid"))
        self.ended = threading.Event()
        self.start()

    def run(self) -> None:
        while procgroup.alive(self.pgid):
            time.sleep(0.005)
        stamp = time.time_ns()
        job_id, attempt = self.directory.parent.name, self.directory.name
        with open(self.ledger, "a") as out:
            out.write(f"{job_id} {attempt} end {stamp} {self.node} 0\n")
        self.ended.set()


def _read(path: Path) -> str:
    with contextlib.suppress(FileNotFoundError):
        return path.read_text().strip()
    return ""


@dataclass
class Story:
    server: Server
    ledger: Path

    def submit(self, linger: float = 0.0) -> str:
        command = job_command(self.ledger, 0.5, linger=linger, first=FIRST_RUN)
        return self.server.submit(shlex.join(command))

    def running_on(self, worker: Worker, job: str) -> GroupWatch:
        """Wait until attempt 1 of ``job`` runs on ``worker``; watch its process group."""
        assert self.server.wait_job(job, "running")["node"] == worker.worker_id
        wait_for(lambda: (job, 1) in read_ledger(self.ledger), "attempt 1 to start")
        return GroupWatch(self.ledger, worker.data / "jobs" / job / "1", worker.data.name)

    def ran_once_then_again(self, job: str, first: GroupWatch) -> None:
        """Attempt 1 was stopped before attempt 2 started, and attempt 2 ran to the end."""
        done = self.server.wait_job(job, "completed", timeout=30)
        assert done["attempt"] == 2
        assert first.ended.wait(10)
        runs = assert_no_overlaps(self.ledger)
        assert sorted(runs) == [(job, 1), (job, 2)]
        assert [e["outcome"] for e in self.server.ends(job)] == ["lost", "exited"]


@pytest.fixture
def story(cluster: Cluster, tmp_path: Path) -> Story:
    return Story(cluster.server(port=free_port(), heartbeat_timeout=OFFLINE),
                 tmp_path / "ledger")


def test_an_agent_killed_and_restarted_never_runs_attempt_2_beside_attempt_1(
        cluster: Cluster, story: Story) -> None:
    """Defect 2: one GPU; the job takes 6 s to leave after SIGTERM (longer than the grace)."""
    worker = cluster.worker(story.server, "box")
    job = story.submit(linger=6.0)
    first = story.running_on(worker, job)

    worker.kill9()
    wait_for(lambda: story.server.count_events("worker_lost"), "the worker to be lost",
             timeout=15)
    worker.start("--gpus", "1xA100-80GB")
    story.ran_once_then_again(job, first)
    assert (worker.data / "jobs" / job / "1" / "fenced").exists(), "its watchdog stopped it"


def test_a_frozen_agent_s_job_is_stopped_by_its_watchdog_and_runs_once_elsewhere(
        cluster: Cluster, story: Story) -> None:
    frozen = cluster.worker(story.server, "frozen")
    job = story.submit(linger=6.0)
    first = story.running_on(frozen, job)
    cluster.worker(story.server, "other")

    assert frozen.proc is not None
    frozen.proc.send_signal(signal.SIGSTOP)
    try:
        story.ran_once_then_again(job, first)
        assert (frozen.data / "jobs" / job / "1" / "fenced").exists()
    finally:
        frozen.proc.send_signal(signal.SIGCONT)
    # Woken, the agent learns it was given up, and the job stays done.
    wait_for(lambda: frozen.connections() >= 2, "the frozen agent to reconnect", timeout=30)
    assert story.server.job(job)["status"] == "completed"
    assert_no_overlaps(story.ledger)


def test_a_freeze_shorter_than_the_lease_stops_nothing(cluster: Cluster,
                                                       story: Story) -> None:
    worker = cluster.worker(story.server, "box")
    ledger = story.ledger
    job = story.server.submit(shlex.join(job_command(ledger, 4.0)))
    story.server.wait_job(job, "running")
    wait_for(lambda: (job, 1) in read_ledger(ledger), "the job to start")

    assert worker.proc is not None
    worker.proc.send_signal(signal.SIGSTOP)
    time.sleep(1.5)
    worker.proc.send_signal(signal.SIGCONT)
    assert story.server.wait_job(job, "completed", timeout=30)["attempt"] == 1
    assert sorted(assert_no_overlaps(ledger)) == [(job, 1)]
    assert story.server.count_events("worker_lost") == 0
    assert "lease_lapsed" not in worker.output()


def test_a_worker_removed_by_force_stops_its_job_before_it_runs_elsewhere(
        cluster: Cluster, story: Story) -> None:
    removed = cluster.worker(story.server, "removed")
    job = story.submit(linger=6.0)
    first = story.running_on(removed, job)
    cluster.worker(story.server, "other")

    story.server.call("DELETE", f"/api/admin/workers/{removed.worker_id}?force=true")
    assert removed.proc is not None
    assert removed.proc.wait(timeout=15) != 0, "its token works no more"
    assert first.ended.is_set(), "the agent waits for what it stops before it exits"
    story.ran_once_then_again(job, first)


# --- partitions: the worker in its own network namespace ------------------------------


@dataclass
class Link:
    """A veth pair between this namespace (``host``) and the worker's (``inside``)."""

    ns: str
    host_if: str
    host_ip: str
    inside_ip: str

    def cut(self) -> None:
        _ip("link", "set", self.host_if, "down")

    def mend(self) -> None:
        _ip("link", "set", self.host_if, "up")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@pytest.fixture
def link() -> Iterator[Link]:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    ns, tag = f"eqt{os.getpid()}", f"{os.getpid() % 100000}"
    made = Link(ns, f"eqh{tag}", f"10.231.{os.getpid() % 250}.1",
                f"10.231.{os.getpid() % 250}.2")
    try:
        _ip("netns", "add", ns)
    except (FileNotFoundError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot make a network namespace here: {exc}")
    try:
        _ip("link", "add", made.host_if, "type", "veth", "peer", "name", f"eqi{tag}",
            "netns", ns)
        _ip("addr", "add", f"{made.host_ip}/30", "dev", made.host_if)
        _ip("link", "set", made.host_if, "up")
        _ip("-n", ns, "addr", "add", f"{made.inside_ip}/30", "dev", f"eqi{tag}")
        _ip("-n", ns, "link", "set", f"eqi{tag}", "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        yield made
    finally:
        subprocess.run(["ip", "link", "del", made.host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _partitioned(cluster: Cluster, link: Link, tmp_path: Path) -> tuple[Story, Worker]:
    server = cluster.server(port=free_port(), heartbeat_timeout=OFFLINE,
                            args=("--host", link.host_ip, "--insecure"))
    story = Story(server, tmp_path / "ledger")
    far = cluster.worker(server, "far", url=server.url, wrap=("ip", "netns", "exec", link.ns))
    return story, far


def test_a_partition_longer_than_the_lease_fences_the_job_and_it_runs_once_elsewhere(
        cluster: Cluster, link: Link, tmp_path: Path) -> None:
    story, far = _partitioned(cluster, link, tmp_path)
    job = story.submit(linger=6.0)
    first = story.running_on(far, job)
    cluster.worker(story.server, "near")

    link.cut()
    try:
        story.ran_once_then_again(job, first)
        assert (far.data / "jobs" / job / "1" / "fenced").exists()
    finally:
        link.mend()
    wait_for(lambda: far.connections() >= 2, "the far worker to come back", timeout=30)
    assert story.server.job(job)["status"] == "completed"
    assert_no_overlaps(story.ledger)


def test_a_partition_shorter_than_the_lease_stops_nothing(cluster: Cluster, link: Link,
                                                         tmp_path: Path) -> None:
    story, far = _partitioned(cluster, link, tmp_path)
    job = story.server.submit(shlex.join(job_command(story.ledger, 5.0)))
    story.server.wait_job(job, "running")
    wait_for(lambda: (job, 1) in read_ledger(story.ledger), "the job to start")

    link.cut()
    time.sleep(1.5)
    link.mend()
    assert story.server.wait_job(job, "completed", timeout=30)["attempt"] == 1
    assert sorted(assert_no_overlaps(story.ledger)) == [(job, 1)]
    assert story.server.count_events("worker_lost") == 0
    assert "lease_lapsed" not in far.output()
