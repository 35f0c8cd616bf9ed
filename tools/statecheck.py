"""What a live server shows equals what its log replays to (ARCHITECTURE rule 2).

The crash harness reads a server's state over HTTP at a moment its log stands still (the
head seq, read before and after, has not moved) and compares it with the state
``eventq.replay.fold`` rebuilds from the log file up to that seq: every job with its
status, attempt, node and GPUs, and the holder of every GPU. A difference means the live
state came from somewhere else than the events, or a restart folded the log into
something else than the server that wrote it had.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eventq.log import connect_readonly
from eventq.replay import Folded, fold

#: The head seq as ``/metrics`` gives it.
HEAD_SEQ = re.compile(r"^eventq_events_appended_total (\S+)$", re.MULTILINE)
#: Differences listed per comparison, at most.
MOST = 10


@dataclass(frozen=True)
class JobView:
    status: str
    attempt: int
    node: str | None
    gpus: tuple[int, ...]


@dataclass
class State:
    """The jobs and who holds each GPU, (node, index) -> job id."""

    jobs: dict[str, JobView]
    holders: dict[tuple[str, int], str]


def head_seq(metrics: str) -> int:
    found = HEAD_SEQ.search(metrics)
    if found is None:
        raise ValueError("/metrics gives no eventq_events_appended_total")
    return int(float(found[1]))


def live_state(jobs: list[dict[str, Any]], status: dict[str, Any]) -> State:
    """From ``GET /api/queue?include_completed=true`` and ``GET /api/system/status?
    include_allocation=true`` (the local node: the only one the harness runs)."""
    return State(
        {j["job_id"]: JobView(j["status"], j["attempt"], j["node"],
                              tuple(j["allocated_gpus"] or ())) for j in jobs},
        {("local", d["index"]): d["job_id"] for d in status["gpu_allocation"]["devices"]
         if d["job_id"] is not None})


def replayed_state(folded: Folded) -> State:
    return State(
        {job_id: JobView(job.status, job.attempt, job.node, tuple(job.gpus))
         for job_id, job in folded.scheduler.jobs.items()},
        {(name, gpu): holder[0] for name, node in folded.gpus.nodes.items()
         for gpu, holder in node.held.items()})


def replay_to(db: Path, seq: int, timeout: float = 10.0) -> State:
    """The state ``replay.fold`` rebuilds from the log file up to ``seq``, once the file
    holds it (the server's head runs ahead of its last commit by a few milliseconds)."""
    deadline = time.monotonic() + timeout
    conn = connect_readonly(db)
    try:
        while (conn.execute("SELECT max(seq) FROM events").fetchone()[0] or 0) < seq:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the log file never held seq {seq}")
            time.sleep(0.005)
        return replayed_state(fold(conn, to_seq=seq))
    finally:
        conn.close()


def differences(live: State, replayed: State) -> list[str]:
    """How the live state differs from the replayed one; empty if it does not."""
    found = [f"job {j}: live {live.jobs.get(j)}, replayed {replayed.jobs.get(j)}"
             for j in sorted(live.jobs.keys() | replayed.jobs.keys())
             if live.jobs.get(j) != replayed.jobs.get(j)]
    found += [f"GPU {node}:{gpu}: live holder {live.holders.get((node, gpu))}, replayed "
              f"{replayed.holders.get((node, gpu))}"
              for node, gpu in sorted(live.holders.keys() | replayed.holders.keys())
              if live.holders.get((node, gpu)) != replayed.holders.get((node, gpu))]
    return found[:MOST] + ([f"… and {len(found) - MOST} more"] if len(found) > MOST else [])
