"""The CLI says what it hides, in human units: each story runs the installed ``eventq``
against a real server process, as a person at a terminal (or a script) runs it."""

from __future__ import annotations

import datetime
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.test_cli import EVENTQ, eventq, server
from tests.test_cli_queue import blocker, eq, eq_json, fails, status_of, submit, until

pytestmark = pytest.mark.slow
__all__ = ["server"]

Server = tuple[Path, "subprocess.Popen[str]"]
#: 2100-01-01: a begin time that keeps a job waiting for the whole test.
FAR = "4102444800"
#: An epoch time printed as it is stored: what a person should never have to read.
EPOCH = re.compile(r"\b1[6-9]\d{8}(\.\d+)?\b")
ISO_WITH_OFFSET = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}[+-]\d\d:\d\d$")


def finished(data: Path, *args: str) -> str:
    """A CPU job that runs ``args`` to its end; its id."""
    job = submit(data, "--gpus", "0", "--", *args)["job_id"]
    until(lambda: status_of(data, job) in ("completed", "failed"), f"{args} ended")
    return str(job)


def later(data: Path, *extra: str) -> str:
    """A job that waits for its begin time all through the test; its id."""
    return str(submit(data, "--gpus", "0", "--begin-at", FAR, *extra, "--", "true")["job_id"])


def run_json(data: Path, *args: str) -> tuple[int, Any]:
    """A command with ``--format json`` that may fail: its exit code and its JSON answer."""
    done = eq(data, *args[:2], "--format", "json", *args[2:], check=False)
    return done.returncode, json.loads(done.stdout)


# --- jobs list: what it leaves out ------------------------------------------------------


def test_a_listing_says_when_it_cuts_rows_and_when_only_finished_jobs_are_hidden(
        server: Server, tmp_path: Path) -> None:
    data, _ = server
    assert "no jobs yet" in eq(data, "jobs", "list").stdout
    for _ in range(2):
        finished(data, "true")
    empty = eq(data, "jobs", "list").stdout
    assert "no unfinished jobs; -a shows the 2 finished" in empty

    rows = tmp_path / "many.csv"
    rows.write_text("JOBSCHEDULER_BEGIN_AT,task\n" + "".join(f"{FAR},t{i}\n"
                                                             for i in range(1001)))
    eq(data, "import", str(rows), "--command", "true", "--gpus", "0")
    cut = eq(data, "jobs", "list").stdout
    assert "50 of 1,001 (use -l N / -a)" in cut
    assert "10 of 1,003 (use -l N)" in eq(data, "jobs", "list", "-a", "-l", "10").stdout
    whole = eq_json(data, "jobs", "list", "-l", "2000")
    assert len(whole) == 1001, "nothing is cut: no note"
    assert "of" not in eq(data, "jobs", "list", "-l", "2000", "--format", "json").stderr
    noted = eq(data, "jobs", "list", "--format", "json")
    assert len(json.loads(noted.stdout)) == 50 and "50 of 1,001" in noted.stderr

    cancelled = eq(data, "jobs", "cancel", "--all").stdout
    assert cancelled.strip() == "cancelled 1,001 jobs", "a count, not a thousand ids"


def test_an_unknown_output_field_is_an_error_naming_the_nearest_known_one(
        server: Server) -> None:
    data, _ = server
    job = later(data, "--metadata", "run_name=lr-sweep")
    refused = fails(data, "jobs", "list", "-o", "job_id,stauts")
    assert "unknown field 'stauts'" in refused and "did you mean status?" in refused
    assert "unknown field 'metdata.run_name'" in fails(data, "jobs", "list", "-o",
                                                        "metdata.run_name")
    shown = eq(data, "jobs", "list", "-o", "job_id,metadata.run_name,metadata.absent").stdout
    assert job in shown and "lr-sweep" in shown, "metadata's keys are the user's own"


# --- times and durations -----------------------------------------------------------------


def test_times_are_iso_8601_in_json_and_fields_and_human_in_tables(
        server: Server, tmp_path: Path) -> None:
    data, _ = server
    done = finished(data, "true")
    soon = datetime.datetime.now().astimezone() + datetime.timedelta(minutes=38, seconds=30)
    waiting = str(submit(data, "--gpus", "0", "--begin-at", soon.isoformat(), "--",
                         "true")["job_id"])

    listed = {j["job_id"]: j for j in eq_json(data, "jobs", "list", "-a")}
    assert ISO_WITH_OFFSET.match(listed[done]["queued_at"])
    assert ISO_WITH_OFFSET.match(listed[done]["completed_at"])
    begins = datetime.datetime.fromisoformat(listed[waiting]["begin_at"])
    assert abs(begins.timestamp() - soon.timestamp()) < 0.001
    shown = eq_json(data, "jobs", "show", done)
    assert all(ISO_WITH_OFFSET.match(e["time"]) for e in shown["events"])
    fields = eq(data, "jobs", "list", "-a", "-o", "job_id,started_at").stdout
    assert re.search(rf"{done}\s*│\s*\d{{4}}-\d\d-\d\dT\S+[+-]\d\d:\d\d", fields)

    table = eq(data, "jobs", "list", "-a").stdout
    assert "in 38 min" in table, "a begin time is relative"
    assert datetime.datetime.fromtimestamp(
        datetime.datetime.fromisoformat(listed[done]["started_at"]).timestamp()
    ).strftime("%H:%M") in table, "a start today is the local clock"
    for text in (table, eq(data, "jobs", "show", done).stdout,
                 eq(data, "replay", "why", done).stdout, eq(data, "replay", "show").stdout):
        assert not EPOCH.search(text), f"an epoch time in: {text}"
    story = eq_json(data, "replay", "why", done)
    assert all(ISO_WITH_OFFSET.match(s["time"]) for s in story["steps"])


def test_durations_read_as_hours_and_minutes() -> None:
    from eventq.timefmt import duration

    assert [duration(s) for s in (0.25, 42, 65, 3720, 90061)] == [
        "0.25s", "42s", "1m 05s", "1h 02m", "1d 01h"]


def test_a_time_reads_as_the_clock_today_and_as_the_date_beyond_a_day() -> None:
    from eventq.timefmt import clock, relative

    now = datetime.datetime(2026, 11, 24, 15, 0).timestamp()
    assert clock(now - 40 * 60, now) == "14:20"
    assert clock(now - 3 * 86400, now) == "2026-11-21"
    assert relative(now + 38 * 60 + 20, now) == "in 38 min"
    assert relative(now - 2 * 3600 - 60, now) == "2 h ago"


# --- mistakes: suggestions and JSON errors -----------------------------------------------


def test_a_mistyped_command_suggests_the_nearest_ones(server: Server) -> None:
    data, _ = server
    typo = eq(data, "jobs", "submti", check=False)
    assert typo.returncode != 0 and "did you mean submit?" in typo.stderr
    assert "Traceback" not in typo.stderr
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTQ_")}
    top = subprocess.run([EVENTQ, "jbos", "list"], capture_output=True, text=True, env=env,
                         timeout=30)
    assert top.returncode != 0 and "did you mean jobs?" in top.stderr


def test_errors_are_json_too_with_format_json(server: Server) -> None:
    data, _ = server
    code, missing = run_json(data, "jobs", "show", "nosuch")
    assert code != 0 and missing["error"] == "no job nosuch" and missing["status"] == 404
    code, typo = run_json(data, "jobs", "submti")
    assert code != 0 and "did you mean submit?" in typo["error"]
    code, bad = run_json(data, "jobs", "submit", "--gpus", "x", "--", "true")
    assert code != 0 and "--gpus" in bad["error"]
    code, field = run_json(data, "jobs", "list", "-o", "stauts")
    assert code != 0 and "did you mean status?" in field["error"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTQ_")}
    refused = subprocess.run([EVENTQ, "jobs", "list", "--url", "http://127.0.0.1:9",
                              "--token", "x", "--format", "json"],
                             capture_output=True, text=True, env=env, timeout=30)
    assert refused.returncode != 0
    assert "cannot reach the server" in json.loads(refused.stdout)["error"]


# --- cancel and progress ------------------------------------------------------------------


def test_cancel_all_cancels_jobs_waiting_on_a_failed_dependency_or_a_begin_time(
        server: Server) -> None:
    data, _ = server
    root = finished(data, "false")
    held_by_root = str(submit(data, "--gpus", "0", "--depends-on", root, "--",
                              "true")["job_id"])
    until(lambda: "dependency_failed" in eq(data, "jobs", "list").stdout,
          "the dependant waits on the failed root")
    for_later = later(data)

    reply = eq_json(data, "jobs", "cancel", "--all")
    assert reply["cancelled"] == 2
    assert sorted(reply["job_ids"]) == sorted([held_by_root, for_later])
    assert status_of(data, held_by_root) == status_of(data, for_later) == "cancelled"

    more = sorted(later(data) for _ in range(2))
    text = eq(data, "jobs", "cancel", "--all", "-v").stdout
    assert text.splitlines()[0] == "cancelled 2 jobs"
    assert sorted(text.split()[3:]) == more, "-v names them"


def test_a_cancelled_job_that_never_started_does_not_claim_a_process_was_stopped(
        server: Server, tmp_path: Path) -> None:
    data, _ = server
    waiting = later(data)
    said = eq(data, "jobs", "cancel", waiting).stdout
    assert "had not started" in said and "process" not in said and "GPUs" not in said
    running = submit(data, "--gpus", "1", "--", *blocker(tmp_path, "never"))["job_id"]
    until(lambda: status_of(data, running) == "running", "the job runs")
    assert "process stopped, its GPUs are free" in eq(data, "jobs", "cancel", running).stdout


def test_progress_counts_cancelled_jobs_as_cancelled_not_as_errors(server: Server) -> None:
    data, _ = server
    finished(data, "false")
    eq(data, "jobs", "cancel", later(data))
    shown = eq(data, "progress").stdout
    assert "Error: 1 (failed 1)" in shown and "Cancelled: 1" in shown
    summary = json.loads(eventq(data, "progress", "--format", "json").stdout)
    assert (summary["error"], summary["cancelled"]) == (1, 1)


# --- logs -----------------------------------------------------------------------------------


def test_logs_show_both_streams_so_a_failed_jobs_error_is_visible(server: Server) -> None:
    data, _ = server
    failed = finished(data, "sh", "-c", "echo loading; echo 'ValueError: bad lr' >&2; exit 1")
    shown = eq(data, "jobs", "logs", failed).stdout
    assert shown == "==> stdout <==\nloading\n==> stderr <==\nValueError: bad lr\n"
    assert eq(data, "jobs", "logs", failed, "--stdout").stdout == "loading\n"
    assert eq(data, "jobs", "logs", failed, "--stderr").stdout == "ValueError: bad lr\n"
    both = eq_json(data, "jobs", "logs", failed)
    assert (both["stdout"], both["stderr"], both["attempt"]) == (
        "loading\n", "ValueError: bad lr\n", 1)
    only_err = finished(data, "sh", "-c", "echo 'only this' >&2")
    assert eq(data, "jobs", "logs", only_err).stdout == "only this\n"


def test_a_job_with_no_output_says_so(server: Server) -> None:
    data, _ = server
    quiet = finished(data, "true")
    done = eq(data, "jobs", "logs", quiet)
    assert done.stdout == ""
    assert f"job {quiet} attempt 1 (completed) wrote no output" in done.stderr
    waiting = later(data)
    before = eq(data, "jobs", "logs", waiting)
    assert before.stdout == "" and "has not started" in before.stderr
    assert "begin_time" in before.stderr


def test_logs_follow_of_a_waiting_job_says_why_it_waits_then_follows_it(
        server: Server) -> None:
    data, _ = server
    soon = datetime.datetime.now().astimezone() + datetime.timedelta(seconds=2)
    job = str(submit(data, "--gpus", "0", "--begin-at", soon.isoformat(), "--",
                     "sh", "-c", "echo started")["job_id"])
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTQ_")}
    follow = subprocess.run([EVENTQ, "jobs", "logs", job, "-f", "--data-dir", str(data)],
                            capture_output=True, text=True, env=env, timeout=30)
    assert follow.returncode == 0, follow.stderr
    assert follow.stdout == "started\n"
    first = follow.stderr.splitlines()[0]
    assert f"job {job} has not started (waiting): begin_time" in first
    assert "following it once it starts" in first
    assert f"job {job} attempt 1 completed (exit code 0)" in follow.stderr


# --- watching -------------------------------------------------------------------------------

TMUX = shutil.which("tmux")


class Pane:
    """A tmux session of its own (its own server socket) running one command."""

    def __init__(self, socket: Path, command: list[str]) -> None:
        self.base = [str(TMUX), "-S", str(socket)]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("EVENTQ_", "TMUX"))}
        subprocess.run([*self.base, "new-session", "-d", "-x", "200", "-y", "40",
                        shlex.join(command)], env=env, check=True, timeout=30)
        subprocess.run([*self.base, "set-option", "-g", "remain-on-exit", "on"], check=True,
                       timeout=30)

    def screen(self) -> str:
        return subprocess.run([*self.base, "capture-pane", "-p"], capture_output=True,
                              text=True, timeout=30).stdout

    def close(self) -> None:
        subprocess.run([*self.base, "kill-server"], capture_output=True, timeout=30)


def row_of(screen: str, job_id: str) -> str:
    return next((line for line in screen.splitlines() if job_id in line), "")


@pytest.mark.skipif(TMUX is None, reason="tmux is not installed (apt-get install -y tmux)")
def test_a_watched_listing_redraws_a_row_when_its_job_ends_without_a_keypress(
        server: Server, tmp_path: Path) -> None:
    data, _ = server
    job = submit(data, "--gpus", "1", "--", *blocker(tmp_path, "go"))["job_id"]
    until(lambda: status_of(data, job) == "running", "the job runs")
    pane = Pane(tmp_path / "tmux.sock", [EVENTQ, "jobs", "list", "--watch", "-a",
                                         "--data-dir", str(data)])
    try:
        until(lambda: "running" in row_of(pane.screen(), job), "the pane shows it running")
        (tmp_path / "go").touch()
        until(lambda: "completed" in row_of(pane.screen(), job),
              "the pane shows it completed, redrawn from the event stream")
        assert "running" not in row_of(pane.screen(), job)
    finally:
        pane.close()


def test_a_watched_job_is_redrawn_as_it_changes_and_the_watch_ends_with_it(
        server: Server, tmp_path: Path) -> None:
    data, _ = server
    job = submit(data, "--gpus", "1", "--", *blocker(tmp_path, "go"))["job_id"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTQ_")}
    with subprocess.Popen([EVENTQ, "jobs", "show", job, "--watch", "--format", "json",
                           "--data-dir", str(data)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=env) as watch:
        try:
            assert watch.stdout is not None
            seen = []
            while not seen or seen[-1] != "running":
                seen.append(json.loads(watch.stdout.readline())["job"]["status"])
            (tmp_path / "go").touch()
            out, err = watch.communicate(timeout=20)
        finally:
            if watch.poll() is None:
                watch.kill()
    last = json.loads(out.splitlines()[-1])
    assert last["job"]["status"] == "completed" and watch.returncode == 0, err
    assert "job_completed" in [e["type"] for e in last["events"]]
