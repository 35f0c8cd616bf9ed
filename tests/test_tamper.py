"""A log changed behind the server's back is named by seq and never started on.

A real server writes a short history (an approval-gated job, two jobs that ran) and stops
cleanly. Each test edits a copy the way someone with ``sqlite3`` could, then runs
``eventq replay verify`` (which must name the seq and exit non-zero) and ``eventq server``
(which must refuse with one line naming the seq, exit non-zero, and never listen).
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import pytest

from eventq import events as ev
from eventq.log import GENESIS, chain_hash
from tests import serverproc
from tests.serverproc import wait_until

ORIGINAL, EDITED = b"original", b"attacker"  # the same length: the body stays valid msgpack


@dataclass(frozen=True)
class History:
    data_dir: Path
    head: int
    #: The seq of the approval-gated job's submission, whose command the tests edit.
    gated_seq: int
    gated_job: str


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> History:
    base = tmp_path_factory.mktemp("history")
    data = base / "data"
    with serverproc.running(data, base / "server.stderr") as server:
        status, gated = server.call("POST", "/api/queue/submit", {
            "command": ["echo", ORIGINAL.decode()], "requires_approval": True, "gpus": 0})
        assert status == 200 and gated["status"] == "blocked", gated
        ran = [server.call("POST", "/api/queue/submit", {"command": ["true"]})[1]["job_id"]
               for _ in range(2)]
        for job_id in ran:
            wait_until(lambda j=job_id: server.call("GET", f"/api/jobs/{j}")[1]["status"]
                       == "completed", f"{job_id} completes")
    with closing(sqlite3.connect(data / "events.db")) as conn:
        head = conn.execute("SELECT max(seq) FROM events").fetchone()[0]
        gated_seq = conn.execute("SELECT seq FROM events WHERE type = 'job_submitted' AND "
                                 "job_id = ?", (gated["job_id"],)).fetchone()[0]
    return History(data, head, gated_seq, gated["job_id"])


def edit_body(conn: sqlite3.Connection, h: History) -> int:
    body = conn.execute("SELECT body FROM events WHERE seq = ?", (h.gated_seq,)).fetchone()[0]
    assert body.count(ORIGINAL) == 1
    conn.execute("UPDATE events SET body = ? WHERE seq = ?",
                 (body.replace(ORIGINAL, EDITED), h.gated_seq))
    return h.gated_seq


def edit_principal(conn: sqlite3.Connection, h: History) -> int:
    conn.execute("UPDATE events SET principal = 'user:mallory' WHERE seq = ?", (h.head - 4,))
    return h.head - 4


def delete_a_middle_row(conn: sqlite3.Connection, h: History) -> int:
    conn.execute("DELETE FROM events WHERE seq = ?", (h.head // 2,))
    return h.head // 2


def delete_the_first_rows(conn: sqlite3.Connection, h: History) -> int:
    conn.execute("DELETE FROM events WHERE seq <= 2")
    return 1


def delete_the_tail(conn: sqlite3.Connection, h: History) -> int:
    """The last three rows, the anchored head among them."""
    conn.execute("DELETE FROM events WHERE seq > ?", (h.head - 3,))
    return h.head - 2


def swap_two_rows(conn: sqlite3.Connection, h: History) -> int:
    columns = "time, principal, type, job_id, v, body, hash"
    a, b = h.gated_seq, h.gated_seq + 1
    rows = {seq: conn.execute(f"SELECT {columns} FROM events WHERE seq = ?", (seq,)).fetchone()
            for seq in (a, b)}
    for seq, other in ((a, b), (b, a)):
        conn.execute("UPDATE events SET time = ?, principal = ?, type = ?, job_id = ?, v = ?, "
                     "body = ?, hash = ? WHERE seq = ?", (*rows[other], seq))
    return a


def rechain(conn: sqlite3.Connection, from_seq: int) -> None:
    """What a careful editor does next: every hash from ``from_seq`` on made to match."""
    prev = conn.execute("SELECT hash FROM events WHERE seq = ?", (from_seq - 1,)).fetchone()
    prev = GENESIS if prev is None else prev[0]
    rows = conn.execute("SELECT seq, time, principal, type, job_id, v, body FROM events "
                        "WHERE seq >= ? ORDER BY seq", (from_seq,)).fetchall()
    for seq, *fields in rows:
        prev = chain_hash(prev, seq, *fields)
        conn.execute("UPDATE events SET hash = ? WHERE seq = ?", (prev, seq))
    conn.execute("UPDATE checkpoint SET seq = ?, hash = ?", (rows[-1][0], prev))


def edit_and_rechain(conn: sqlite3.Connection, h: History) -> int:
    rechain(conn, edit_body(conn, h))
    return h.head


def edit_rechain_and_drop_the_anchor(conn: sqlite3.Connection, h: History) -> int:
    edit_and_rechain(conn, h)
    conn.execute("DELETE FROM checkpoint")
    return h.head


def append_a_forged_row(conn: sqlite3.Connection, h: History) -> int:
    """An approval nobody gave, chained correctly after the head."""
    prev = conn.execute("SELECT hash FROM events WHERE seq = ?", (h.head,)).fetchone()[0]
    event = ev.JobApproved(job_id=h.gated_job)
    row = (h.head + 1, 1.0e9 * 2, "user:admin", "job_approved", h.gated_job,
           ev.SCHEMA_VERSION, ev.encode(event))
    conn.execute("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                 (*row, chain_hash(prev, *row)))
    return h.head + 1


Tamper = Callable[[sqlite3.Connection, History], int]


def tampered_copy(history: History, tmp_path: Path, tamper: Tamper) -> tuple[Path, int]:
    data = tmp_path / "data"
    shutil.copytree(history.data_dir, data)
    with closing(sqlite3.connect(data / "events.db")) as conn, conn:
        seq = tamper(conn, history)
    return data, seq


@pytest.mark.parametrize("tamper", [
    edit_body, edit_principal, delete_a_middle_row, delete_the_first_rows, delete_the_tail,
    swap_two_rows, edit_and_rechain, edit_rechain_and_drop_the_anchor, append_a_forged_row,
])
def test_a_tampered_log_is_named_by_seq_and_refuses_to_start(
        history: History, tmp_path: Path, tamper: Tamper) -> None:
    data, seq = tampered_copy(history, tmp_path, tamper)

    verified = serverproc.eventq("replay", "verify", "--data-dir", str(data))
    assert verified.returncode != 0, verified.stdout
    assert f"seq {seq}" in verified.stdout, verified.stdout

    refusal = serverproc.refused_start(data, tmp_path / "server.stderr")
    assert refusal.code != 0
    assert len(refusal.stderr) == 1, refusal.stderr
    assert f"seq {seq}" in refusal.stderr[0] and "eventq replay verify" in refusal.stderr[0]


def test_verify_reports_the_bad_seq_as_json(history: History, tmp_path: Path) -> None:
    data, seq = tampered_copy(history, tmp_path, delete_the_tail)
    verified = serverproc.eventq("replay", "verify", "--data-dir", str(data), "--format", "json")
    assert verified.returncode != 0
    report = json.loads(verified.stdout)
    assert report["ok"] is False and report["first_bad_seq"] == seq


def test_the_untouched_log_verifies_and_its_approval_runs_the_command_it_was_given(
        history: History, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(history.data_dir, data)
    verified = serverproc.eventq("replay", "verify", "--data-dir", str(data))
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert f"OK: {history.head} events" in verified.stdout
    with serverproc.running(data, tmp_path / "server.stderr") as server:
        job = history.gated_job
        assert server.call("POST", f"/api/queue/{job}/approve")[0] == 200
        wait_until(lambda: server.call("GET", f"/api/jobs/{job}")[1]["status"] == "completed",
                   "the approved job completes")
        status, out = server.call("GET", f"/api/jobs/{job}/logs")
    assert status == 200 and out == f"{ORIGINAL.decode()}\n"


def test_a_log_from_before_anchors_starts_with_a_warning_and_is_anchored_from_then_on(
        history: History, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(history.data_dir, data)
    (data / "events.key").unlink()
    with closing(sqlite3.connect(data / "events.db")) as conn, conn:
        conn.execute("DROP TABLE checkpoint")
    old = serverproc.eventq("replay", "verify", "--data-dir", str(data), "--format", "json")
    assert json.loads(old.stdout) == {"ok": True, "events": history.head, "problems": [],
                                      "anchor": "unkeyed"}

    with serverproc.running(data, tmp_path / "server.stderr"):
        pass
    assert "log_not_anchored" in (tmp_path / "server.stderr").read_text()

    verified = serverproc.eventq("replay", "verify", "--data-dir", str(data), "--format", "json")
    assert json.loads(verified.stdout)["anchor"] == "keyed"
    with closing(sqlite3.connect(data / "events.db")) as conn, conn:
        edit_and_rechain(conn, history)
    refusal = serverproc.refused_start(data, tmp_path / "again.stderr")
    assert refusal.code != 0 and "MAC" in refusal.stderr[0]
