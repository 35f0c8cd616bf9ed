"""What the benchmarks share: a small JSON client, waiting, percentiles, the goals report."""

from __future__ import annotations

import contextlib
import http.client
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit


def journal_less_ext4(path: Path) -> str | None:
    """The block device under ``path`` if it holds an ext4 file system without a journal,
    else None (ext4 lists each device it mounts under ``/sys/fs/ext4``, where
    ``journal_task`` reads ``<none>`` without a journal).

    There ext4 keeps an inode freed in the last 60 s (300 s while its table's block is
    unwritten) from being reused, and each file created meanwhile in that block group scans
    past every such inode (``recently_deleted`` in ``fs/ext4/ialloc.c``): a round that
    follows another's deletions pays for them at every file it creates."""
    dev = path.stat().st_dev
    try:
        device = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}").resolve().name
        task = Path(f"/sys/fs/ext4/{device}/journal_task").read_text().strip()
    except OSError:
        return None
    return device if task == "<none>" else None


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100)."""
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def loads(count: int) -> list[int]:
    """The loads to measure under: quiet, then ``count`` busy processes if asked."""
    return sorted({0, count})


def load_label(count: int) -> str:
    return "quiet" if not count else f"loaded ({count} busy process{'es' if count > 1 else ''})"


def wait_for(check: Callable[[], Any], timeout: float, what: str, step: float = 0.0005) -> Any:
    """Poll ``check()`` until it returns something truthy; bounded by ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout:.0f} s")
        time.sleep(step)


def read_stamp(path: Path) -> int | None:
    """The nanosecond timestamp a job wrote, once the whole line is there."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    return int(text) if text.endswith("\n") else None


class Api:
    """A keep-alive HTTP/1.1 connection to the server, JSON in and out."""

    def __init__(self, url: str, token: str, timeout: float = 60) -> None:
        parts = urlsplit(url)
        self.conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port,
                                               timeout=timeout)
        self.headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    def call(self, method: str, path: str, body: Any = None) -> Any:
        return self.send(method, path, None if body is None else json.dumps(body).encode())

    def send(self, method: str, path: str, data: bytes | None) -> Any:
        """A body already encoded (a timing that should not include the client's JSON)."""
        self.conn.request(method, path, body=data, headers=self.headers)
        resp = self.conn.getresponse()
        payload = resp.read()
        if resp.status not in (200, 201):
            raise RuntimeError(f"{method} {path} -> {resp.status}: {payload[:300]!r}")
        return json.loads(payload)

    def close(self) -> None:
        self.conn.close()


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL to its process group if it has not stopped within 15 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def print_goals(goals: Sequence[tuple[str, bool, str]]) -> None:
    """``goals:`` then ``[met]`` or ``[MISSED]``, the goal, and the figure, one a line."""
    print("goals:")
    for goal, met, value in goals:
        print(f"  [{'met' if met else 'MISSED'}] {goal}: {value}")


@contextlib.contextmanager
def busy(count: int) -> Iterator[None]:
    """``count`` processes that keep a core busy each, beside what is measured (the
    loaded figures of a latency benchmark, ``--load N``); all are killed when the block ends."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"],
                              stdin=subprocess.DEVNULL, start_new_session=True)
             for _ in range(count)]
    try:
        time.sleep(0.2 if procs else 0)  # let them take the CPU before anything is timed
        yield
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def child_cpu(argv: Sequence[str], env: dict[str, str] | None = None) -> tuple[bytes, float]:
    """Run ``argv`` to its end: its stdout and its CPU seconds (user + system, from its
    rusage). Fails if it exits non-zero."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env)
    assert proc.stdout is not None
    with proc.stdout:
        out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited with {proc.returncode}")
    return out, usage.ru_utime + usage.ru_stime
