"""A workstation's first hour: defaults bounded by its GPUs, ``eventq queue limits`` to see and
change the limits, reasons that name the command which lifts them, a machine without GPUs,
and CPU jobs kept at home. The installed command against real server processes."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cluster import Cluster, clean_env
from tests.serverproc import LISTENING, end, first_line, spawn
from tests.test_cli import EVENTQ, server
from tests.test_cli_queue import Server, blocker, eq, eq_json, fails, submit, until
from tests.test_cli_users import token_of

pytestmark = pytest.mark.slow
__all__ = ["server"]

PYTHON = sys.executable
#: A log written before a new log recorded its server's limits (tests/test_golden_log.py).
UNRECORDED = Path(__file__).parent / "golden" / "unrecorded_limits"

DEFAULTS = {"max_concurrent": 5, "user_max_concurrent": 2, "team_max_concurrent": 10,
            "enable_fair_share": False, "local_job_max_concurrent": None,
            "local_gpu_max_concurrent": None}


def limits(data: Path, token: str | None = None) -> dict[str, Any]:
    shown: dict[str, Any] = eq_json(data, "queue", "limits", token=token)
    return {k: shown[k] for k in DEFAULTS}


def job_status(data: Path, job_id: str) -> dict[str, Any]:
    job: dict[str, Any] = eq_json(data, "jobs", "show", job_id)["job"]
    return job


def test_three_two_gpu_jobs_on_four_gpus_run_two_at_once(server: Server,
                                                         tmp_path: Path) -> None:
    data, _ = server
    jobs = [submit(data, "--gpus", "2", "--", *blocker(tmp_path, "go")) for _ in range(3)]
    assert [j["status"] for j in jobs] == ["running", "running", "queued"]
    assert [j["allocated_gpus"] for j in jobs[:2]] == [[0, 1], [2, 3]]
    assert "local_limit" not in [r["code"] for r in jobs[2]["reasons"]]
    assert "gpus" in [r["code"] for r in jobs[2]["reasons"]]
    status = eq(data, "jobs", "status").stdout
    assert "GPUs in use 0,1,2,3" in status
    assert "local: any number of jobs (its GPUs are the bound)" in status
    (tmp_path / "go").touch()
    until(lambda: job_status(data, jobs[2]["job_id"])["status"] == "completed",
          "the third job ran once GPUs were free")


def test_queue_limits_shows_the_defaults_changes_some_and_says_what_started(
        server: Server, tmp_path: Path) -> None:
    data, _ = server
    assert limits(data) == DEFAULTS
    table = eq(data, "queue", "limits").stdout
    for words in ("--max", "--per-user", "--per-team", "--local-jobs", "--local-gpus",
                  "--fair-share", "unlimited (its GPUs are the bound)"):
        assert words in table

    changed = eq(data, "queue", "limits", "--local-jobs", "1").stdout
    assert "no job started because of it" in changed
    first = submit(data, "--gpus", "1", "--", *blocker(tmp_path, "go"))
    held = submit(data, "--gpus", "1", "--", *blocker(tmp_path, "go"))
    assert first["status"] == "running" and held["status"] == "queued"
    assert held["reasons"] == [{"code": "local_limit", "detail": "local runs 1 of 1 jobs "
                                "(raise with `eventq queue limits --local-jobs N`)"}]

    reply = eq_json(data, "queue", "limits", "--max", "8", "--per-user", "4",
                    "--local-jobs", "2", "--fair-share", "on")
    assert {k: reply[k] for k in DEFAULTS} == {
        **DEFAULTS, "max_concurrent": 8, "user_max_concurrent": 4, "enable_fair_share": True,
        "local_job_max_concurrent": 2}
    assert reply["started"] == [{"job_id": held["job_id"], "attempt": 1, "node": "local",
                                 "gpus": [1]}]
    assert job_status(data, held["job_id"])["status"] in ("dispatched", "running")

    text = eq(data, "queue", "limits", "--local-jobs", "unlimited", "--fair-share", "off").stdout
    assert "no job started because of it" in text
    assert limits(data) == {**DEFAULTS, "max_concurrent": 8, "user_max_concurrent": 4}
    third = submit(data, "--gpus", "1", "--", *blocker(tmp_path, "go"))
    assert third["status"] == "running", "the local node is bounded by its GPUs again"
    (tmp_path / "go").touch()


def test_the_table_names_each_job_a_change_started(server: Server, tmp_path: Path) -> None:
    data, _ = server
    eq(data, "queue", "limits", "--per-user", "1")
    submit(data, "--gpus", "0", "--", *blocker(tmp_path, "go"))
    held = submit(data, "--gpus", "0", "--", *blocker(tmp_path, "go"))
    assert held["reasons"][0]["detail"] == ("admin runs 1 of 1 (raise with `eventq queue "
                                            "limits --per-user N`)")
    text = eq(data, "queue", "limits", "--per-user", "3").stdout
    assert f"started 1 job because of it: {held['job_id']} on local" in text
    (tmp_path / "go").touch()


def test_only_admins_change_limits_and_bad_values_change_nothing(server: Server) -> None:
    data, _ = server
    alice = token_of(eq(data, "users", "add", "alice", "--level", "researcher").stdout)
    assert limits(data, token=alice) == DEFAULTS, "anyone may look"
    refused = fails(data, "queue", "limits", "--max", "3", token=alice)
    assert "only admins may change the queue's limits" in refused

    for flags, named in ((["--max", "0"], "max_concurrent"),
                         (["--per-user", "-1"], "user_max_concurrent"),
                         (["--local-gpus", "0"], "local_gpu_max_concurrent"),
                         (["--max", "8", "--per-team", "0"], "team_max_concurrent")):
        said = fails(data, "queue", "limits", *flags)
        assert named in said and "(HTTP 422)" in said, said
    for flags, named in ((["--max", "eight"], "--max"), (["--local-jobs", "many"], "--local-jobs"),
                         (["--fair-share", "yes"], "--fair-share")):
        assert named in fails(data, "queue", "limits", *flags)
    assert limits(data) == DEFAULTS, "nothing changed"


def test_a_global_limit_names_its_command_and_a_team_limit_its_own(server: Server,
                                                                  tmp_path: Path) -> None:
    data, _ = server
    eq(data, "queue", "limits", "--max", "1")
    submit(data, "--gpus", "0", "--", *blocker(tmp_path, "go"))
    held = submit(data, "--gpus", "0", "--", "true")
    assert held["reasons"] == [{"code": "global_limit", "detail": "1 of 1 running (raise with "
                                "`eventq queue limits --max N`)"}]
    eq(data, "queue", "limits", "--max", "5", "--per-user", "5", "--per-team", "1",
       "--fair-share", "on")
    team = submit(data, "--gpus", "0", "--team", "vision", "--", *blocker(tmp_path, "go"))
    assert team["status"] == "running"
    second = submit(data, "--gpus", "0", "--team", "vision", "--", "true")
    assert second["reasons"] == [{"code": "team_limit", "detail": "team vision runs 1 of 1 "
                                  "(raise with `eventq queue limits --per-team N`)"}]
    (tmp_path / "go").touch()


# --- a machine without GPUs ------------------------------------------------------------


@pytest.fixture
def no_gpus(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """``eventq server --gpus 0``: its data directory and its first line."""
    data = tmp_path / "data"
    proc = spawn(data, tmp_path / "server.err", "--gpus", "0")
    try:
        line = first_line(proc, 60) or ""
        assert line.startswith(LISTENING), (line, (tmp_path / "server.err").read_text())
        yield data, line
    finally:
        end(proc)


def test_a_server_with_gpus_0_runs_cpu_jobs_and_says_how_to_run_one(
        no_gpus: tuple[Path, str]) -> None:
    data, line = no_gpus
    assert "0 GPUs" in line and "simulated" not in line
    status = eq_json(data, "jobs", "status")
    assert status["local"]["total_gpus"] == 0

    refused = eq(data, "jobs", "submit", "--", PYTHON, "-c", "print(1)", check=False)
    assert refused.returncode != 0 and refused.stdout == ""
    assert "needs 1 GPUs; the local node has 0" in refused.stderr
    assert "--gpus 0" in refused.stderr, "it says how to run a job without GPUs"

    job = submit(data, "--gpus", "0", "--", PYTHON, "-c", "print(1)")
    until(lambda: job_status(data, job["job_id"])["status"] == "completed", "the CPU job ran")
    assert eq(data, "jobs", "logs", job["job_id"]).stdout == "1\n"


def test_submit_help_shows_the_default_of_gpus() -> None:
    done = subprocess.run([EVENTQ, "jobs", "submit", "--help"], capture_output=True,
                          text=True, timeout=30, check=True, env=clean_env())
    text = " ".join(done.stdout.split())
    assert "--gpus N" in text and "(default: 1" in text and "0 for a job that needs none" in text


# --- remote workers ---------------------------------------------------------------------


def test_a_cpu_job_stays_on_the_server_unless_it_asks_for_a_worker(cluster: Cluster) -> None:
    server = cluster.server(args=("--gpus", "0"))
    worker = cluster.worker(server, "box", gpus="1xA100-80GB", labels={"kind": "cpu"})

    def placed(**job: Any) -> str:
        reply = server.call("POST", "/api/queue/submit", {"command": "true", **job})
        return str(server.wait_job(reply["job_id"], "completed")["node"])

    assert placed(gpus=0) == "local", "a CPU job does not travel"
    assert placed(gpus=0, target="worker") == worker.worker_id
    assert placed(gpus=0, worker_labels={"kind": "cpu"}) == worker.worker_id
    assert placed(gpus=1) == worker.worker_id, "auto: a worker with the GPUs takes it"


def test_workers_add_on_a_loopback_server_says_no_other_machine_can_reach_it(
        server: Server) -> None:
    data, _ = server
    shown = eq(data, "workers", "add", "gpu-box").stdout
    lines = shown.splitlines()
    warning = next(i for i, line in enumerate(lines) if "no other machine can reach" in line)
    command = next(i for i, line in enumerate(lines) if "eventq worker --url" in line)
    assert warning < command, "said before the commands, not after"
    assert "on the GPU machine" not in shown
    assert "on this machine only" in shown
    for fix in ("--host", "--advertise-url", "eventq workers token gpu-box"):
        assert fix in shown


# --- old logs keep their limits -----------------------------------------------------------


def stored(data: Path, kind: str) -> list[tuple[int, str | None, str]]:
    """(seq, job, principal) of each stored event of this type."""
    with sqlite3.connect(f"file:{data / 'events.db'}?mode=ro", uri=True) as db:
        rows = db.execute("SELECT seq, job_id, principal FROM events WHERE type = ? "
                          "ORDER BY seq", (kind,)).fetchall()
    db.close()
    return [(int(seq), job, str(who)) for seq, job, who in rows]


def test_an_old_log_keeps_the_limits_it_ran_under_and_a_new_log_records_todays(
        tmp_path: Path, server: Server) -> None:
    fresh, _ = server
    assert [who for _, _, who in stored(fresh, "limits_changed")] == ["system"]
    assert limits(fresh) == DEFAULTS

    data = tmp_path / "old"
    shutil.copytree(UNRECORDED, data)
    head = max(seq for kind in ("job_submitted", "job_reasons_changed")
               for seq, _, _ in stored(data, kind))
    proc = spawn(data, tmp_path / "old.err", "--gpus", "4xA100-80GB")
    try:
        line = first_line(proc, 60) or ""
        assert line.startswith(LISTENING), (line, (tmp_path / "old.err").read_text())
        assert limits(data)["local_job_max_concurrent"] == 1
        jobs = [job for _, job, _ in stored(data, "job_submitted")]
        until(lambda: all(job_status(data, j)["status"] == "completed" for j in jobs),
              "the old log's jobs ran, one at a time")
        assert stored(data, "limits_changed") == []
        # One local job at a time, as the log's limits say: the n-th dispatch since the
        # start comes after n attempts ended (the first one, lost while the server was down,
        # included).
        dispatched = [seq for seq, _, _ in stored(data, "attempt_dispatched") if seq > head]
        ended = [seq for seq, _, _ in stored(data, "attempt_ended")]
        assert len(dispatched) == 3 and len(ended) == 4
        assert all(sum(e < d for e in ended) >= n for n, d in enumerate(dispatched, 1))
    finally:
        end(proc)
