"""Writes ``tests/golden/events.db`` and ``tests/golden/expected_state.json``.

A short, fully determined history on a simulated clock with fixed job ids: users and
limits are appended straight to the log, one job is stored the way schema version 0
stored it (``num_processes`` instead of ``gpus``, with a correct chain hash), and the
rest is played through the real scheduler and allocator actors (no node: the
attempts' starts and ends are reports the script sends). The expected state is taken
from the live actors at the end, not from a replay, so ``tests/test_golden_log.py``
checks replay against what the system actually held.

The story, on 4 GPUs with max_concurrent 3 and user_max_concurrent 2:

- ``golden-v0`` (alice, the v0 row, 2 GPUs) runs on 0,1 and later exits 1: failed.
- ``golden-a`` (alice, 1 GPU) runs on 2 and completes.
- ``golden-b`` (alice) waits for her limit, then runs on 2 when ``golden-a`` ends.
- ``golden-c`` (bob, 1 GPU, max_runtime 600) runs on 3, is lost, is retried as
  attempt 2, and is stopped for exceeding max_runtime: failed (a late report of its
  first attempt is ignored).
- ``golden-d`` (bob, 2 GPUs) waits, then runs on 0,1.
- ``golden-e`` (alice) waits and is cancelled.
- ``golden-f`` (bob, CPU only) waits for his limit (and, until max_concurrent is raised
  to 4, the global one), then runs once ``golden-c`` has failed.
- ``golden-g`` (alice, 2 GPUs; one is free) and ``golden-h`` (bob, lead; his limit) are
  left waiting, ``golden-h`` first.

Run from the repository root: ``.venv/bin/python tools/make_golden_log.py``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
from pathlib import Path
from typing import Any

import msgspec

from eventq import events as ev
from eventq import gpus
from eventq.actors.allocator import Allocator, GpuTable
from eventq.actors.scheduler import (
    AttemptReport,
    Cancel,
    Process,
    Scheduler,
    SetLimits,
    Submit,
)
from eventq.actors.scheduler_state import SchedulerState
from eventq.clock import SimClock
from eventq.log import ANCHOR, EventLog, Record, anchor_mac, chain_hash, read_key

GOLDEN = Path(__file__).resolve().parent.parent / "tests" / "golden"
START = 1_700_000_000.0
LIMITS = ev.Limits(max_concurrent=3, user_max_concurrent=2, local_job_max_concurrent=10)
V0_JOB = "golden-v0"


def fixed_hash(name: str) -> str:
    return hashlib.sha256(f"golden-token-{name}".encode()).hexdigest()


def job(job_id: str, user: str, gpus: int = 1, **fields: Any) -> ev.JobSpec:
    priority = 20 if user == "bob" else 10
    team = "Beta" if user == "bob" else "Alpha"
    return ev.JobSpec(job_id=job_id, user=user, priority=priority, command=["python", "train.py"],
                      name=job_id, team=team, gpus=gpus, **fields)


async def write_header(path: Path, clock: SimClock) -> None:
    """Server start, inventory, users and limits: plain facts, appended as they are."""
    log = await EventLog.open(path, clock.now)
    log.start()
    log.append("system", [ev.ServerStarted(pid=4242, version="0.1.0")])
    log.append("system", [ev.NodeInventoryReported(
        node="local", gpus=gpus.simulated("4xA100-80GB").gpus, simulated=True)])
    for name, level, team in (("admin", ev.Level.ADMIN, None),
                              ("alice", ev.Level.RESEARCHER, "Alpha"),
                              ("bob", ev.Level.LEAD, "Beta")):
        log.append("system", [ev.UserCreated(name=name, level=level, team=team,
                                             token_sha256=fixed_hash(name))])
    log.append("user:admin", [ev.LimitsChanged(limits=LIMITS)])
    await log.close()


def write_v0_row(path: Path, clock: SimClock) -> None:
    """A job_submitted as schema version 0 stored it, chained to the row before it."""
    spec = msgspec.to_builtins(job(V0_JOB, "alice", gpus=2))
    spec["num_processes"] = spec.pop("gpus")
    body = msgspec.msgpack.encode({"type": "job_submitted", "job": spec})
    with sqlite3.connect(path) as conn:
        seq, prev = conn.execute(
            "SELECT seq, hash FROM events ORDER BY seq DESC LIMIT 1").fetchone()
        seq += 1
        digest = chain_hash(prev, seq, clock.now(), "user:alice", "job_submitted", V0_JOB, 0,
                            body)
        conn.execute("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                     (seq, clock.now(), "user:alice", "job_submitted", V0_JOB, 0, body, digest))
        # The head moves with it, as a server's commit moves it: the next start accepts
        # no row past the anchored head.
        key = read_key(path)
        assert key is not None
        conn.execute(ANCHOR, (seq, digest, anchor_mac(key.secret, seq, digest)))
    conn.close()


class Story:
    """The actors over the log, and the steps of the story."""

    def __init__(self, log: EventLog, clock: SimClock) -> None:
        self.log, self.clock = log, clock
        self.state, self.table = SchedulerState(), GpuTable()
        log.subscribe(self.state.evolve)
        log.subscribe(self.table.evolve)
        log.subscribe(self.note_time)
        self.last_time = 0.0
        log.replay()
        log.start()
        self.allocator = Allocator(log, self.table)
        self.scheduler = Scheduler(log, self.state, self.allocator, self.table, clock)
        self.allocator.start()
        self.scheduler.start()
        self.pids = 1000

    def note_time(self, record: Record) -> None:
        self.last_time = record.time

    async def tell(self, message: Any) -> None:
        await self.scheduler.ask(message)
        await self.log.flush()

    async def submit(self, spec: ev.JobSpec) -> None:
        await self.tell(Submit(spec, f"user:{spec.user}"))
        await self.started_all()

    async def started_all(self) -> None:
        """Each newly dispatched attempt's process reports that it started."""
        for job_id, j in sorted(self.state.jobs.items()):
            if j.active and j.pid is None:
                self.pids += 1
                await self.tell(AttemptReport(job_id, j.attempt, "started", pid=self.pids))

    async def ended(self, job_id: str, **how: Any) -> None:
        await self.tell(AttemptReport(job_id, self.state.jobs[job_id].attempt, "ended", **how))
        await self.started_all()

    async def play(self) -> None:
        await self.tell(Process())  # the v0 job, found waiting on start
        await self.started_all()
        await self.submit(job("golden-a", "alice"))
        await self.submit(job("golden-b", "alice"))
        await self.submit(job("golden-c", "bob", max_runtime=600.0))
        await self.submit(job("golden-d", "bob", gpus=2))
        self.clock.advance(60)
        await self.ended("golden-a", exit_code=0)
        await self.ended(V0_JOB, exit_code=1)
        await self.submit(job("golden-e", "alice"))
        await self.tell(Cancel("golden-e", "user:alice"))
        await self.submit(job("golden-f", "bob", gpus=0))
        self.clock.advance(30)
        await self.ended("golden-c", outcome="lost", detail="node lost")
        await self.tell(AttemptReport("golden-c", 1, "ended", exit_code=0))  # late, ignored
        await self.tell(SetLimits(msgspec.structs.replace(LIMITS, max_concurrent=4),
                                  "user:admin"))
        self.clock.advance(700)  # golden-c's second attempt passes its max_runtime
        await self.tell(Process())
        await self.ended("golden-c", exit_code=143)
        await self.submit(job("golden-g", "alice", gpus=2))
        await self.submit(job("golden-h", "bob"))

    async def stop(self) -> None:
        await self.scheduler.stop()
        await self.allocator.stop()
        await self.log.close()


def summarize(state: SchedulerState, table: GpuTable, last_seq: int,
              last_time: float) -> dict[str, Any]:
    """The known state: jobs, GPU holdings, limits and the queue's order."""
    return {
        "last_seq": last_seq,
        "jobs": {job_id: {"status": j.status, "attempt": j.attempt, "gpus": j.spec.gpus,
                          "allocated_gpus": list(j.gpus) if j.active else [],
                          "exit_code": j.exit_code, "error": j.error,
                          "reasons": [r.code for r in j.reasons]}
                 for job_id, j in sorted(state.jobs.items())},
        "gpus": {node: {str(g): f"{h[0]}#{h[1]}" for g, h in sorted(n.held.items())}
                 for node, n in sorted(table.nodes.items())},
        "limits": msgspec.to_builtins(state.limits),
        "queue": [j.spec.job_id for j in state.iter_waiting(last_time)],
        "running": state.counts.total,
    }


async def build(path: Path) -> dict[str, Any]:
    clock = SimClock(START)
    await write_header(path, clock)
    clock.advance(5)
    write_v0_row(path, clock)
    clock.advance(5)
    story = Story(await EventLog.open(path, clock.now), clock)
    try:
        await story.play()
        return summarize(story.state, story.table, story.log.head_seq, story.last_time)
    finally:
        await story.stop()


def main() -> None:
    GOLDEN.mkdir(parents=True, exist_ok=True)
    path = GOLDEN / "events.db"
    for stale in (path, path.with_name("events.db-wal"), path.with_name("events.db-shm"),
                  path.with_name("events.key")):
        stale.unlink(missing_ok=True)
    expected = asyncio.run(build(path))
    (GOLDEN / "expected_state.json").write_text(json.dumps(expected, indent=2) + "\n")
    print(f"wrote {path} ({expected['last_seq']} events) and expected_state.json")


if __name__ == "__main__":
    main()
