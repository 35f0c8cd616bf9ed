"""CSV sets as job-scheduler-v2's users run them: ``eventq import``, ``export`` and
``progress``, the installed command against a real server process."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from eventq.cli import bulk
from eventq.cli.client import Client
from tests.helpers import DEFAULT_SIGNALS, stop
from tests.test_cli import EVENTQ, as_json, eventq, server
from tests.test_cli_queue import eq_json, until

pytestmark = pytest.mark.slow
__all__ = ["server"]

Server = tuple[Path, "subprocess.Popen[str]"]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def recorder(tmp: Path) -> str:
    """A command template whose job writes the argv it was given, one ``<arg>`` a line."""
    script = write(tmp / "record.sh", "printf '<%s>\\n' \"$@\" > " + f"{tmp}/argv.$EVENTQ_JOB_ID\n")
    return f"sh {script}"


def argv_seen(tmp: Path, job_id: str) -> list[str]:
    path = tmp / f"argv.{job_id}"
    until(lambda: path.exists() and path.read_text().endswith("\n"), f"job {job_id} ran")
    return [line[1:-1] for line in path.read_text().splitlines()]


def imported(data: Path, *args: str) -> dict[str, str]:
    """``eventq import … --format json``: job ids by job name."""
    reply = as_json(eventq(data, "import", *args, "--format", "json"))
    return {job["name"]: job["job_id"] for job in reply["jobs"]}


def fails(data: Path, *args: str) -> str:
    """A bulk command that must fail: its stderr."""
    done = eventq(data, *args, check=False)
    assert done.returncode != 0, f"eventq {args} should have failed: {done.stdout}"
    return done.stderr


def jobs(data: Path) -> list[dict[str, Any]]:
    listed: list[dict[str, Any]] = eq_json(data, "jobs", "list", "-a", "-l", "1000")
    return listed


def status(data: Path, job_id: str) -> str:
    return str(eq_json(data, "jobs", "show", job_id)["job"]["status"])


def read_csv(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def test_parameters_become_arguments_in_column_order_and_empty_cells_stay_arguments(
        server: Server, tmp_path: Path) -> None:
    data, _ = server
    sweep = write(tmp_path / "sweep.csv",
                  "param1,param2,param3\n"
                  "preprocess,data1,x\n"
                  "training,,it's \"quoted\" text\n"
                  ",,\n")
    ids = imported(data, str(sweep), "--command", recorder(tmp_path), "--gpus", "0")
    assert list(ids) == ["sweep-2", "sweep-3", "sweep-4"], "rows without an id are named"
    assert argv_seen(tmp_path, ids["sweep-2"]) == ["preprocess", "data1", "x"]
    assert argv_seen(tmp_path, ids["sweep-3"]) == ["training", "", "it's \"quoted\" text"]
    assert argv_seen(tmp_path, ids["sweep-4"]) == ["", "", ""]

    named = write(tmp_path / "named.csv", "param1,param2\npreprocess,\n")
    ids = imported(data, str(named), "--command", recorder(tmp_path), "--gpus", "0",
                   "--named-args")
    assert argv_seen(tmp_path, ids["named-2"]) == ["--param1", "preprocess", "--param2", ""]


def test_reserved_columns_set_name_priority_estimate_dependencies_and_gpus(
        server: Server, tmp_path: Path) -> None:
    data, _ = server
    runs = write(tmp_path / "runs.csv",
                 "JOBSCHEDULER_JOB_ID,task,JOBSCHEDULER_PRIORITY,JOBSCHEDULER_ESTIMATE_TIME,"
                 "JOBSCHEDULER_DEPENDS_ON,GPUS\n"
                 "jobA,preprocess,5,0.5,,0\n"
                 "jobB,load_data,5,,,0\n"
                 "jobC,training,3,2,jobA jobB,2\n")
    ids = imported(data, str(runs), "--command", recorder(tmp_path))
    until(lambda: status(data, ids["jobC"]) == "completed", "the pipeline ran")
    shown = {name: eq_json(data, "jobs", "show", job_id)["job"] for name, job_id in ids.items()}
    assert [shown[n]["priority"] for n in ("jobA", "jobB", "jobC")] == [5, 5, 3]
    assert shown["jobA"]["estimated_runtime"] == 1800.0 and shown["jobB"]["estimated_runtime"] \
        is None and shown["jobC"]["estimated_runtime"] == 7200.0
    assert shown["jobC"]["gpus"] == 2 and shown["jobA"]["gpus"] == 0
    assert shown["jobC"]["metadata"]["jobscheduler"]["params"] == {"task": "training"}
    assert argv_seen(tmp_path, ids["jobC"]) == ["training"], "GPUS is not an argument"
    assert shown["jobC"]["started_at"] >= max(shown["jobA"]["completed_at"],
                                              shown["jobB"]["completed_at"])
    assert shown["jobA"]["started_at"] < shown["jobB"]["started_at"], "equal priorities: rows"


def test_cycles_unknown_names_and_bad_cells_are_refused_by_line_and_nothing_is_recorded(
        server: Server, tmp_path: Path) -> None:
    data, _ = server
    bad = write(tmp_path / "bad.csv",
                "JOBSCHEDULER_JOB_ID,task,JOBSCHEDULER_DEPENDS_ON,JOBSCHEDULER_PRIORITY\n"
                "jobA,preprocess,jobC,\n"
                "jobB,load_data,nope,\n"
                "\n"
                "jobC,training,jobA jobB,high\n"
                "jobD,evaluation,jobD,\n")
    errors = fails(data, "import", str(bad), "--command", "true")
    assert f"{bad}:2: dependency cycle jobA -> jobC -> jobA (lines 2, 5)" in errors
    assert f"{bad}:6: dependency cycle jobD -> jobD (line 6)" in errors
    assert f"{bad}:3: JOBSCHEDULER_DEPENDS_ON names 'nope', which is no row of this file" \
        in errors
    assert f"{bad}:5: JOBSCHEDULER_PRIORITY 'high' is not an integer from 0 to 1000" in errors
    assert "nothing was imported" in errors
    assert jobs(data) == []

    # What only the server can check (this inventory has 4 GPUs) also names its line.
    greedy = write(tmp_path / "greedy.csv", "task,GPUS\na,0\n\nb,9\n")
    errors = fails(data, "import", str(greedy), "--command", "true")
    assert f"{greedy}:4: needs 9 GPUs; the local node has 4" in errors
    assert jobs(data) == []


def test_a_priority_column_needs_a_lead_or_admin_token_and_says_so(server: Server,
                                                                  tmp_path: Path) -> None:
    data, _ = server
    token = eq_json(data, "users", "add", "rita", "--level", "researcher")["token"]
    ranked = write(tmp_path / "ranked.csv", "task,JOBSCHEDULER_PRIORITY\na,5\n")
    errors = fails(data, "import", str(ranked), "--command", "true", "--token", token)
    assert "only leads and admins may override priority" in errors
    assert "nothing was imported" in errors and "lead's or an admin's token" in errors
    plain = write(tmp_path / "plain.csv", "task,JOBSCHEDULER_PRIORITY\na,\n")
    eventq(data, "import", str(plain), "--command", "true", "--gpus", "0", "--token", token)


def test_append_adds_every_row_and_may_depend_on_earlier_imports(server: Server,
                                                                 tmp_path: Path) -> None:
    data, _ = server
    first = write(tmp_path / "base.csv", "JOBSCHEDULER_JOB_ID,task\nprep,preprocess\n")
    base = imported(data, str(first), "--command", recorder(tmp_path), "--gpus", "0")
    more = write(tmp_path / "more.csv", "task,JOBSCHEDULER_DEPENDS_ON\n"
                                        "train,prep\ntrain,prep\nreport,\n")
    refused = fails(data, "import", str(more), "--command", "true")
    assert "use --append" in refused
    added = imported(data, str(more), "--command", recorder(tmp_path), "--gpus", "0",
                     "--append")
    again = imported(data, str(more), "--command", recorder(tmp_path), "--gpus", "0",
                     "--append")
    third = imported(data, str(more), "--command", "true", "--gpus", "0", "--append")
    assert list(added) == ["more-2", "more-3", "more-4"]
    assert list(again) == ["more-2.2", "more-3.2", "more-4.2"], "no row is dropped"
    assert list(third) == ["more-2.3", "more-3.3", "more-4.3"], "no name is given twice"
    listed = {j["name"]: j for j in jobs(data)}
    assert len(listed) == 10
    assert listed["more-3.2"]["depends_on"] == [base["prep"]]
    until(lambda: all(j["status"] == "completed" for j in jobs(data)), "all ten ran")
    assert argv_seen(tmp_path, again["more-3.2"]) == ["train"]


def test_export_writes_job_scheduler_v2_columns_and_imports_back_as_the_same_jobs(
        server: Server, tmp_path: Path) -> None:
    data, _ = server
    later = "2100-01-01T00:00:00+00:00"
    source = write(tmp_path / "exp.csv",
                   "param1,param2,JOBSCHEDULER_PRIORITY,JOBSCHEDULER_ESTIMATE_TIME,"
                   "JOBSCHEDULER_DEPENDS_ON,JOBSCHEDULER_JOB_ID,JOBSCHEDULER_BEGIN_AT,GPUS\n"
                   "preprocess,data1,5,0.5,,pre,,0\n"
                   "training,,3,2.0,pre,train,,1\n"
                   "evaluation,results,,,train,eval,,0\n"
                   "someday,x,,,,later,2100-01-01T00:00:00+00:00,0\n")
    command = recorder(tmp_path)
    ids = imported(data, str(source), "--command", command)
    until(lambda: status(data, ids["eval"]) == "completed", "the pipeline ran")
    exported = tmp_path / "exported.csv"
    eventq(data, "export", str(exported))
    rows = read_csv(exported.read_text())
    assert list(rows[0])[:9] == [
        "JOBSCHEDULER_JOB_ID", "JOBSCHEDULER_STATUS", "JOBSCHEDULER_PRIORITY",
        "JOBSCHEDULER_ESTIMATE_TIME", "JOBSCHEDULER_ELAPSED_TIME", "JOBSCHEDULER_STARTED_AT",
        "JOBSCHEDULER_FINISHED_AT", "JOBSCHEDULER_ERROR_MESSAGE", "JOBSCHEDULER_DEPENDS_ON"]
    assert [(r["JOBSCHEDULER_JOB_ID"], r["JOBSCHEDULER_STATUS"]) for r in rows] == [
        ("pre", "done"), ("train", "done"), ("eval", "done"), ("later", "pending")]
    assert rows[1]["param2"] == "" and rows[2]["JOBSCHEDULER_DEPENDS_ON"] == "train"
    assert float(rows[0]["JOBSCHEDULER_ELAPSED_TIME"]) >= 0
    done_only = eventq(data, "export", "--status", "done").stdout
    assert [r["JOBSCHEDULER_JOB_ID"] for r in read_csv(done_only)] == ["pre", "train", "eval"]

    def job_fields(d: Path) -> list[tuple[Any, ...]]:
        out = []
        listed = jobs(d)
        names = {j["job_id"]: j["name"] for j in listed}
        for job in sorted(listed, key=lambda j: j["name"]):
            shown = eq_json(d, "jobs", "show", job["job_id"])["job"]
            deps = [names[dep] for dep in shown.get("depends_on", [])]
            out.append((shown["name"], shown["command"], shown["priority"],
                        shown["estimated_runtime"], deps, shown["gpus"],
                        shown.get("begin_at"), shown["metadata"]["jobscheduler"]["params"]))
        return out

    with another_server(tmp_path / "other") as other:
        eventq(other, "import", str(exported), "--command", command)
        assert job_fields(other) == job_fields(data)
        again = read_csv(eventq(other, "export").stdout)
        keep = ["JOBSCHEDULER_JOB_ID", "JOBSCHEDULER_PRIORITY", "JOBSCHEDULER_ESTIMATE_TIME",
                "JOBSCHEDULER_DEPENDS_ON", "JOBSCHEDULER_BEGIN_AT", "GPUS", "param1", "param2"]
        assert [{k: r[k] for k in keep} for r in again] == [{k: r[k] for k in keep}
                                                              for r in rows]
        assert rows[3]["JOBSCHEDULER_BEGIN_AT"] == later


def test_progress_splits_pending_and_names_each_blocked_job_and_its_cause(
        server: Server, tmp_path: Path) -> None:
    data, _ = server
    watched = tmp_path / "watch.out"
    with open(watched, "w") as out:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTQ_")}
        watch = subprocess.Popen([*DEFAULT_SIGNALS, EVENTQ, "progress", "--watch",
                                  "--data-dir", str(data)],
                                 stdout=out, stderr=subprocess.PIPE, text=True, env=env)
    try:
        until(lambda: "Total: 0" in watched.read_text(), "the watch drew the empty queue")
        pipeline = write(tmp_path / "pipe.csv",
                         "JOBSCHEDULER_JOB_ID,step,JOBSCHEDULER_DEPENDS_ON,"
                         "JOBSCHEDULER_BEGIN_AT\n"
                         "root,fail,,\nmid,ok,root,\nleaf,ok,mid,\nlater,ok,,4102444800\n")
        ids = imported(data, str(pipeline), "--command", "sh -c 'test \"$0\" != fail'",
                       "--gpus", "0")
        until(lambda: status(data, ids["root"]) == "failed", "the root failed")
        shown = eventq(data, "progress").stdout
        assert "Pending: 3" in shown and "- Ready: 0" in shown
        assert "- Waiting: 1    for dependencies (0) or a begin time (1)" in shown
        assert "- Blocked: 2" in shown
        assert f"mid ({ids['mid']}, waiting): dependency_failed: dependency root " \
               f"({ids['root']}) failed; retry it or cancel this job" in shown
        assert f"leaf ({ids['leaf']}, waiting): dependency_failed: dependency mid " \
               f"({ids['mid']}) waits on a failed job" in shown
        summary = as_json(eventq(data, "progress", "--format", "json"))
        assert [j["name"] for j in summary["blocked_jobs"]] == ["mid", "leaf"]
        assert (summary["ready"], summary["waiting"], summary["blocked"]) == (0, 1, 2)

        def drawn() -> str:
            return watched.read_text().rsplit("--- ", 1)[-1]

        until(lambda: "- Blocked: 2" in drawn() and f"mid ({ids['mid']}" in drawn(),
              "the watch redrew from the events")
        assert "Error: 1 (failed 1)" in drawn()
    finally:
        _, err = stop(watch, signal.SIGINT)  # Ctrl-C
    assert watch.returncode == 0, err


@contextlib.contextmanager
def another_server(data: Path) -> Iterator[Path]:
    """A second ``eventq server`` (the ``server`` fixture is the first)."""
    proc = subprocess.Popen([EVENTQ, "server", "--data-dir", str(data), "--port", "0",
                             "--gpus", "4xA100-80GB", "--grace", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        def started() -> bool:
            with contextlib.suppress(OSError, ValueError):
                return bool(json.loads((data / "server.json").read_text())["url"])
            return proc.poll() is not None

        until(started, "the second server started", seconds=15)
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        yield data
    finally:
        stop(proc)
        for pid_file in data.glob("jobs/*/*/pid"):
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.killpg(int(pid_file.read_text()), signal.SIGKILL)


def test_an_export_refuses_to_overwrite_a_file_unless_forced(server: Server,
                                                             tmp_path: Path) -> None:
    data, _ = server
    target = write(tmp_path / "results.csv", "precious\n")
    assert "use --force" in fails(data, "export", str(target))
    assert target.read_text() == "precious\n"
    eventq(data, "export", str(target), "--force")
    assert target.read_text().startswith("JOBSCHEDULER_JOB_ID,JOBSCHEDULER_STATUS")


def test_a_long_listing_is_read_page_by_page_with_offset(server: Server, tmp_path: Path) -> None:
    data, _ = server
    rows = write(tmp_path / "five.csv", "task\n" + "".join(f"t{i}\n" for i in range(5)))
    eventq(data, "import", str(rows), "--command", "sh -c 'sleep 300'", "--gpus", "0")
    api = Client.find(None, None, data)
    whole = [j["job_id"] for j in api.call("GET", "/api/queue?limit=50")["jobs"]]
    pages = [[j["job_id"] for j in api.call("GET", f"/api/queue?limit=2&offset={o}")["jobs"]]
             for o in (0, 2, 4, 6)]
    assert len(whole) == 5 and pages == [whole[:2], whole[2:4], whole[4:], []]
    assert [j["job_id"] for j in bulk.list_all(api)] == whole
    eventq(data, "jobs", "cancel", "--all")
