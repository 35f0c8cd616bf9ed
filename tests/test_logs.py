"""An attempt's output: read at once, followed live while the job prints, capped, purged."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient

from eventq import events as ev
from eventq import logfiles
from eventq.clock import SimClock
from eventq.server import Orchestrator
from tests.test_stream import Frame, bearer, frames_until, next_frame, submit, until

MakeOrch = Callable[..., Awaitable[Orchestrator]]


async def logs(api: TestClient[Any, Any], job_id: str, query: str = "",
               token: str | None = None) -> tuple[int, str]:
    resp = await api.get(f"/api/jobs/{job_id}/logs{query}",
                         headers=bearer(token) if token else None)
    return resp.status, await resp.text()


async def finished(orch: Orchestrator, job_id: str) -> None:
    await until(lambda: orch.state.jobs[job_id].status in ("completed", "failed"))


def text_of(frames: list[Frame], stream: str) -> str:
    return "".join(f.data["text"] for f in frames if f.event == "log"
                   and f.data["stream"] == stream)


async def test_the_owner_reads_stdout_stderr_or_both_of_any_attempt(
        api: TestClient[Any, Any], orch: Orchestrator) -> None:
    job = await submit(api, gpus=0, retry_on_failure=True, max_attempts=2, command=(
        'echo "attempt $EVENTQ_ATTEMPT"; echo "oops $EVENTQ_ATTEMPT" >&2; exit 1'))
    await until(lambda: orch.state.jobs[job["job_id"]].status == "failed")
    resp = await api.get(f"/api/jobs/{job['job_id']}/logs")
    assert resp.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert await resp.text() == "attempt 2\n", "the latest attempt's stdout by default"
    assert await logs(api, job["job_id"], "?attempt=1") == (200, "attempt 1\n")
    assert await logs(api, job["job_id"], "?attempt=1&stream=stderr") == (200, "oops 1\n")
    assert await logs(api, job["job_id"], "?stream=all") == (200, "attempt 2\noops 2\n")


async def test_only_the_owner_or_an_admin_may_read_and_bad_requests_say_why(
        api: TestClient[Any, Any], orch: Orchestrator) -> None:
    alice = orch.add_user("alice", ev.Level.RESEARCHER)
    bob = orch.add_user("bob", ev.Level.RESEARCHER)
    job = await submit(api, alice, command="echo hi from alice", gpus=0)
    await finished(orch, job["job_id"])
    assert await logs(api, job["job_id"], token=alice) == (200, "hi from alice\n")
    assert await logs(api, job["job_id"]) == (200, "hi from alice\n")  # the admin
    status, body = await logs(api, job["job_id"], token=bob)
    assert status == 403 and "owner" in body
    status, _ = await logs(api, job["job_id"], "?follow=true", token=bob)
    assert status == 403
    assert (await logs(api, "0123456789ab", token=alice))[0] == 404
    for query, field in (("?attempt=2", "attempt"), ("?attempt=0", "attempt"),
                         ("?attempt=last", "attempt"), ("?stream=both", "stream"),
                         ("?follow=true&attempt=2", "attempt")):
        resp = await api.get(f"/api/jobs/{job['job_id']}/logs{query}")
        assert resp.status == 422 and (await resp.json())["field"] == field, query


async def test_following_a_running_job_streams_its_lines_as_it_prints_them(
        api: TestClient[Any, Any], orch: Orchestrator, tmp_path: Path) -> None:
    job = await submit(api, gpus=0, command=(
        f"for i in 1 2 3; do while [ ! -e {tmp_path}/go$i ]; do sleep 0.02; done; "
        "echo line $i; done; echo bye >&2; exit 3"))
    resp = await api.get(f"/api/jobs/{job['job_id']}/logs?follow=true&stream=all")
    assert resp.headers["Content-Type"] == "text/event-stream"
    got: list[Frame] = []
    for line in ("line 1\n", "line 2\n", "line 3\n"):
        (tmp_path / f"go{line[5]}").touch()  # the job prints its next line only now
        while not text_of(got, "stdout").endswith(line):
            frame = await next_frame(resp)
            assert frame is not None and frame.event == "log"
            got.append(frame)
        assert line == "line 3\n" or orch.state.jobs[job["job_id"]].status == "running"
    got += await frames_until(resp, lambda f: f.event == "end")
    assert await next_frame(resp) is None, "the stream closes after end"
    assert text_of(got, "stdout") == "line 1\nline 2\nline 3\n"
    assert text_of(got, "stderr") == "bye\n"
    assert [f.id for f in got if f.event == "log" and f.data["stream"] == "stdout"][-1] == \
        "stdout:21", "the id is the byte offset after the chunk"
    assert got[-1].data == {"job_id": job["job_id"], "attempt": 1, "status": "failed",
                            "exit_code": 3}


async def test_following_a_queued_job_waits_for_it_to_start(
        api: TestClient[Any, Any], orch: Orchestrator, tmp_path: Path) -> None:
    await api.post("/api/queue/concurrency", json={"local_job_max_concurrent": 1})
    blocker = await submit(api, gpus=0, command=f"while [ ! -e {tmp_path}/done ]; do "
                                                "sleep 0.02; done")
    job = await submit(api, gpus=0, command="echo finally my turn")
    resp = await api.get(f"/api/jobs/{job['job_id']}/logs?follow=true")
    assert orch.state.jobs[job["job_id"]].status == "pending", "the local node runs one job"
    (tmp_path / "done").touch()
    got = await frames_until(resp, lambda f: f.event == "end")
    assert orch.state.jobs[blocker["job_id"]].status == "completed"
    assert text_of(got, "stdout") == "finally my turn\n"
    assert got[-1].data == {"job_id": job["job_id"], "attempt": 1, "status": "completed",
                            "exit_code": 0}


def frees_space(directory: Path) -> bool:
    """Can this filesystem punch holes (so that dropped output gives its disk space back)?"""
    probe = directory / "probe"
    probe.write_bytes(b"x" * 65536)
    fd = os.open(probe, os.O_WRONLY)
    try:
        os.fsync(fd)
        return logfiles.punch_hole(fd, 0, 32768)
    finally:
        os.close(fd)
        probe.unlink()


async def test_output_past_the_cap_is_read_as_a_marker_and_the_newest_lines(
        api: TestClient[Any, Any], orch: Orchestrator, tmp_path: Path) -> None:
    orch.log_cap_bytes = 4096
    job = await submit(api, gpus=0, command=(
        "i=0; while [ $i -lt 400 ]; do printf 'line %05d %088d\\n' $i 0; i=$((i+1)); done"))
    await finished(orch, job["job_id"])
    printed = "".join(f"line {i:05d} {0:088d}\n" for i in range(400))
    assert len(printed) == 40_000

    status, text = await logs(api, job["job_id"])
    first, _, kept = text.partition("\n")
    assert status == 200 and first.startswith("[eventq: ") and first.endswith(" bytes dropped]")
    dropped = int(first.split()[1])
    assert kept.startswith("line ") and printed.endswith(kept) and len(kept) <= 4096
    assert dropped + len(kept) == len(printed)
    assert kept.endswith("line 00399 " + "0" * 88 + "\n")

    follow = await api.get(f"/api/jobs/{job['job_id']}/logs?follow=true")
    got = await frames_until(follow, lambda f: f.event == "end")
    assert text_of(got, "stdout") == text, "a follow shows the same marker and lines"

    stdout = logfiles.log_path(orch.data_dir, job["job_id"], 1, "stdout")
    if frees_space(tmp_path):
        st = os.stat(stdout)
        assert st.st_size == 40_000, "the writer's file keeps its size and offsets"
        assert st.st_blocks * 512 < st.st_size, "the dropped part no longer takes disk space"


async def test_purging_a_job_deletes_its_files(api: TestClient[Any, Any], orch: Orchestrator,
                                               clock: SimClock) -> None:
    job = await submit(api, gpus=0, command="echo something to keep for a while")
    await finished(orch, job["job_id"])
    directory = orch.data_dir / "jobs" / job["job_id"]
    assert (directory / "1" / "stdout.log").exists()
    clock.advance(2 * 86400)
    purged = await (await api.post("/api/queue/cleanup?days=1")).json()
    assert purged["deleted"] == 1
    await until(lambda: not directory.exists())
    assert (await logs(api, job["job_id"]))[0] == 404
    assert (orch.data_dir / "jobs").exists(), "only that job's directory goes"


async def test_a_follow_ends_when_the_server_shuts_down(
        api: TestClient[Any, Any], orch: Orchestrator, tmp_path: Path) -> None:
    job = await submit(api, gpus=0, command=f"echo started; while [ ! -e {tmp_path}/x ]; do "
                                            "sleep 0.02; done")
    resp = await api.get(f"/api/jobs/{job['job_id']}/logs?follow=true")
    await frames_until(resp, lambda f: f.event == "log")
    await api.server.close()
    assert await next_frame(resp) is None, "closed cleanly, without an end: the job runs on"
    (tmp_path / "x").touch()


async def test_a_follow_ends_when_its_token_is_revoked_or_its_reader_may_no_longer_read(
        api: TestClient[Any, Any], orch: Orchestrator, tmp_path: Path) -> None:
    """Alice follows her job, Carol (an admin) follows it too; a viewer demotion keeps
    Alice's follow (she still owns the job), Carol's demotion ends hers, and revoking
    Alice's tokens ends Alice's: each with a last event saying why."""
    alice = orch.add_user("alice", ev.Level.RESEARCHER)
    carol = orch.add_user("carol", ev.Level.ADMIN)
    job = await submit(api, alice, gpus=0, command=(
        f"echo one; while [ ! -e {tmp_path}/go ]; do sleep 0.02; done; echo two"))
    url = f"/api/jobs/{job['job_id']}/logs?follow=true"
    hers, theirs = [await api.get(url, headers=bearer(t)) for t in (alice, carol)]
    for resp in (hers, theirs):
        assert text_of(await frames_until(resp, lambda f: f.event == "log"), "stdout") == "one\n"

    for name, level in (("alice", "viewer"), ("carol", "researcher")):
        resp = await api.patch(f"/api/admin/users/{name}", json={"level": level})
        assert resp.status == 200
    assert (await logs(api, job["job_id"], token=carol))[0] == 403
    assert (await api.delete("/api/admin/users/alice/tokens")).status == 200
    (tmp_path / "go").touch()  # the job prints on and ends: none of it reaches them now
    await finished(orch, job["job_id"])
    for resp, why in ((theirs, "owner or an admin"), (hers, "revoked")):
        last = await frames_until(resp, lambda f: f.event != "log")
        assert [f.event for f in last] == ["revoked"] and why in last[0].data["reason"]
        assert await next_frame(resp) is None
