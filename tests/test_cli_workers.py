"""``eventq workers …`` as an admin uses it, against a real server and a real worker."""

from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.cluster import EVENTQ, Cluster, Server, clean_env, wait_for
from tests.helpers import stop

pytestmark = pytest.mark.slow


def workers(server: Server, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([EVENTQ, "workers", *args, "--data-dir", str(server.data)],
                          capture_output=True, text=True, timeout=30, env=clean_env())
    if check and done.returncode != 0:
        raise AssertionError(f"eventq workers {args} failed: {done.stderr}")
    return done


def as_json(done: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(done.stdout)


def test_an_admin_adds_a_worker_and_its_printed_command_connects_it(cluster: Cluster,
                                                                    tmp_path: Path) -> None:
    server = cluster.server()
    added = workers(server, "add", "gpu-box-1", "--persistent",
                    "--labels", "gpu_type=a100,location=us-west").stdout
    lines = added.splitlines()
    worker_id = next(line.split(": ")[1] for line in lines if line.startswith("worker_id: "))
    token = next(line for line in lines if line.startswith("wt_"))
    command = next(line.strip() for line in lines if line.strip().startswith("eventq worker"))
    assert f"--token {token}" in command and "--persistent" in command

    argv = shlex.split(command)
    agent = subprocess.Popen([EVENTQ, *argv[1:], "--gpus", "2xA100-80GB",
                              "--data-dir", str(tmp_path / "agent")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env=clean_env())
    try:
        wait_for(lambda: server.worker(worker_id)["status"] == "idle", "the worker to connect")
        listed = as_json(workers(server, "list", "--format", "json"))
        assert [(w["name"], w["status"], w["labels"], len(w["gpus"])) for w in listed] == [
            ("gpu-box-1", "idle", {"gpu_type": "a100", "location": "us-west"}, 2)]
        table = workers(server, "list").stdout
        assert worker_id in table and "2xA100 (simulated)" in table
        assert "gpu_type=a100,location=us-west" in table
    finally:
        stop(agent)


def test_drain_rotate_and_remove_a_connected_worker(cluster: Cluster) -> None:
    server = cluster.server()
    worker = cluster.worker(server, "box")

    drained = workers(server, "drain", "box").stdout
    assert "draining box" in drained and "takes no new job" in drained
    assert server.worker(worker.worker_id)["status"] == "draining"
    refused = workers(server, "rm", "box", check=False)
    assert refused.returncode != 0
    assert "is online" in refused.stderr and "force=true" in refused.stderr

    rotated = as_json(workers(server, "token", worker.worker_id, "--format", "json"))
    assert rotated["worker_id"] == worker.worker_id and rotated["token"] != worker.token
    assert worker.proc is not None and worker.proc.wait(timeout=15) != 0, \
        "the old token's connection is closed and the worker says why"

    assert "removed worker" in workers(server, "rm", worker.worker_id, "--force").stdout
    assert as_json(workers(server, "list", "--format", "json")) == []


def test_mistakes_get_a_clear_message_and_a_non_zero_exit(cluster: Cluster) -> None:
    server = cluster.server()
    made = as_json(workers(server, "add", "spot", "--ephemeral", "--format", "json"))
    assert made["name"] == "spot" and "--persistent" not in made["connection_command"]

    again = workers(server, "add", "spot", check=False)
    assert again.returncode != 0 and "already exists" in again.stderr
    unknown = workers(server, "drain", "nosuch", check=False)
    assert unknown.returncode != 0 and "no worker nosuch" in unknown.stderr
    bad = workers(server, "add", "x", "--labels", "gpu_type", check=False)
    assert bad.returncode != 0 and "KEY=VALUE" in bad.stderr
    assert as_json(workers(server, "list", "--format", "json"))[0]["worker_type"] == "ephemeral"
