"""A real ``eventq server`` process for tests: started, spoken to over HTTP, stopped.

Its stderr goes to a file (a pipe nobody reads could fill and stall it); every process is
waited for, whatever the test's outcome.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

EVENTQ = shutil.which("eventq", path=str(Path(sys.executable).parent)) or "eventq"
LISTENING = "eventq server on "


def clean_env() -> dict[str, str]:
    """The caller's environment without EVENTQ_* settings (a developer's own server)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("EVENTQ_")}


def eventq(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EVENTQ, *args], capture_output=True, text=True, timeout=60,
                          env=clean_env(), check=False)


def wait_until(check: Callable[[], object], what: str, seconds: float = 30) -> None:
    """Poll ``check()`` every 20 ms until it is true; fail after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.02)


def server_argv(data_dir: Path, *extra: str) -> list[str]:
    """``extra`` flags come last, so they win (``--port 8123``)."""
    return [EVENTQ, "server", "--data-dir", str(data_dir), "--port", "0",
            "--gpus", "2xA100-80GB", "--grace", "1", *extra]


def spawn(data_dir: Path, stderr: Path, *extra: str) -> subprocess.Popen[str]:
    with stderr.open("w") as err:
        return subprocess.Popen(server_argv(data_dir, *extra), stdout=subprocess.PIPE,
                                stderr=err, text=True, env=clean_env(),
                                start_new_session=True)


def end(proc: subprocess.Popen[str]) -> int:
    """SIGTERM, then SIGKILL to its group after 15 s; always reaped, pipes closed."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    if proc.stdout is not None:
        proc.stdout.close()
    return proc.returncode


def first_line(proc: subprocess.Popen[str], seconds: float) -> str | None:
    """The first stdout line, or None if the process ends (or the time runs out) first."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        if not selector.select(seconds):
            return None
        return proc.stdout.readline() or None


@dataclass
class Server:
    """A running server: its URL and the admin token it wrote."""

    proc: subprocess.Popen[str]
    url: str
    token: str

    def call(self, method: str, path: str, body: Any = None,
             timeout: float = 30) -> tuple[int, Any]:
        parts = urlsplit(self.url)
        conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port,
                                          timeout=timeout)
        try:
            conn.request(method, path, body=None if body is None else json.dumps(body),
                         headers={"Authorization": f"Bearer {self.token}",
                                  "Content-Type": "application/json"})
            resp = conn.getresponse()
            payload = resp.read()
            if resp.getheader("Content-Type", "").startswith("application/json"):
                return resp.status, json.loads(payload)
            return resp.status, payload.decode()
        finally:
            conn.close()


@contextlib.contextmanager
def running(data_dir: Path, stderr: Path) -> Iterator[Server]:
    """A server on ``data_dir`` until the block ends (stopped with SIGTERM)."""
    proc = spawn(data_dir, stderr)
    try:
        line = first_line(proc, 60)
        if line is None or not line.startswith(LISTENING):
            raise AssertionError(f"the server did not start: {line!r} {stderr.read_text()}")
        url = line[len(LISTENING):].split()[0]
        yield Server(proc, url, (data_dir / "admin.token").read_text().strip())
    finally:
        end(proc)


@dataclass
class Refusal:
    code: int
    stderr: list[str]


def refused_start(data_dir: Path, stderr: Path, *extra: str, seconds: float = 30) -> Refusal:
    """Start a server that must refuse: it exits non-zero without ever listening."""
    proc = spawn(data_dir, stderr, *extra)
    started = time.monotonic()
    try:
        line = first_line(proc, seconds)
        if line is not None and line.startswith(LISTENING):
            raise AssertionError(f"the server started: {line.strip()}")
        try:
            proc.wait(max(1.0, seconds - (time.monotonic() - started)))
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the server neither started nor stopped within {seconds} s: "
                                 f"{stderr.read_text()!r}") from None
    finally:
        end(proc)
    return Refusal(proc.returncode, [ln for ln in stderr.read_text().splitlines() if ln])
