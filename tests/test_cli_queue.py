"""The queue commands of seed 000 (``eventq jobs …``), run as a user runs them: the installed
command against a real server process with a simulated inventory of 4 GPUs."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.test_cli import EVENTQ, as_json, server

pytestmark = pytest.mark.slow
__all__ = ["server"]

Server = tuple[Path, "subprocess.Popen[str]"]


def eq(data: Path, *args: str, token: str | None = None, check: bool = True,
       cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``eventq GROUP ACTION --data-dir DATA [--token T] REST…`` (REST may hold ``-- CMD``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTQ_")}
    argv = [EVENTQ, *args[:2], "--data-dir", str(data),
            *(["--token", token] if token else []), *args[2:]]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, env=env, cwd=cwd)
    if check and done.returncode != 0:
        raise AssertionError(f"eventq {' '.join(args)} failed ({done.returncode}): {done.stderr}")
    return done


def eq_json(data: Path, *args: str, token: str | None = None) -> Any:
    return as_json(eq(data, *args[:2], "--format", "json", *args[2:], token=token))


def fails(data: Path, *args: str, token: str | None = None) -> str:
    """Runs a command that must fail; its stderr."""
    done = eq(data, *args, token=token, check=False)
    assert done.returncode != 0, f"eventq {args} should have failed: {done.stdout}"
    assert done.stdout == "", "a refusal prints nothing on stdout"
    return done.stderr


def until(check: Callable[[], bool], what: str, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.05)


def blocker(tmp: Path, name: str) -> list[str]:
    """A command that runs until ``tmp/name`` exists."""
    return ["sh", "-c", f"while [ ! -e {tmp}/{name} ]; do sleep 0.05; done"]


def submit(data: Path, *args: str, token: str | None = None) -> dict[str, Any]:
    reply: dict[str, Any] = eq_json(data, "jobs", "submit", *args, token=token)
    return reply


def status_of(data: Path, job_id: str) -> str:
    job: dict[str, Any] = eq_json(data, "jobs", "show", job_id)["job"]
    return str(job["status"])


def becomes(data: Path, job_id: str, status: str) -> Callable[[], bool]:
    return lambda: status_of(data, job_id) == status


def test_a_dry_run_says_where_it_would_run_or_why_it_would_wait_and_records_nothing(
        server: Server, tmp_path: Path) -> None:
    data, _ = server
    free = eq(data, "jobs", "submit", "--gpus", "2", "--dry-run", "--", "true").stdout
    assert "would start now on local GPUs 0,1" in free and "nothing was recorded" in free

    eq(data, "queue", "limits", "--local-jobs", "1")
    running = submit(data, "--gpus", "3", "--max-runtime", "600", "--", *blocker(tmp_path, "a"))
    would = submit(data, "--gpus", "2", "--dry-run", "--", "true")
    assert would["dry_run"] is True and would["job_id"] is None
    assert would["status"] == "queued"
    assert {r["code"] for r in would["reasons"]} == {"local_limit", "gpus"}
    assert would["estimated_start"] is not None, "the running job's max_runtime bounds it"
    text = eq(data, "jobs", "submit", "--gpus", "2", "--dry-run", "--", "true").stdout
    assert "would wait in the queue" in text
    assert "waits on local_limit: local runs 1 of 1 jobs (raise with" in text
    assert "estimated start: " in text

    no_wait = eq(data, "jobs", "submit", "--gpus", "2", "--dry-run", "--no-wait", "--", "true",
                 check=False)
    assert no_wait.returncode == 3 and "would be rejected" in no_wait.stdout
    listed = eq_json(data, "jobs", "list", "-a", "-o", "job_id")
    assert listed == [{"job_id": running["job_id"]}], "a dry run records no job"
    (tmp_path / "a").touch()


def test_a_job_from_a_named_config_or_a_config_file_with_team_cost_and_approval(
        server: Server, tmp_path: Path) -> None:
    data, _ = server
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"steps": 10}))
    blocked = submit(data, "--config", str(config), "--team", "vision", "--requires-approval",
                     "--estimated-cost", "250", "--gpus", "0", "--", "true")
    assert blocked["status"] == "blocked"
    shown = eq_json(data, "jobs", "show", blocked["job_id"])
    assert shown["job"]["team"] == "vision"
    spec = shown["events"][0]["body"]["job"]
    assert (spec["config"], spec["estimated_cost"], spec["requires_approval"]) == (
        {"steps": 10}, 250.0, True)

    missing = fails(data, "jobs", "submit", "--config", str(tmp_path / "nope.json"))
    assert "cannot read --config" in missing and "nope.json" in missing
    config.write_text("[1, 2]")
    assert "must hold a JSON object" in fails(data, "jobs", "submit", "--config", str(config))
    unknown = fails(data, "jobs", "submit", "--config-name", "other", "--gpus", "0")
    assert "unknown config_name 'other'" in unknown and "[field: config_name]" in unknown

    (data / "configs").mkdir()
    (data / "configs" / "my-config.json").write_text(json.dumps({"lr": 3e-4}))
    named = submit(data, "--config-name", "my-config", "--gpus", "0", "--",
                   "sh", "-c", f'cat "$CONFIG_PATH" > {tmp_path}/seen')
    until(lambda: status_of(data, named["job_id"]) in ("completed", "failed"), "the job ran")
    assert (tmp_path / "seen").read_text() != "", "$CONFIG_PATH names the config's file"
    assert json.loads((tmp_path / "seen").read_text()) == {"lr": 3e-4}
    assert status_of(data, named["job_id"]) == "completed"


def test_status_breaks_the_queue_down_as_seed_000_shows_it(server: Server,
                                                           tmp_path: Path) -> None:
    data, _ = server
    submit(data, "--gpus", "2", "--", *blocker(tmp_path, "b"))
    submit(data, "--gpus", "3", "--", "true")
    stats = eq_json(data, "jobs", "status")
    assert (stats["queue_depth"], stats["running"]) == (1, 1)
    assert stats["by_user"] == {"admin": 2}
    assert stats["local"]["allocated_gpus"] == [0, 1]
    assert stats["local"]["available_gpus"] == [2, 3]
    assert (stats["local"]["running_jobs"], stats["local"]["pending_jobs"]) == (1, 1)
    text = eq(data, "jobs", "status").stdout
    assert "1 waiting, 1 running" in text
    assert "GPUs in use 0,1, free 2,3 of 4 (simulated)" in text
    assert "local: any number of jobs (its GPUs are the bound), all its GPUs" in text
    (tmp_path / "b").touch()


def test_position_priority_hold_and_release_move_a_waiting_job(server: Server,
                                                               tmp_path: Path) -> None:
    data, _ = server
    eq(data, "queue", "limits", "--local-jobs", "1")
    running = submit(data, "--gpus", "0", "--", *blocker(tmp_path, "c"))
    early = submit(data, "--gpus", "0", "--", "true")
    late = submit(data, "--gpus", "0", "--", "true")
    place = eq_json(data, "jobs", "position", late["job_id"])
    assert (place["position"], place["queue_depth"]) == (2, 2)
    assert [r["code"] for r in place["reasons"]] == ["local_limit"]
    text = eq(data, "jobs", "position", late["job_id"]).stdout
    assert f"{late['job_id']} is pending: position 2 of 2" in text
    assert "waits on local_limit" in text and "estimated start" in text

    assert "priority set to 90" in eq(data, "jobs", "priority", late["job_id"], "90").stdout
    assert eq_json(data, "jobs", "position", late["job_id"])["position"] == 1
    held = eq_json(data, "jobs", "hold", late["job_id"])
    assert held["status"] == "held"
    assert "not in the queue" in eq(data, "jobs", "position", late["job_id"]).stdout
    assert eq_json(data, "jobs", "position", early["job_id"])["position"] == 1
    assert eq_json(data, "jobs", "release", late["job_id"])["status"] == "pending"
    eq(data, "jobs", "priority", late["job_id"], "--clear")
    assert eq_json(data, "jobs", "position", late["job_id"])["position"] == 2

    assert "cannot hold job" in fails(data, "jobs", "hold", running["job_id"])
    assert "give a priority" in fails(data, "jobs", "priority", late["job_id"])
    assert "between 0 and 1000" in fails(data, "jobs", "priority", late["job_id"], "5000")
    assert "no job nosuch" in fails(data, "jobs", "position", "nosuch")
    (tmp_path / "c").touch()


def test_an_admin_approves_one_blocked_job_and_rejects_another(server: Server) -> None:
    data, _ = server
    wanted = submit(data, "--requires-approval", "--gpus", "0", "--", "true")
    costly = submit(data, "--requires-approval", "--gpus", "0", "--", "true")
    place = eq_json(data, "jobs", "position", wanted["job_id"])
    assert place["status"] == "blocked" and place["reasons"][0]["code"] == "approval"

    assert "approved: now" in eq(data, "jobs", "approve", wanted["job_id"]).stdout
    until(lambda: status_of(data, wanted["job_id"]) == "completed", "the approved job ran")
    rejected = eq_json(data, "jobs", "reject", costly["job_id"], "--reason", "over budget")
    assert rejected["status"] == "rejected"
    shown = eq_json(data, "jobs", "show", costly["job_id"])
    assert shown["job"]["recorded_reasons"] == [{"code": "rejected", "detail": "over budget"}]

    again = fails(data, "jobs", "approve", costly["job_id"])
    assert "cannot approve job" in again and "it is rejected" in again


def test_retry_one_failed_job_then_every_failed_job_once_the_cause_is_fixed(
        server: Server, tmp_path: Path) -> None:
    data, _ = server
    needs_fix = ["sh", "-c", f"test -e {tmp_path}/fixed"]
    jobs = [submit(data, "--gpus", "0", "--", *needs_fix)["job_id"] for _ in range(2)]
    for job_id in jobs:
        until(becomes(data, job_id, "failed"), "the job failed")

    one = eq_json(data, "jobs", "retry", jobs[0])
    assert one["job_id"] == jobs[0]
    until(lambda: eq_json(data, "jobs", "show", jobs[0])["job"]["attempt"] == 2
          and status_of(data, jobs[0]) == "failed", "the retry ran and failed again")

    (tmp_path / "fixed").touch()
    text = eq(data, "jobs", "retry", "--status", "failed").stdout
    assert text.startswith("retried 2 failed jobs")
    for job_id in jobs:
        until(becomes(data, job_id, "completed"), "the retried job completed")
    assert [eq_json(data, "jobs", "show", j)["job"]["attempt"] for j in jobs] == [3, 2]

    assert "cannot retry job" in fails(data, "jobs", "retry", jobs[0])
    assert "give a job id, or --status failed" in fails(data, "jobs", "retry")


def test_cancel_all_pending_leaves_the_running_job_then_cancel_all_stops_it(
        server: Server, tmp_path: Path) -> None:
    data, _ = server
    eq(data, "queue", "limits", "--local-jobs", "1")
    running = submit(data, "--gpus", "1", "--", *blocker(tmp_path, "d"))
    waiting = [submit(data, "--gpus", "1", "--", "true")["job_id"] for _ in range(2)]
    pending = eq_json(data, "jobs", "cancel", "--all", "--status", "pending")
    assert pending["cancelled"] == 2 and sorted(pending["job_ids"]) == sorted(waiting)
    assert status_of(data, running["job_id"]) == "running"

    text = eq(data, "jobs", "cancel", "--all", "-v").stdout
    assert text == f"cancelled 1 job\n{running['job_id']}\n"
    assert status_of(data, running["job_id"]) == "cancelled"

    assert "give a job id, or --all" in fails(data, "jobs", "cancel")
    finished = fails(data, "jobs", "cancel", "--all", "--status", "completed")
    assert "cannot cancel jobs by status ['completed']" in finished


# --- logs ------------------------------------------------------------------------------

LOGS_ROUTE = Path(__file__).parent.parent / "eventq" / "http" / "logs.py"
needs_logs = pytest.mark.skipif(not LOGS_ROUTE.exists(),
                                reason="GET /api/jobs/{id}/logs is not served yet "
                                       "(eventq/http/logs.py is missing)")


@needs_logs
def test_logs_prints_what_the_job_wrote_by_stream_and_attempt(server: Server,
                                                             tmp_path: Path) -> None:
    data, _ = server
    script = (f"echo attempt $EVENTQ_ATTEMPT; echo oops >&2; "
              f"test -e {tmp_path}/second && exit 0; touch {tmp_path}/second; exit 3")
    job = submit(data, "--gpus", "0", "--retry-on-failure", "--max-attempts", "2", "--",
                 "sh", "-c", script)["job_id"]
    until(lambda: status_of(data, job) == "completed", "the second attempt completed")
    assert eq(data, "jobs", "logs", job, "--stdout").stdout == "attempt 2\n"
    assert eq(data, "jobs", "logs", job, "--stdout", "--attempt", "1").stdout == "attempt 1\n"
    assert eq(data, "jobs", "logs", job, "--stderr").stdout == "oops\n"
    assert eq_json(data, "jobs", "logs", job, "--stdout")["text"] == "attempt 2\n"

    assert "--attempt counts from 1" in fails(data, "jobs", "logs", job, "--attempt", "0")
    assert "no job nosuch" in fails(data, "jobs", "logs", "nosuch")


@needs_logs
def test_logs_follow_waits_for_the_start_prints_as_it_comes_and_ends_with_the_status(
        server: Server, tmp_path: Path) -> None:
    data, _ = server
    submit(data, "--gpus", "0", "--", *blocker(tmp_path, "first"))
    script = (f"echo one; while [ ! -e {tmp_path}/go ]; do sleep 0.05; done; "
              f"echo two; exit 4")
    job = submit(data, "--gpus", "0", "--", "sh", "-c", script)["job_id"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTQ_")}
    with subprocess.Popen([EVENTQ, "jobs", "logs", job, "-f", "--data-dir", str(data)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=env) as follow:
        try:
            (tmp_path / "first").touch()  # the followed job starts only now
            assert follow.stdout is not None
            assert follow.stdout.readline() == "one\n", "printed while the job still runs"
            assert follow.poll() is None
            (tmp_path / "go").touch()
            out, err = follow.communicate(timeout=20)
        finally:
            if follow.poll() is None:
                follow.kill()
    assert out == "two\n"
    assert follow.returncode == 0, "a follow exits 0; the job's end goes to stderr"
    assert f"job {job} attempt 1 failed (exit code 4)" in err


def test_position_and_show_say_whose_end_a_waiting_jobs_start_rests_on(
        server: Server, tmp_path: Path) -> None:
    data, _ = server
    eq(data, "queue", "limits", "--local-jobs", "10", "--max", "10", "--per-user", "10")
    timed = submit(data, "--gpus", "2", "--name", "timed", "--max-runtime", "600", "--",
                   *blocker(tmp_path, "a"))
    submit(data, "--gpus", "2", "--name", "endless", "--", *blocker(tmp_path, "b"))
    one = submit(data, "--gpus", "1", "--name", "one", "--", "true")
    four = submit(data, "--gpus", "4", "--name", "four", "--", "true")
    said = eq(data, "jobs", "position", one["job_id"]).stdout
    assert f"after job timed ({timed['job_id']}) ends, its time limit is " in said, said
    shown = eq(data, "jobs", "show", one["job_id"]).stdout
    assert f"estimate: after job timed ({timed['job_id']}) ends" in shown, shown
    said = eq(data, "jobs", "position", four["job_id"]).stdout
    assert "estimated start: unknown (no estimate: job " in said and \
        "has no time limit)" in said, said
    for name in "ab":
        (tmp_path / name).touch()
