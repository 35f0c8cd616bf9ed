"""A job that outlives its ``max_runtime`` is stopped with everything it started.

job-scheduler-v2 terminates only the process it started, so what that process
started in the background keeps running after a timeout. eventq signals the
attempt's whole process group: SIGTERM, then SIGKILL after the grace period, which
also reaches a grandchild that ignores SIGTERM and outlives its parent.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
from pathlib import Path

import pytest

from tests.test_cli import server
from tests.test_cli_queue import eq_json, until

pytestmark = pytest.mark.slow
__all__ = ["server"]

Server = tuple[Path, object]


def processes_with(marker: str) -> list[int]:
    """Live processes whose command line contains ``marker`` (read from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[-1].split()[0]
        except OSError:
            continue
        if marker.encode() in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


def test_a_timeout_stops_the_job_and_every_process_it_started(server: Server) -> None:
    data, _ = server
    # Unique sleep lengths mark the processes: the background one, the one that ignores
    # SIGTERM (and so outlives the job's shell), and the job's own foreground one.
    tag = f"{random.randrange(10**8, 10**9)}"
    marks = [f"300.{tag}1", f"300.{tag}2", f"300.{tag}3"]
    script = (f"(sleep {marks[0]} &) ; (trap '' TERM; sleep {marks[1]}) & "
              f"sleep {marks[2]}")
    try:
        job = eq_json(data, "jobs", "submit", "--gpus", "0", "--max-runtime", "2", "--",
                      "sh", "-c", script)
        until(lambda: all(processes_with(m) for m in marks), "the job started its processes",
              seconds=10)

        def failed() -> bool:
            shown = eq_json(data, "jobs", "show", job["job_id"])["job"]
            return bool(shown["status"] == "failed")

        until(failed, "the job failed at its max_runtime", seconds=20)
        shown = eq_json(data, "jobs", "show", job["job_id"])["job"]
        assert shown["error"] == "max_runtime of 2.0s exceeded"
        assert shown["exit_code"] is not None and shown["exit_code"] != 0
        until(lambda: not any(processes_with(m) for m in marks),
              "no process of the job is left", seconds=10)
    finally:
        for mark in marks:
            for pid in processes_with(mark):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
