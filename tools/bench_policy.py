"""One scheduling decision with 100 and with 100,000 queued jobs, and memory per queued job.

The scheduler runs as in the server (real EventLog on a temporary SQLite file, the
Allocator and Scheduler actors, the four projections) but with no local node, so
no process is started: the benchmark itself reports attempts as ended.

Decision: every GPU is busy; one attempt is reported ended (``AttemptReport``);
the scheduler records the end, releases the GPUs through the allocator, runs a
pass (``policy.plan`` over the waiting queue) and dispatches the next job. The
time of that ``ask`` is one decision. A replacement job is then submitted (not
timed), so the queue keeps its length. Three cases:

- ``gpus``: limits raised (as in ``bench_dispatch.py``), the GPUs are what is full.
- ``stock``: the limits of a log that recorded none (``events.UNRECORDED_LIMITS``, the
  defaults before a new log recorded its own); ``local_job_max_concurrent`` (1) is what
  is full, while GPUs stay free.
- ``global``: limits raised but ``max_concurrent`` equals the GPU count, so the
  global limit is full.
- ``cpu``: as ``gpus``, with a job that needs no GPU waiting for a worker (none is
  connected) at the head of the queue: a GPU-less job is waiting, but none can start.
- ``user``: one user's sweep is the whole queue, and that user is at its limit
  (``user_max_concurrent`` 4) while half the GPUs are free.

Also: ``policy.plan`` alone, and the queue views a user hits (``QueueView.list(limit=50)``
= ``GET /api/queue``, the position of the last job, ``QueueView.job`` of the last job =
``GET /api/jobs/ID``, ``QueueView.stats`` = ``GET /api/queue/stats``), for information.

Memory: tracemalloc's traced-memory growth while 100,000 waiting jobs are held in
a SchedulerState folded from decoded ``JobSubmitted`` records, each with a
realistic JobSpec (a short command list, a few env vars, small metadata).

Run from the repository root: ``.venv/bin/python tools/bench_policy.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from eventq import events as ev
from eventq import gpus, policy
from eventq.actors.allocator import Allocator, GpuTable, ReportInventory
from eventq.actors.scheduler import AttemptReport, Scheduler, SetLimits, Submit
from eventq.actors.scheduler_state import SchedulerState
from eventq.auth import Users
from eventq.clock import RealClock
from eventq.log import EventLog, Record
from eventq.projections.queue import QueueView

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.benchkit import print_goals

USERS = [("alice", ev.Level.RESEARCHER, "vision"), ("bob", ev.Level.RESEARCHER, "vision"),
         ("carol", ev.Level.LEAD, "nlp"), ("dave", ev.Level.RESEARCHER, "nlp"),
         ("erin", ev.Level.RESEARCHER, None), ("frank", ev.Level.VIEWER, None),
         ("grace", ev.Level.RESEARCHER, "speech"), ("heidi", ev.Level.ADMIN, None)]
GPU_SPEC = "8xA100-80GB"
GPU_COUNT = 8
CASES = {"gpus": "GPUs full, limits raised",
         "stock": "unrecorded limits, local_job_max_concurrent (1) full",
         "global": f"global limit full (max_concurrent={GPU_COUNT})",
         "cpu": "GPUs full, a job needing no GPU waits for a worker",
         "user": "one user's sweep, at its user limit (4), GPUs free"}
SWEEP_LIMIT = 4


def realistic_spec(i: int, rng: random.Random) -> ev.JobSpec:
    """A job as users submit them: a short command, a few env vars, small metadata."""
    user, level, team = USERS[i % len(USERS)]
    lr = rng.choice(["1e-4", "3e-4", "1e-3"])
    return ev.JobSpec(
        job_id=f"{rng.getrandbits(48):012x}", user=user, priority=ev.LEVEL_PRIORITY[level],
        team=team, command=["python", "train.py", "--config", f"configs/run{i % 97}.yaml",
                            "--lr", lr],
        name=f"run{i % 97}", gpus=1,
        env={"WANDB_PROJECT": f"proj-{i % 7}", "SEED": str(i % 1000), "OMP_NUM_THREADS": "4"},
        metadata={"experiment": f"exp-{i % 31}", "tags": ["sweep", lr]})


def median_ms(values: list[float]) -> float:
    return statistics.median(values) * 1e3


def p90_ms(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))] * 1e3


# --- the scheduler without a node -------------------------------------------------------


@dataclass
class Rig:
    log: EventLog
    state: SchedulerState
    table: GpuTable
    allocator: Allocator
    scheduler: Scheduler
    queue: QueueView
    rng: random.Random
    submitted: int = 0
    #: Every job is this user's (the ``user`` case).
    sweep_user: str | None = None

    @classmethod
    async def start(cls, path: Path, limits: ev.Limits) -> Rig:
        """What Orchestrator.start assembles, less the local node and the HTTP app."""
        clock = RealClock()
        log = await EventLog.open(path, clock.now)
        state, table, users = SchedulerState(), GpuTable(), Users()
        allocator = Allocator(log, table)
        scheduler = Scheduler(log, state, allocator, table, clock)
        queue = QueueView(state, table, scheduler)
        log.fold_into(state, table, users, queue)
        log.start()
        allocator.start()
        scheduler.start()
        inv = gpus.simulated(GPU_SPEC)
        await allocator.ask(ReportInventory("local", inv.gpus, inv.simulated))
        await scheduler.ask(SetLimits(limits, "system"))
        return cls(log, state, table, allocator, scheduler, queue, random.Random(3))

    def spec(self) -> ev.JobSpec:
        self.submitted += 1
        spec = realistic_spec(self.submitted, self.rng)
        if self.sweep_user is not None:
            spec = msgspec.structs.replace(spec, user=self.sweep_user, team="vision")
        return spec

    async def fill(self, waiting: int, case: str) -> None:
        """Fill every GPU (the user's limit in the ``user`` case), then queue ``waiting``
        jobs behind them."""
        for _ in range(SWEEP_LIMIT if case == "user" else GPU_COUNT):
            spec = self.spec()
            await self.scheduler.ask(Submit(spec, f"user:{spec.user}"))
        if case == "cpu":
            spec = msgspec.structs.replace(self.spec(), gpus=0, target="worker")
            await self.scheduler.ask(Submit(spec, f"user:{spec.user}"))
        # The queue itself is appended as the events Submit records, in batches: a
        # pass per job would only settle reasons that the pass below settles too.
        batch: list[ev.Event] = []
        for _ in range(waiting):
            batch.append(ev.JobSubmitted(job=self.spec()))
            if len(batch) == 1000:
                self.log.append("user:alice", batch)
                batch = []
        if batch:
            self.log.append("user:alice", batch)
        await self.scheduler.ask(Submit(self.spec(), "user:bob"))  # one pass: reasons settle
        await self.log.flush()

    def oldest_active(self) -> tuple[str, int]:
        # From the index of active attempts: walking every job here would evict the
        # caches just before the timed decision and charge that to the scheduler.
        active = [self.state.jobs[job_id] for job_id in self.state.node_active["local"]]
        job = min(active, key=lambda j: (j.dispatched_at or 0.0, j.order))
        return job.spec.job_id, job.attempt

    async def decisions(self, count: int) -> list[float]:
        """Time ``count`` decisions: an attempt ends, the next job is dispatched."""
        out = []
        waiting = self.state.waiting_count()
        for _ in range(count):
            job_id, attempt = self.oldest_active()
            before = self.scheduler.dispatched
            t0 = time.perf_counter()
            await self.scheduler.ask(AttemptReport(job_id, attempt, "ended", exit_code=0))
            out.append(time.perf_counter() - t0)
            if self.scheduler.dispatched != before + 1:
                raise RuntimeError("a freed slot did not dispatch exactly one job")
            spec = self.spec()  # keep the queue's length (not timed)
            await self.scheduler.ask(Submit(spec, f"user:{spec.user}"))
            await self.log.flush()
        if self.state.waiting_count() != waiting:
            raise RuntimeError("the queue's length drifted")
        return out

    def plan_once(self) -> float:
        now, capped = self.scheduler.clock.now(), policy.Capped()
        t0 = time.perf_counter()  # as Scheduler.run_pass calls it
        policy.plan(self.state.iter_schedulable(now, capped), self.state.counts,
                    self.state.limits, self.scheduler.node_views(), now,
                    cpu_jobs_waiting=self.state.waiting_cpu, capped=capped)
        return time.perf_counter() - t0

    def last_waiting(self) -> str:
        return max(self.state.by_order.items())[1]

    async def stop(self) -> None:
        await self.scheduler.stop()
        await self.allocator.stop()
        await self.log.close()


def repeat(fn: Callable[[], Any], times: int) -> list[float]:
    out = []
    for _ in range(times):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


async def measure(tmp: Path, case: str, waiting: int, decisions: int) -> dict[str, float]:
    raised = ev.Limits(max_concurrent=100, user_max_concurrent=100,
                       local_job_max_concurrent=100)
    limits = {"gpus": raised, "stock": ev.UNRECORDED_LIMITS, "cpu": raised,
              "global": msgspec.structs.replace(raised, max_concurrent=GPU_COUNT),
              "user": msgspec.structs.replace(raised, user_max_concurrent=SWEEP_LIMIT)}[case]
    path = tmp / f"{case}-{waiting}.db"
    rig = await Rig.start(path, limits)
    rig.sweep_user = "alice" if case == "user" else None
    try:
        await rig.fill(waiting, case)
        assert rig.state.waiting_count() > waiting
        times = await rig.decisions(decisions)
        out = {"decision": median_ms(times), "decision_p90": p90_ms(times),
               "plan": median_ms([rig.plan_once() for _ in range(max(5, decisions // 4))])}
        last = rig.last_waiting()
        now = rig.scheduler.clock.now()
        out["list50"] = median_ms(repeat(lambda: rig.queue.list(limit=50), 20))
        out["position"] = median_ms(repeat(lambda: rig.state.position(last, now), 50))
        out["job"] = median_ms(repeat(lambda: rig.queue.job(last), 20))
        out["stats"] = median_ms(repeat(rig.queue.stats, 10))
        out["scanned"] = float(len(rig.scheduler.last_plan.reasons))
        return out
    finally:
        await rig.stop()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)


# --- memory ----------------------------------------------------------------------------


def fold_waiting(bodies: list[bytes], state: SchedulerState, queue: QueueView | None) -> None:
    for seq, body in enumerate(bodies, start=1):
        record = Record(seq, 1_700_000_000.0 + seq, "user:alice", ev.decode(body), b"\0" * 32)
        if queue is None:
            state.evolve(record)
        else:
            queue.evolve(record)


def memory_per_job(jobs: int) -> tuple[float, float, float]:
    """Traced bytes per waiting job: (SchedulerState, + QueueView, the decoded JobSpec alone)."""
    rng = random.Random(5)
    # What the state holds comes from decoding, as at replay and from the API.
    bodies = [ev.encode(ev.JobSubmitted(job=realistic_spec(i, rng))) for i in range(jobs)]
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    specs = [ev.decode(body) for body in bodies]
    gc.collect()
    held_specs = tracemalloc.get_traced_memory()[0] - base
    del specs
    gc.collect()
    base = tracemalloc.get_traced_memory()[0]
    state = SchedulerState()
    fold_waiting(bodies, state, None)
    gc.collect()
    held_state = tracemalloc.get_traced_memory()[0] - base
    queue = QueueView(state, GpuTable())
    fold_waiting(bodies, state, queue)
    gc.collect()
    held_both = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    if state.waiting_count() != jobs:
        raise RuntimeError("not every job is waiting")
    return held_state / jobs, held_both / jobs, held_specs / jobs


# --- main ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Goals: decision time at 100,000 / at 100 <= 2; "
                                       "memory per queued job <= 2 KB.")
    p.add_argument("--small", type=int, default=100, help="the short queue (100)")
    p.add_argument("--large", type=int, default=100_000, help="the long queue (100,000)")
    p.add_argument("--decisions", type=int, default=100,
                   help="timed decisions per case and size (100)")
    p.add_argument("--cases", default=",".join(CASES),
                   help=f"comma-separated, of {', '.join(CASES)} (default: all)")
    p.add_argument("--no-memory", action="store_true",
                   help="skip the memory figure (at --large 1000000 it holds ~3 GB)")
    args = p.parse_args(argv)
    cases = [c for c in args.cases.split(",") if c]
    if not cases or not set(cases) <= set(CASES):
        p.error(f"--cases: a comma-separated list of {', '.join(CASES)}")
    print(f"machine: nproc={os.cpu_count()} python={platform.python_version()}; "
          f"{GPU_COUNT} simulated GPUs, 1-GPU jobs from {len(USERS)} users; "
          f"policy.SCAN_DEPTH={policy.SCAN_DEPTH} REASON_DEPTH={policy.REASON_DEPTH}")
    tmp = Path(tempfile.mkdtemp(prefix="eventq-bench-policy-"))
    goals: list[tuple[str, bool, str]] = []
    try:
        for case in cases:
            small = asyncio.run(measure(tmp, case, args.small, args.decisions))
            large = asyncio.run(measure(tmp, case, args.large, args.decisions))
            ratio = large["decision"] / small["decision"]
            what = CASES[case]
            print(f"decision [{case}: {what}]  ({args.decisions} each, median / p90)")
            for n, r in ((args.small, small), (args.large, large)):
                print(f"  {n:>7} queued: decision {r['decision']:8.3f} / {r['decision_p90']:8.3f}"
                      f" ms   policy.plan alone {r['plan']:8.3f} ms   jobs the pass examined "
                      f"{r['scanned']:.0f}")
            print(f"  ratio {args.large} / {args.small} = {ratio:.2f}   (policy.plan alone: "
                  f"{large['plan'] / small['plan']:.2f})")
            goals.append((f"decision ratio <= 2 [{case}]", ratio <= 2, f"{ratio:.2f}"))
            if case == cases[0]:
                print(f"queue views (information; median ms at {args.small} -> {args.large}):")
                for key, label in (("list50", "QueueView.list(limit=50)  GET /api/queue"),
                                   ("position", "position of the last job"),
                                   ("job", "QueueView.job(last)       GET /api/jobs/ID"),
                                   ("stats", "QueueView.stats()         GET /api/queue/stats")):
                    print(f"  {label:44s} {small[key]:8.3f} -> {large[key]:8.3f} ms "
                          f"({large[key] / small[key]:.1f}x)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.no_memory:
        print_goals(goals)
        return 0
    state_b, both_b, spec_b = memory_per_job(args.large)
    print(f"memory per queued job ({args.large} waiting, tracemalloc): SchedulerState "
          f"{state_b:.0f} B (the decoded JobSubmitted alone: {spec_b:.0f} B); "
          f"with QueueView {both_b:.0f} B")
    goals.append(("memory per queued job <= 2 KB", state_b <= 2048, f"{state_b:.0f} B"))
    print_goals(goals)
    return 0


if __name__ == "__main__":
    sys.exit(main())
