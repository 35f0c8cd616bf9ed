"""The installed ``eventq`` command against a real server process."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import stop

EVENTQ = shutil.which("eventq", path=str(Path(sys.executable).parent)) or "eventq"
pytestmark = pytest.mark.slow


def eventq(data: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTQ_")}
    done = subprocess.run([EVENTQ, *args, "--data-dir", str(data)] if args[0] != "jobs"
                          else [EVENTQ, args[0], args[1], "--data-dir", str(data), *args[2:]],
                          capture_output=True, text=True, timeout=30, env=env)
    if check and done.returncode != 0:
        raise AssertionError(f"eventq {args} failed: {done.stderr}")
    return done


def as_json(done: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(done.stdout)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[Path, subprocess.Popen[str]]]:
    data = tmp_path / "data"
    proc = subprocess.Popen([EVENTQ, "server", "--data-dir", str(data), "--port", "0",
                             "--gpus", "4xA100-80GB", "--grace", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(300):
            if (data / "server.json").exists() or proc.poll() is not None:
                break
            time.sleep(0.02)
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        yield data, proc
    finally:
        stop(proc)
        for pid_file in data.glob("jobs/*/*/pid"):
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.killpg(int(pid_file.read_text()), signal.SIGKILL)


def test_a_user_submits_lists_shows_and_cancels(server: tuple[Path, Any],
                                                tmp_path: Path) -> None:
    data, _ = server
    first = as_json(eventq(data, "jobs", "submit", "--gpus", "3", "--format", "json", "--",
                           "sleep", "300"))
    assert first["status"] == "running" and first["allocated_gpus"] == [0, 1, 2]
    second = as_json(eventq(data, "jobs", "submit", "--gpus", "2", "--format", "json", "--",
                            "true"))
    assert second["status"] == "queued"
    assert [r["code"] for r in second["reasons"]] == ["gpus"]

    listed = as_json(eventq(data, "jobs", "list", "--format", "json"))
    assert [(j["job_id"], j["status"]) for j in listed] == [
        (first["job_id"], "running"), (second["job_id"], "pending")]
    assert listed[1]["reasons"][0]["detail"] == "needs 2, node local has 1 free"
    table = eventq(data, "jobs", "list").stdout
    assert first["job_id"] in table and "needs 2, node local has 1 free" in table

    shown = as_json(eventq(data, "jobs", "show", first["job_id"], "--format", "json"))
    assert [e["type"] for e in shown["events"]][:3] == [
        "job_submitted", "gpus_allocated", "attempt_dispatched"]

    cancelled = as_json(eventq(data, "jobs", "cancel", first["job_id"], "--format", "json"))
    assert cancelled == {"success": True, "job_id": first["job_id"], "status": "cancelled",
                         "process_stopped": True, "was_running": True}
    for _ in range(300):
        done = as_json(eventq(data, "jobs", "list", "-a", "--format", "json",
                              "-o", "job_id,status"))
        if {"job_id": second["job_id"], "status": "completed"} in done:
            break
        time.sleep(0.05)
    assert {"job_id": second["job_id"], "status": "completed"} in done


def test_the_environment_and_directory_of_the_submitter_are_sent(
        server: tuple[Path, Any], tmp_path: Path) -> None:
    data, _ = server
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "MY_SETTING": "from-the-shell"}
    done = subprocess.run([EVENTQ, "jobs", "submit", "--data-dir", str(data), "--gpus", "0",
                           "--format", "json", "--",
                           "sh", "-c", "pwd > out; echo $MY_SETTING >> out"],
                          cwd=work, env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    for _ in range(300):
        if (work / "out").exists() and len((work / "out").read_text().split()) == 2:
            break
        time.sleep(0.02)
    assert (work / "out").read_text().split() == [str(work), "from-the-shell"]


def test_text_that_is_not_utf8_is_named_and_the_rest_of_the_shell_is_sent(
        server: tuple[Path, Any], tmp_path: Path) -> None:
    """A shell variable holding bytes of another encoding (Latin-1, a file name's bytes):
    every submission from that shell was refused as "request body is not valid JSON". The
    variable is left out, saying so; a command word of such bytes is named, nothing sent."""
    data, _ = server
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environb.items() if not k.startswith(b"EVENTQ_")}
    env.update({b"LATIN1_SETTING": b"caf\xe9", b"MY_SETTING": b"from-the-shell"})
    done = subprocess.run([EVENTQ, "jobs", "submit", "--data-dir", str(data), "--gpus", "0",
                           "--", "sh", "-c", "echo $MY_SETTING > out"],
                          cwd=work, env=env, capture_output=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert b"eventq: not exported, not UTF-8 text: LATIN1_SETTING\n" in done.stderr
    for _ in range(300):
        if (work / "out").exists() and (work / "out").read_text():
            break
        time.sleep(0.02)
    assert (work / "out").read_text() == "from-the-shell\n"

    before = as_json(eventq(data, "jobs", "list", "--format", "json"))
    bad = subprocess.run([EVENTQ, "jobs", "submit", "--data-dir", str(data), "--gpus", "0",
                          "--", "echo", b"caf\xe9"], env=env, capture_output=True, timeout=30)
    assert bad.returncode != 0
    assert b"eventq: command[1] is not UTF-8 text (caf\\xe9)" in bad.stderr, bad.stderr
    assert as_json(eventq(data, "jobs", "list", "--format", "json")) == before


def test_bad_input_gets_a_message_and_a_nonzero_exit(server: tuple[Path, Any]) -> None:
    data, _ = server
    too_many = eventq(data, "jobs", "submit", "--gpus", "9", "--", "true", check=False)
    assert too_many.returncode != 0
    assert "needs 9 GPUs; the local node has 4" in too_many.stderr
    assert "[field: gpus]" in too_many.stderr
    missing = eventq(data, "jobs", "show", "nosuchjob", check=False)
    assert missing.returncode != 0 and "no job nosuchjob" in missing.stderr
    no_command = eventq(data, "jobs", "submit", check=False)
    assert no_command.returncode != 0 and "no command given" in no_command.stderr


def test_replay_reads_the_log_with_the_server_running_or_not(
        server: tuple[Path, subprocess.Popen[str]]) -> None:
    data, proc = server
    job = as_json(eventq(data, "jobs", "submit", "--gpus", "1", "--format", "json", "--", "true"))
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=10)
    assert "shutdown" in err and "last_seq=" in err, "the shutdown says what it did"
    verified = as_json(eventq(data, "replay", "verify", "--format", "json"))
    assert verified["ok"] is True and verified["problems"] == []
    lines = eventq(data, "replay", "show", "--job", job["job_id"], "--format", "json").stdout
    types = [json.loads(line)["type"] for line in lines.splitlines()]
    assert types[0] == "job_submitted" and "attempt_dispatched" in types
    dispatched = next(json.loads(line)["seq"] for line in lines.splitlines()
                      if json.loads(line)["type"] == "attempt_dispatched")
    state = as_json(eventq(data, "replay", "state", "--at", str(dispatched), "--format", "json"))
    assert state["gpus"]["local"] == {"0": f"{job['job_id']}#1"}
    assert state["by_status"] == {"dispatched": 1}


def test_without_a_server_the_cli_says_how_to_start_one(tmp_path: Path) -> None:
    done = eventq(tmp_path / "empty", "jobs", "list", check=False)
    assert done.returncode == 2 and "no server found" in done.stderr
    assert "eventq server" in done.stderr


def test_a_reader_that_stops_early_gets_no_traceback(tmp_path: Path) -> None:
    """``eventq replay show | head``: the pipe closes before the output ends."""
    data = tmp_path / "data"
    data.mkdir()
    for name in ("events.db", "events.db-wal", "events.db-shm"):
        shutil.copy(Path(__file__).parent / "golden" / name, data / name)
    read, write = os.pipe()
    os.close(read)  # nobody will read: the first write fails
    done = subprocess.run([EVENTQ, "replay", "show", "--data-dir", str(data)], stdout=write,
                          stderr=subprocess.PIPE, text=True, timeout=60)
    os.close(write)
    assert done.returncode == 141 and done.stderr == ""
