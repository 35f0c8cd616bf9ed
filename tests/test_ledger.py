"""The fault tests' ledger (tools/ledger.py) sees what really ran: its job command records
start and end with node and GPUs, and its checker catches a job or a GPU in two attempts
at once, GPUs keyed by node."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import stop
from tools.ledger import assert_no_overlaps, job_command, read_ledger


def run_attempt(ledger: Path, job_id: str, attempt: int, gpus: str, node: str | None = None,
                env_node: str | None = None, sleep: float = 0.0) -> subprocess.Popen[bytes]:
    env = {**os.environ, "EVENTQ_JOB_ID": job_id, "EVENTQ_ATTEMPT": str(attempt),
           "CUDA_VISIBLE_DEVICES": gpus}
    env.pop("LEDGER_NODE", None)
    if env_node is not None:
        env["LEDGER_NODE"] = env_node
    return subprocess.Popen(job_command(ledger, sleep, node), env=env)


def test_job_command_records_node_and_gpus(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger"
    for args in (("a", 1, "0,1", "n1", None), ("b", 1, "0,1", None, "n2"),
                 ("c", 1, "", None, None)):
        assert run_attempt(ledger, *args).wait(10) == 0
    runs = assert_no_overlaps(ledger)
    seen = {key: (run.node, run.gpus, len(run.starts), len(run.ends))
            for key, run in runs.items()}
    assert seen == {("a", 1): ("n1", (0, 1), 1, 1), ("b", 1): ("n2", (0, 1), 1, 1),
                    ("c", 1): ("local", (), 1, 1)}


def test_a_stopped_attempt_records_its_end(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger"
    proc = run_attempt(ledger, "a", 1, "0", sleep=30)
    try:
        while not ledger.exists():
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) != 0
    finally:
        stop(proc, signal.SIGKILL)
    assert read_ledger(ledger)[("a", 1)].ends


def test_overlapping_attempts_and_gpus_fail_the_check(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger"
    long = run_attempt(ledger, "a", 1, "0", node="n1", sleep=30)
    try:
        while not ledger.exists():
            time.sleep(0.01)
        for args in (("a", 2, "3", "n2"), ("b", 1, "0", "n2"), ("c", 1, "0", "n1")):
            assert run_attempt(ledger, *args).wait(10) == 0
    finally:
        stop(long)
    with pytest.raises(AssertionError) as caught:
        assert_no_overlaps(ledger)
    problems = str(caught.value).splitlines()[1:]
    assert problems == ["a: attempts 1 (on n1) and 2 (on n2) were alive at the same time",
                        "GPU 0 of n1 used by a#1 and c#1 at the same time"]


def test_an_attempt_that_never_ended_is_alive_for_good(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger"
    ledger.write_text("a 1 start 100 n1 0\n"  # SIGKILLed: no end line
                      "a 2 start 500 n1 1\na 2 end 600 n1 1\n"
                      "b 1 start 700 n1 0\nb 1 end 800 n1 0\n")
    with pytest.raises(AssertionError, match="attempts 1 \\(on n1\\) and 2"):
        assert_no_overlaps(ledger)
