"""``eventq replay why`` and ``eventq replay at``: a job's story and the GPUs at a moment, told
by the log file alone. The log is written by a real orchestrator on a simulated clock, so
every wait has an exact, known length; the installed command then reads the file."""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from eventq.clock import SimClock
from eventq.server import Orchestrator
from eventq.timefmt import iso
from tests.helpers import until
from tests.test_cli import EVENTQ

pytestmark = pytest.mark.slow
Api = TestClient[Any, Any]


def runs_until(tmp_path: Path, name: str) -> list[str]:
    return ["sh", "-c", f"while [ ! -e {tmp_path}/{name} ]; do sleep 0.02; done"]


async def submit(api: Api, **body: Any) -> str:
    resp = await api.post("/api/queue/submit", json=body)
    reply: dict[str, Any] = await resp.json()
    assert resp.status == 200, reply
    return str(reply["job_id"])




async def replay(orch: Orchestrator, *args: str, check: bool = True) -> \
        subprocess.CompletedProcess[str]:
    """``eventq replay ACTION --data-dir DATA …`` once everything logged is on disk."""
    await orch.log.flush()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTQ_")}
    done = await asyncio.to_thread(
        subprocess.run, [EVENTQ, "replay", args[0], "--data-dir", str(orch.data_dir), *args[1:]],
        capture_output=True, text=True, timeout=30, env=env)
    if check:
        assert done.returncode == 0, done.stderr
    else:
        assert done.returncode != 0 and done.stdout == "", done.stdout
    return done


async def replay_json(orch: Orchestrator, *args: str) -> Any:
    return json.loads((await replay(orch, *args, "--format", "json")).stdout)


async def test_why_tells_each_state_who_did_it_and_how_long_each_reason_held_the_job(
        api: Api, orch: Orchestrator, clock: SimClock, tmp_path: Path) -> None:
    await api.post("/api/queue/concurrency", json={"local_job_max_concurrent": 1})
    t0 = clock.now()
    first = await submit(api, command=runs_until(tmp_path, "a"), gpus=2)
    second = await submit(api, command=["true"], gpus=2)  # local runs 1 of 1 jobs
    clock.advance(300)
    await api.post(f"/api/queue/{second}/hold")
    clock.advance(60)
    await api.post(f"/api/queue/{second}/release")
    clock.advance(40)
    (tmp_path / "a").touch()
    await until(lambda: orch.state.jobs[second].status == "completed", "the second job ran")

    story = await replay_json(orch, "why", second)
    assert [s["state"] for s in story["steps"]] == [
        "submitted", "waiting", "held", "released", "waiting", "dispatched", "running",
        "attempt ended", "completed"]
    by_state = {s["state"]: s for s in story["steps"]}
    assert (by_state["held"]["by"], by_state["held"]["time"]) == ("user:admin", iso(t0 + 300))
    assert by_state["dispatched"]["time"] == iso(t0 + 400)
    assert {r["code"]: r["seconds"] for r in story["reasons"]} == {
        "local_limit": 340.0, "held": 60.0}
    assert story["total_wait_seconds"] == 400.0
    assert (story["status"], story["still_waiting"]) == ("completed", False)

    text = (await replay(orch, "why", second)).stdout
    assert f"job {second}" in text and "completed" in text
    assert "local runs 1 of 1 jobs" in text
    assert "5m 40s" in text and "1m 00s" in text
    assert "total wait: 6m 40s" in text

    gpus_then = await replay_json(orch, "at", datetime.datetime.fromtimestamp(t0 + 100)
                                  .isoformat(), "gpus")
    holders = {g["gpu"]: (g["job_id"], g["attempt"], g["user"]) for g in gpus_then["gpus"]}
    assert holders == {0: (first, 1, "admin"), 1: (first, 1, "admin"),
                       2: (None, None, None), 3: (None, None, None)}
    assert gpus_then["gpus"][0]["since"] == iso(t0)
    table = (await replay(orch, "at", str(t0 + 100), "gpus")).stdout
    assert first in table and "1m 40s" in table, "epoch seconds work too; held for 100 s"
    dispatched = str(by_state["dispatched"]["seq"])
    at_seq = await replay_json(orch, "at", dispatched, "gpus", "--seq")
    assert {g["gpu"] for g in at_seq["gpus"] if g["job_id"] == second} == {0, 1}


async def test_why_counts_each_attempts_wait_and_a_job_still_waiting(
        api: Api, orch: Orchestrator, clock: SimClock, tmp_path: Path) -> None:
    await api.post("/api/queue/concurrency", json={"local_job_max_concurrent": 1})
    await submit(api, command=runs_until(tmp_path, "b"), gpus=1)
    flaky = await submit(api, command=["sh", "-c", f"test -e {tmp_path}/ok || "
                                       f"{{ touch {tmp_path}/ok; exit 3; }}"],
                         gpus=1, retry_on_failure=True, max_attempts=2)
    clock.advance(120)
    (tmp_path / "b").touch()
    await until(lambda: orch.state.jobs[flaky].status == "completed", "the retry completed")
    await submit(api, command=runs_until(tmp_path, "c"), gpus=1)
    waiting = await submit(api, command=["true"], gpus=1)
    clock.advance(30)

    story = await replay_json(orch, "why", flaky)
    assert [(w["attempt"], w["seconds"]) for w in story["waits"]] == [(1, 120.0), (2, 0.0)]
    assert story["total_wait_seconds"] == 120.0
    requeued = next(s for s in story["steps"] if s["state"] == "requeued")
    assert requeued["detail"] == "as attempt 2: exit code 3"
    assert "attempt 1: 2m 00s, attempt 2: 0s" in (await replay(orch, "why", flaky)).stdout

    still = await replay_json(orch, "why", waiting)
    assert (still["status"], still["still_waiting"]) == ("pending", True)
    assert [(r["code"], r["still_waiting"]) for r in still["reasons"]] == [
        ("local_limit", True)]
    assert "so far (still waiting)" in (await replay(orch, "why", waiting)).stdout
    (tmp_path / "c").touch()


async def test_replay_why_and_at_refuse_what_they_cannot_answer(
        api: Api, orch: Orchestrator, tmp_path: Path) -> None:
    await submit(api, command=["true"], gpus=1)
    unknown = await replay(orch, "why", "nosuch", check=False)
    assert "no job nosuch in the log" in unknown.stderr
    missing = await replay(orch, "why", "x", "--log", str(tmp_path / "none.db"), check=False)
    assert "no event log at" in missing.stderr
    early = await replay(orch, "at", "12", "gpus", check=False)
    assert "nothing was recorded by then" in early.stderr and "add --seq" in early.stderr
    unreadable = await replay(orch, "at", "noon", "gpus", check=False)
    assert "cannot read the time 'noon'" in unreadable.stderr
    not_a_seq = await replay(orch, "at", "1.5", "gpus", "--seq", check=False)
    assert "--seq wants an event number" in not_a_seq.stderr
