"""A server that cannot trust or write its log stops with one clear line, and loses nothing.

Real ``eventq server`` processes. The read-only and full-disk stories mount a small tmpfs,
which needs root; elsewhere they are skipped, saying so.
"""

from __future__ import annotations

import concurrent.futures
import socket
import sqlite3
import subprocess
from contextlib import closing
from pathlib import Path

import pytest

from eventq import lockfile
from tests import serverproc
from tests.helpers import fill, mount, tmpfs

GATED = {"command": ["true"], "requires_approval": True, "gpus": 0}


def assert_one_clear_line(refusal: serverproc.Refusal, *words: str) -> str:
    assert refusal.code != 0
    assert len(refusal.stderr) == 1, refusal.stderr
    line = refusal.stderr[0]
    assert line.startswith("eventq: ") and "Traceback" not in line
    for word in words:
        assert word in line, line
    return line


def test_a_corrupt_log_ends_the_start_at_once_and_frees_the_data_directory(
        tmp_path: Path) -> None:
    data = tmp_path / "data"
    with serverproc.running(data, tmp_path / "first.stderr") as server:
        assert server.call("POST", "/api/queue/submit", GATED)[0] == 200
    with closing(sqlite3.connect(data / "events.db")) as conn, conn:
        conn.execute("DELETE FROM events WHERE seq = 3")  # a gap even the old start saw

    refusal = serverproc.refused_start(data, tmp_path / "second.stderr")

    assert_one_clear_line(refusal, "seq 3", "eventq replay verify", "nothing was run")
    lockfile.take(data / "server.lock").close()  # no process holds the directory


def test_a_data_directory_that_cannot_be_made_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory\n")
    refusal = serverproc.refused_start(blocker / "data", tmp_path / "server.stderr")
    assert_one_clear_line(refusal, "cannot write in the data directory", str(blocker))


def test_a_port_already_taken_is_one_line_and_frees_the_data_directory(
        tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        refusal = serverproc.refused_start(tmp_path / "data", tmp_path / "server.stderr",
                                           "--port", str(port))
    # The log was opened and recovered before the listener: its info lines come first.
    assert refusal.code != 0 and "Traceback" not in "\n".join(refusal.stderr)
    assert [ln for ln in refusal.stderr if ln.startswith("eventq: ")] == [refusal.stderr[-1]]
    assert f"127.0.0.1:{port}" in refusal.stderr[-1] and "in use" in refusal.stderr[-1]
    lockfile.take(tmp_path / "data" / "server.lock").close()


def test_a_read_only_data_directory_is_one_line_and_changes_nothing(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "mnt", "16m") as mnt:
        data = mnt / "data"
        with serverproc.running(data, tmp_path / "first.stderr") as server:
            assert server.call("POST", "/api/queue/submit", GATED)[0] == 200
        before = {p.name: p.read_bytes() for p in data.iterdir() if p.is_file()}
        assert mount("-o", "remount,ro", str(mnt)).returncode == 0

        refusal = serverproc.refused_start(data, tmp_path / "second.stderr")

        assert_one_clear_line(refusal, "Read-only file system", str(data))
        assert {p.name: p.read_bytes() for p in data.iterdir() if p.is_file()} == before


def submit_until_refused(server: serverproc.Server, clients: int = 8,
                         most: int = 20_000) -> list[str]:
    """Submissions from ``clients`` threads until the server stops answering; the ids of
    those it acknowledged."""
    def client() -> list[str]:
        acked: list[str] = []
        for _ in range(most // clients):
            try:
                status, reply = server.call("POST", "/api/queue/submit", GATED, timeout=10)
            except OSError:
                break
            if status != 200:
                break
            acked.append(reply["job_id"])
        return acked

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        return [job for done in pool.map(lambda _: client(), range(clients)) for job in done]


def test_a_disk_that_fills_stops_the_server_and_loses_nothing_acknowledged(
        tmp_path: Path) -> None:
    with tmpfs(tmp_path / "mnt", "2m") as mnt:
        data = mnt / "data"
        with serverproc.running(data, tmp_path / "first.stderr") as server:
            acked = submit_until_refused(server)
            code = server.proc.wait(30)
        lines = (tmp_path / "first.stderr").read_text().splitlines()
        assert code == 70 and acked, (code, len(acked))
        assert "Traceback" not in "\n".join(lines)
        assert [ln for ln in lines if "FATAL" in ln] == [lines[-1]]
        assert "database or disk is full" in lines[-1] and "Restart" in lines[-1]

        assert mount("-o", "remount,size=64m", str(mnt)).returncode == 0
        with serverproc.running(data, tmp_path / "second.stderr") as server:
            missing = [job for job in acked
                       if server.call("GET", f"/api/jobs/{job}")[0] != 200]
        assert missing == [], f"{len(missing)} of {len(acked)} acknowledged jobs lost"
        verified = serverproc.eventq("replay", "verify", "--data-dir", str(data))
        assert verified.returncode == 0, verified.stdout + verified.stderr


def test_a_full_temporary_directory_stops_no_commit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SQLite keeps a commit's statement journal in its temporary directory
    (``$SQLITE_TMPDIR``, ``$TMPDIR``, else ``/var/tmp``) once it outgrows 64 KiB, a few
    16 KiB pages. On a GPU machine that directory is where training jobs spill, not the
    data disk: a full one must not stop the queue, whose own disk has room."""
    with tmpfs(tmp_path / "tmp", "64k") as tmp:
        fill(tmp)
        monkeypatch.setenv("SQLITE_TMPDIR", str(tmp))
        data = tmp_path / "data"
        with serverproc.running(data, tmp_path / "stderr") as server:
            acked = submit_until_refused(server, clients=16, most=1_600)
            alive = server.proc.poll() is None
        lines = (tmp_path / "stderr").read_text()
        assert alive and len(acked) == 1_600, (len(acked), lines[-400:])
        assert "FATAL" not in lines
        verified = serverproc.eventq("replay", "verify", "--data-dir", str(data))
        assert verified.returncode == 0, verified.stdout + verified.stderr


def test_a_server_whose_lines_lost_their_reader_goes_on(tmp_path: Path) -> None:
    """Whoever read the server's stderr went away (journald restarted, the ``tee`` of
    ``eventq server 2>&1 | tee`` ended). The next line's write raised ``BrokenPipeError`` in
    the log's commit loop and ended it: the server went on taking submissions, answered
    none, and would not stop. Lines are lost now; the queue is not."""
    data = tmp_path / "data"
    proc = subprocess.Popen(serverproc.server_argv(data), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=serverproc.clean_env(),
                            start_new_session=True)
    try:
        line = serverproc.first_line(proc, 60)
        assert line is not None and line.startswith(serverproc.LISTENING), line
        assert proc.stderr is not None
        proc.stderr.close()  # the reader goes away
        server = serverproc.Server(proc, line[len(serverproc.LISTENING):].split()[0],
                                   (data / "admin.token").read_text().strip())
        jobs = []
        for _ in range(5):
            status, reply = server.call("POST", "/api/queue/submit",
                                        {"command": ["sh", "-c", "echo ran"], "gpus": 1})
            assert status == 200, reply
            jobs.append(reply["job_id"])
        serverproc.wait_until(lambda: all(
            server.call("GET", f"/api/jobs/{job}")[1]["status"] == "completed"
            for job in jobs), "the jobs to complete")
        assert proc.poll() is None
        status, metrics = server.call("GET", "/metrics")
        lost = next(float(ln.split()[-1]) for ln in metrics.splitlines()
                    if ln.startswith("eventq_lines_lost_total "))
        assert status == 200 and lost >= 1  # what an operator sees of the lines gone
    finally:
        code = serverproc.end(proc)
    assert code == 0  # SIGTERM still stops it, cleanly
