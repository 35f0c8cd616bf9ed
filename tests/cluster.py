"""Real ``eventq server`` and ``eventq worker`` processes on loopback, as an operator runs them.

A story starts a server (heartbeat timeout shortened) and workers with simulated GPUs,
then does what people do; ``Cluster.close`` ends every process it started, and every job
process left in a worker's directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from eventq.runner import is_ours

EVENTQ = shutil.which("eventq", path=str(Path(sys.executable).parent)) or "eventq"
# Short enough that a lost worker is seen within a test, long enough that its lease (about
# half of it) survives a heartbeat delayed by a loaded machine: at 2 s, a 1 s lease was missed.
HEARTBEAT_TIMEOUT = 4.0
T = TypeVar("T")


def wait_for(check: Callable[[], T], what: str, timeout: float = 30.0) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTQ_")}
    return {**env, **extra}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def gone(pid: int) -> bool:
    """Has the process ended (exited, or a zombie nobody has reaped yet)?"""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] == "Z"


class Server:
    """An ``eventq server`` process and an admin's calls to its API."""

    def __init__(self, data: Path, port: int, heartbeat_timeout: float,
                 args: tuple[str, ...] = ()) -> None:
        self.data, self.port, self.heartbeat_timeout = data, port, heartbeat_timeout
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = self.token = ""

    def start(self) -> None:
        (self.data / "server.json").unlink(missing_ok=True)
        self.data.mkdir(parents=True, exist_ok=True)
        with open(self.data.parent / f"{self.data.name}.out", "ab") as out:
            self.proc = subprocess.Popen(
                [EVENTQ, "server", "--data-dir", str(self.data), "--port", str(self.port),
                 "--gpus", "1xA100-80GB", "--grace", "1", *self.args], stdout=out, stderr=out,
                env=clean_env(EVENTQ_HEARTBEAT_TIMEOUT=str(self.heartbeat_timeout)))
        proc = self.proc
        wait_for(lambda: (self.data / "server.json").exists() or proc.poll() is not None,
                 "the server to start")
        assert proc.poll() is None, self.output()
        self.url = json.loads((self.data / "server.json").read_text())["url"]
        self.token = (self.data / "admin.token").read_text().strip()

    def output(self) -> str:
        return (self.data.parent / f"{self.data.name}.out").read_text()

    def call(self, method: str, path: str, body: Any = None) -> Any:
        req = urllib.request.Request(
            self.url + path, method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {self.token}",
                     "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            raw = resp.read()
            if resp.headers.get_content_type() == "application/json":
                return json.loads(raw)
            return raw.decode()

    def submit(self, command: str, gpus: int = 1, **more: Any) -> str:
        reply = self.call("POST", "/api/queue/submit",
                          {"command": command, "gpus": gpus, "target": "worker", **more})
        return str(reply["job_id"])

    def job(self, job_id: str) -> dict[str, Any]:
        found: dict[str, Any] = self.call("GET", f"/api/jobs/{job_id}")
        return found

    def wait_job(self, job_id: str, status: str, timeout: float = 20.0) -> dict[str, Any]:
        return wait_for(lambda: (job := self.job(job_id))["status"] == status and job,
                        f"job {job_id} to be {status}", timeout)

    def ends(self, job_id: str) -> list[dict[str, Any]]:
        events = self.call("GET", f"/api/jobs/{job_id}/events")["events"]
        return [e["body"] for e in events if e["type"] == "attempt_ended"]

    def worker(self, worker_id: str) -> dict[str, Any]:
        workers = self.call("GET", "/api/admin/workers")["workers"]
        found: dict[str, Any] = next(w for w in workers if w["worker_id"] == worker_id)
        return found

    def count_events(self, kind: str) -> int:
        with contextlib.closing(sqlite3.connect(f"file:{self.data / 'events.db'}?mode=ro",
                                                uri=True)) as db:
            count: int = db.execute("SELECT count(*) FROM events WHERE type = ?",
                                    (kind,)).fetchone()[0]
            return count


class Worker:
    """An ``eventq worker`` process for a worker an admin created."""

    def __init__(self, server: Server, data: Path, created: dict[str, Any],
                 url: str | None = None, wrap: tuple[str, ...] = ()) -> None:
        self.server, self.data = server, data
        self.worker_id, self.token = created["worker_id"], created["token"]
        #: Where it reaches the server (default: the server's own URL), and a command its
        #: own runs inside (such as ``ip netns exec NS``).
        self.url, self.wrap = url, wrap
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *args: str, via_env: bool = False) -> None:
        # The ledger's jobs say which node they ran on.
        env = clean_env(LEDGER_NODE=self.data.name)
        url = self.url or self.server.url
        where = ["--url", url, "--token", self.token]
        if via_env:  # as a batch script would: everything from the environment
            env.update(EVENTQ_URL=url, EVENTQ_WORKER_TOKEN=self.token)
            where = []
        before = self.connections()
        with open(self.data.with_suffix(".out"), "ab") as out:
            self.proc = subprocess.Popen(
                [*self.wrap, EVENTQ, "worker", *where, "--data-dir", str(self.data),
                 "--grace", "1", *args],
                stdout=out, stderr=out, env=env)
        wait_for(lambda: self.connections() > before, f"worker {self.worker_id} to connect")

    def output(self) -> str:
        path = self.data.with_suffix(".out")
        return path.read_text() if path.exists() else ""

    def connections(self) -> int:
        """How many times it has said it connected."""
        return self.output().count("] connected ")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=10)


class Cluster:
    """Every process a story starts, all cleaned up after it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.servers: list[Server] = []
        self.workers: list[Worker] = []

    def server(self, port: int = 0, heartbeat_timeout: float = HEARTBEAT_TIMEOUT,
               args: tuple[str, ...] = ()) -> Server:
        server = Server(self.root / f"server{len(self.servers)}", port, heartbeat_timeout, args)
        self.servers.append(server)
        server.start()
        return server

    def worker(self, server: Server, name: str, *args: str, gpus: str = "1xA100-80GB",
               worker_type: str = "persistent", labels: dict[str, str] | None = None,
               via_env: bool = False, url: str | None = None,
               wrap: tuple[str, ...] = ()) -> Worker:
        created = server.call("POST", "/api/admin/workers", {
            "name": name, "worker_type": worker_type, "labels": labels or {}})
        worker = Worker(server, self.root / name, created, url, wrap)
        self.workers.append(worker)
        worker.start("--gpus", gpus, *args, via_env=via_env)
        return worker

    def close(self) -> None:
        procs = [w.proc for w in self.workers] + [s.proc for s in self.servers]
        for proc in procs:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            if proc is not None:
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
        for pid_file in self.root.glob("*/jobs/*/*/pid"):
            with contextlib.suppress(ProcessLookupError, ValueError, PermissionError):
                pid = int(pid_file.read_text())
                if is_ours(pid, pid_file.parent):
                    os.killpg(pid, signal.SIGKILL)
