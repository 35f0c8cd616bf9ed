"""The state at any event of a long log, and what keeping its snapshots costs.

(a) ``GET /api/replay/state?at=SEQ`` (and ``?time=``) on a log of a million events (the busy
    queue of ``tools/bench_log.py``), served by a started orchestrator on loopback: the
    latest snapshot at or before SEQ plus the events after it, read from the file. Against,
    in the same run and at the same seqs, a fold from zero: the same light fold from seq 1
    (rows read and decoded, no hashing, the same reply built), and ``eventq.replay.fold``
    (what ``eventq replay state`` does: the whole chain verified, the scheduler's and the
    allocator's folds). Printed: latency percentiles (p50/p90/p99, quiet and with ``--load``
    busy processes beside the server) and the ratio of medians.

(b) The live append path: the first ``--append-events`` events of that log appended again,
    one ``EventLog.append`` each and a group commit every 64, into a fresh log with the read
    models an orchestrator folds, with the history's fold and without it; rounds alternate,
    medians are compared.

(c) ``Orchestrator.start`` on the million events, with the history's fold and with it
    replaced by one that does nothing; rounds alternate, medians are compared.

Run from the repository root: ``.venv/bin/python tools/bench_replay_state.py``
(``--events 200000`` for a quick run).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import platform
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import aiohttp
import structlog
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import eventq.server
from eventq import events as ev
from eventq import gpus, replay
from eventq.actors.allocator import GpuTable
from eventq.actors.scheduler_state import SchedulerState
from eventq.actors.workers_state import Workers
from eventq.auth import Users
from eventq.http import history as routes
from eventq.http.app import make_app
from eventq.log import EventLog, Record, iter_rows, to_record
from eventq.projections.history import Ends, Finished, Frame, History, fold_step
from eventq.projections.queue import QueueView
from eventq.server import Orchestrator
from eventq.sessions import Sessions
from tools.bench_log import generate, prepare_data_dir
from tools.benchkit import busy, load_label, loads, percentile


def light_fold_from_zero(path: Path, seq: int) -> dict[str, Any]:
    """The history's own fold from seq 1 to ``seq`` and the same reply: the baseline."""
    frame, finished = Frame(), Finished()
    ends = Ends(finished, record=True)
    with contextlib.closing(sqlite3.connect(path)) as conn:
        for row in iter_rows(conn, 1, seq):
            fold_step(frame, to_record(row), ends)
    done = finished.newest(frame.seq, frame.jobs, 50)
    return {"jobs": routes.open_rows(frame) + [routes.job_row(r, frame) for r in done],
            "gpus": routes.gpu_rows(frame)}


def replay_fold_from_zero(path: Path, seq: int) -> int:
    """``eventq replay state``'s read: verified from seq 1, the scheduler's folds."""
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        return replay.fold(conn, to_seq=seq).last_seq


def timed(fn: Any, *args: Any) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


@contextlib.asynccontextmanager
async def served(orch: Orchestrator) -> Any:
    runner = web.AppRunner(make_app(orch), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    token = orch.admin_token or orch.add_user("bench", ev.Level.VIEWER)
    headers = {"Authorization": f"Bearer {token}"}
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}", headers=headers) as http:
            yield http
    finally:
        await runner.cleanup()


async def latencies(http: aiohttp.ClientSession, queries: list[str]) -> list[float]:
    out = []
    for query in queries:
        t0 = time.perf_counter()
        async with http.get(f"/api/replay/state?{query}") as resp:
            body = await resp.read()
            if resp.status != 200:
                raise RuntimeError(f"{query}: {resp.status} {body[:200]!r}")
        out.append(time.perf_counter() - t0)
    return out


def ms(seconds: float) -> str:
    return f"{seconds * 1000:8.1f} ms"


async def state_latency(data: Path, samples: int, baselines: int, load: int) -> None:
    orch = Orchestrator(data, gpus.simulated("8xA100-80GB"),
                        limits=ev.Limits(max_concurrent=0), long_lived=True)
    await orch.start()
    try:
        await orch.log.flush()
        head = orch.log.head_seq
        history = orch.history
        print(f"(a) the state at an event, on {head:,} events: {len(history.snapshots)} "
              f"snapshots (one every {history.every:,} events at the least), "
              f"{len(history.now().jobs)} jobs open at the head, "
              f"{len(history.finished.seqs):,} ended, {len(history.bars.bars):,} GPU holds")
        rng = random.Random(3)
        seqs = sorted(rng.sample(range(1, head + 1), samples))
        times = await asyncio.to_thread(seq_times, orch.log.path, seqs)
        async with served(orch) as http:
            await latencies(http, [f"at={head}"])  # the first request opens the reader
            at = await latencies(http, [f"at={s}" for s in seqs])
            by_time = await latencies(http, [f"time={t!r}" for t in times])
            loaded: list[tuple[str, list[float]]] = []
            for count in loads(load)[1:]:
                with busy(count):
                    loaded.append((f"{load_label(count)}, ?at=SEQ",
                                   await latencies(http, [f"at={s}" for s in seqs])))
                    loaded.append((f"{load_label(count)}, ?time=T",
                                   await latencies(http, [f"time={t!r}" for t in times])))
            few = seqs[:: max(1, len(seqs) // baselines)][:baselines]
            at_few = await latencies(http, [f"at={s}" for s in few])
        light = [timed(light_fold_from_zero, orch.log.path, s) for s in few]
        full = [timed(replay_fold_from_zero, orch.log.path, s) for s in few]
    finally:
        await orch.stop()
    for label, values in ((f"quiet, GET ?at=SEQ, {len(at)} seqs", at),
                          (f"quiet, GET ?time=T, {len(by_time)} times", by_time), *loaded):
        print(f"  {label:<40} p50 {ms(percentile(values, 50))}  p90 "
              f"{ms(percentile(values, 90))}  p99 {ms(percentile(values, 99))}  "
              f"max {ms(max(values))}")
    print(f"  at the {len(few)} baseline seqs (median seq {int(statistics.median(few)):,}):")
    print(f"    GET ?at=SEQ (snapshot + tail, HTTP) {ms(statistics.median(at_few))}")
    print(f"    the same light fold from seq 1      {ms(statistics.median(light))}")
    print(f"    eventq.replay.fold from seq 1       {ms(statistics.median(full))}")
    print(f"  ratio light fold from zero / at= = "
          f"{statistics.median(light) / statistics.median(at_few):.0f}x;  "
          f"replay.fold / at= = {statistics.median(full) / statistics.median(at_few):.0f}x")


def seq_times(path: Path, seqs: list[int]) -> list[float]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return [conn.execute("SELECT time FROM events WHERE seq = ?", (s,)).fetchone()[0]
                for s in seqs]


# --- (b) the append path -----------------------------------------------------------------------


def events_of(path: Path, count: int) -> list[ev.Event]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return [to_record(row).event for row in iter_rows(conn, 1, count)]


async def append_rate(path: Path, events: list[ev.Event],
                      with_history: bool) -> tuple[float, float]:
    """(events/s, CPU microseconds an event) appended one by one, with the read models an
    orchestrator folds. The CPU time is the process's (the writer's thread included): what
    a fold adds to the append path, less disturbed by other processes than the wall clock."""
    log = await EventLog.open(path, time.time)
    state, table, workers = SchedulerState(), GpuTable(), Workers()
    folds: list[Any] = [state, table, Users(), workers, QueueView(state, table), Sessions()]
    if with_history:
        folds.append(History(state, table, workers))
    log.fold_into(*folds)
    log.start()
    gc.collect()
    t0, c0 = time.perf_counter(), time.process_time()
    for i, event in enumerate(events, start=1):
        log.append("system", [event])
        if i % 64 == 0:
            await log.flush()
    await log.flush()
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    await log.close()
    return len(events) / elapsed, cpu / len(events) * 1e6


def append_path(source: Path, tmp: Path, count: int, rounds: int) -> None:
    events = events_of(source, count)
    runs: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
    for r in range(rounds):
        for with_history in (False, True):
            path = tmp / f"append-{r}-{with_history}.db"
            runs[with_history].append(asyncio.run(append_rate(path, events, with_history)))
            for suffix in ("", "-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)
            for key in (path.with_suffix(".key"), path.with_suffix(".key.new")):
                key.unlink(missing_ok=True)

    def med(with_history: bool, i: int) -> float:
        return statistics.median(run[i] for run in runs[with_history])

    print(f"(b) the live append path: {len(events):,} events appended one by one (a commit "
          f"every 64), {rounds} rounds (medians):")
    print(f"  without the history {med(False, 0):9.0f} events/s {med(False, 1):6.2f} us CPU "
          f"an event;  with it {med(True, 0):9.0f} events/s {med(True, 1):6.2f} us CPU an event")
    print(f"  ratio with / without: events/s {med(True, 0) / med(False, 0):.3f}, CPU an event "
          f"{med(True, 1) / med(False, 1):.3f}")
    least = {w: min(run[1] for run in runs[w]) for w in runs}
    print(f"  least CPU an event (the quietest round): without {least[False]:.2f} us, with "
          f"{least[True]:.2f} us, ratio {least[True] / least[False]:.3f}")


# --- (c) the start ---------------------------------------------------------------------------


class NoHistory(History):
    """In place of the history for (c)'s baseline: folds nothing."""

    READS: ClassVar[frozenset[type]] = frozenset()

    def evolve(self, record: Record) -> None:
        pass


@contextlib.contextmanager
def without_history() -> Iterator[None]:
    saved = eventq.server.History
    eventq.server.History = NoHistory  # type: ignore[misc]
    try:
        yield
    finally:
        eventq.server.History = saved  # type: ignore[misc]


async def timed_start(prepared: Path, run: Path) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) of a start: the chain is hashed by a second
    process, which the CPU time leaves out, and another user's load moves the wall clock."""
    shutil.copytree(prepared, run)
    orch = Orchestrator(run, gpus.simulated("8xA100-80GB"), limits=ev.Limits(max_concurrent=0),
                        long_lived=True)
    t0, c0 = time.perf_counter(), time.process_time()
    await orch.start()
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    await orch.stop()
    del orch
    gc.unfreeze()
    gc.collect()
    shutil.rmtree(run)
    return elapsed, cpu


def start_cost(prepared: Path, tmp: Path, rounds: int) -> None:
    runs: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
    for r in range(rounds):
        runs[True].append(asyncio.run(timed_start(prepared, tmp / f"with{r}")))
        with without_history():
            runs[False].append(asyncio.run(timed_start(prepared, tmp / f"without{r}")))

    def med(with_history: bool, i: int) -> float:
        return statistics.median(run[i] for run in runs[with_history])

    print(f"(c) Orchestrator.start, {rounds} rounds (medians): with the history "
          f"{med(True, 0):.2f} s ({med(True, 1):.2f} s CPU), without it {med(False, 0):.2f} s "
          f"({med(False, 1):.2f} s CPU); ratio {med(True, 0) / med(False, 0):.3f} "
          f"({med(True, 1) / med(False, 1):.3f} CPU)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=1_000_000, help="events in the log (1,000,000)")
    p.add_argument("--samples", type=int, default=40, help="seqs and times asked for (40)")
    p.add_argument("--baselines", type=int, default=5, help="seqs folded from zero (5)")
    p.add_argument("--append-events", type=int, default=200_000,
                   help="events appended in (b) (200,000)")
    p.add_argument("--rounds", type=int, default=5, help="rounds of (b) and (c) (5)")
    p.add_argument("--only", choices=["state", "append", "start"])
    p.add_argument("--load", type=int, default=1,
                   help="busy processes beside the server for (a)'s loaded latencies; 0: "
                        "quiet only (1)")
    args = p.parse_args(argv)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    print(f"machine: nproc={os.cpu_count()} python={platform.python_version()} "
          f"sqlite={sqlite3.sqlite_version}")
    tmp = Path(tempfile.mkdtemp(prefix="eventq-bench-replay-"))
    try:
        source = tmp / "source.db"
        t0 = time.perf_counter()
        n = generate(source, args.events)
        print(f"generated {n:,} events in {time.perf_counter() - t0:.0f} s")
        prepared = tmp / "prepared"
        prepare_data_dir(source, prepared)
        if args.only in (None, "state"):
            shutil.copytree(prepared, tmp / "state")
            asyncio.run(state_latency(tmp / "state", args.samples, args.baselines, args.load))
            shutil.rmtree(tmp / "state")
            gc.unfreeze()
            gc.collect()
        if args.only in (None, "append"):
            append_path(source, tmp, min(args.append_events, n), args.rounds)
        if args.only in (None, "start"):
            start_cost(prepared, tmp, args.rounds)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
