"""``eventq users …``: an admin manages people and their tokens; the tokens decide what each
person may do (SPEC 8), through the installed command against a real server process."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from eventq.cli import users
from eventq.events import Level
from tests.test_cli import EVENTQ, server
from tests.test_cli_queue import Server, becomes, eq, eq_json, fails, status_of, submit, until

pytestmark = pytest.mark.slow
__all__ = ["server"]


def token_of(output: str) -> str:
    """The token is the last line of ``users add`` and ``users token``."""
    return output.strip().splitlines()[-1]


def test_an_admin_adds_a_researcher_who_then_works_with_her_own_token(server: Server) -> None:
    data, _ = server
    added = eq(data, "users", "add", "alice", "--level", "researcher", "--team", "vision")
    assert "added alice (researcher, team vision)" in added.stdout
    assert "shown only this once" in added.stdout
    alice = token_of(added.stdout)

    job = submit(data, "--gpus", "0", "--", "true", token=alice)
    assert eq_json(data, "jobs", "show", job["job_id"], token=alice)["job"]["user"] == "alice"
    listed = eq_json(data, "users", "list")
    assert {"name": "alice", "level": "researcher", "team": "vision", "tokens": 1} in listed
    assert "alice" in eq(data, "users", "list").stdout

    refused = fails(data, "users", "list", token=alice)
    assert "only admins may do this (HTTP 403)" in refused
    assert "only leads and admins" in fails(data, "jobs", "priority", job["job_id"], "50",
                                            token=alice)


def test_a_second_token_a_new_level_and_revoking_every_token(server: Server,
                                                            tmp_path: Path) -> None:
    data, _ = server
    first = token_of(eq(data, "users", "add", "bob").stdout)
    issued = eq(data, "users", "token", "bob")
    assert "their other tokens still work" in issued.stdout
    second = token_of(issued.stdout)
    assert second != first
    assert {u["name"]: u["tokens"] for u in eq_json(data, "users", "list")}["bob"] == 2

    eq(data, "queue", "limits", "--local-jobs", "1")
    changed = eq_json(data, "users", "set", "bob", "--level", "lead", "--team", "nlp")
    assert (changed["level"], changed["team"]) == ("lead", "nlp")
    running = submit(data, "--gpus", "0", "--", "sh", "-c",
                     f"while [ ! -e {tmp_path}/x ]; do sleep 0.05; done", token=first)
    waiting = submit(data, "--gpus", "0", "--", "true", token=second)
    assert "priority set to 80" in eq(data, "jobs", "priority", waiting["job_id"], "80",
                                      token=second).stdout, "a lead may re-prioritise"

    assert "revoked every token of bob" in eq(data, "users", "revoke", "bob").stdout
    for token in (first, second):
        assert "invalid or revoked token (HTTP 401)" in fails(data, "jobs", "list", token=token)
    (tmp_path / "x").touch()
    until(lambda: status_of(data, waiting["job_id"]) == "completed",
          "bob's jobs go on after his tokens are revoked")
    assert status_of(data, running["job_id"]) == "completed"


def test_user_commands_refuse_bad_input_with_a_clear_message(server: Server) -> None:
    data, _ = server
    eq(data, "users", "add", "carol")
    assert "user carol already exists (HTTP 409)" in fails(data, "users", "add", "carol")
    assert "must be 1-64 of a-z 0-9" in fails(data, "users", "add", "Bad Name")
    assert "invalid choice: 'boss'" in fails(data, "users", "add", "dave", "--level", "boss")
    assert "nothing to change" in fails(data, "users", "set", "carol")
    assert "no user nobody (HTTP 404)" in fails(data, "users", "token", "nobody")
    assert "no user nobody (HTTP 404)" in fails(data, "users", "revoke", "nobody")
    assert "no user nobody (HTTP 404)" in fails(data, "users", "delete", "nobody")


def test_a_user_is_deleted_once_nothing_of_theirs_waits_or_runs(server: Server,
                                                               tmp_path: Path) -> None:
    data, _ = server
    frank = token_of(eq(data, "users", "add", "frank").stdout)
    job = submit(data, "--gpus", "0", "--", "sh", "-c",
                 f"while [ ! -e {tmp_path}/go ]; do sleep 0.05; done", token=frank)
    until(becomes(data, job["job_id"], "running"), "frank's job runs")
    assert "frank has 1 unfinished job" in fails(data, "users", "delete", "frank")
    (tmp_path / "go").touch()
    until(becomes(data, job["job_id"], "completed"), "frank's job ends")

    assert "deleted frank" in eq(data, "users", "delete", "frank").stdout
    assert "invalid or revoked token (HTTP 401)" in fails(data, "jobs", "list", token=frank)
    assert "frank" not in [u["name"] for u in eq_json(data, "users", "list")]
    assert eq_json(data, "jobs", "show", job["job_id"])["job"]["user"] == "frank"


def test_a_researcher_retrying_every_failed_job_retries_only_her_own(server: Server) -> None:
    data, _ = server
    erin = token_of(eq(data, "users", "add", "erin").stdout)
    theirs = submit(data, "--gpus", "0", "--", "false")["job_id"]
    mine = submit(data, "--gpus", "0", "--", "false", token=erin)["job_id"]
    for job_id in (theirs, mine):
        until(becomes(data, job_id, "failed"), "the job failed")
    done = eq_json(data, "jobs", "retry", "--status", "failed", token=erin)
    assert done == {"retried": [mine], "skipped_not_yours": 1, "errors": []}
    assert eq_json(data, "jobs", "show", theirs)["job"]["attempt"] == 1


def test_a_follow_opened_with_a_revoked_token_ends_and_says_why(server: Server,
                                                                 tmp_path: Path) -> None:
    data, _ = server
    fay = token_of(eq(data, "users", "add", "fay").stdout)
    script = f"echo one; while [ ! -e {tmp_path}/go ]; do sleep 0.05; done; echo two"
    job = submit(data, "--gpus", "0", "--", "sh", "-c", script, token=fay)["job_id"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTQ_")}
    with subprocess.Popen([EVENTQ, "jobs", "logs", job, "-f", "--data-dir", str(data),
                           "--token", fay], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env=env) as follow:
        try:
            assert follow.stdout is not None and follow.stdout.readline() == "one\n"
            eq(data, "users", "revoke", "fay")
            out, err = follow.communicate(timeout=20)
        finally:
            if follow.poll() is None:
                follow.kill()
            (tmp_path / "go").touch()
    assert follow.returncode != 0 and out == ""
    assert f"the server closed the log of {job}: the token" in err and "revoked" in err


def test_the_cli_offers_exactly_the_server_s_levels() -> None:
    """The parser's level names are written out (building it loads no server module)."""
    assert sorted(users.LEVELS) == sorted(level.value for level in Level)
