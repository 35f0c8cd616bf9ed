"""A million queued jobs in a real ``eventq server``: its restart, its RSS, and the views.

Two logs are written before any server starts, with the log's own writer in batches
(``EventLog.append`` of ``JobSubmitted``, 5,000 per commit, as a long-lived server's log
would hold them): ``--small`` (1,000) and ``--large`` (1,000,000) waiting jobs from 50
users, each a one-GPU job for a worker (none is connected, so none runs; every job keeps
its place in the queue). Then, for each size, a real ``eventq server`` process:

- first start (the whole chain verified) until its first request is answered;
- each view, timed from this client (one keep-alive connection, requests one after
  another), with a submission between two requests (not timed) so that no answer comes
  from the last rendering and the queue moves as a live one does:
  ``GET /api/queue/stats``, ``GET /api/queue?limit=50``, ``GET /api/jobs?limit=200``
  (the web page's first page), the page after it (``after=`` its cursor), the first page
  sorted by status, and ``GET /api/queue/me``; quiet, then with ``--load N`` busy
  processes beside it;
- the server's RSS (``VmRSS``);
- ``kill -9``, a start, and the time until its first request is answered (the restart).

The two servers run side by side while the views are timed, one request to each in turn.
Each view's median at ``--large`` over its median at ``--small`` is the figure: the goal
is <= 2 (O(page), not O(queue)). Run from the repository root:
``.venv/bin/python tools/bench_scale.py`` (~2 min at 1,000,000; ``--large 100000`` for a
quick run).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eventq import events as ev
from eventq.clock import RealClock
from eventq.log import EventLog
from tools.bench_http import free_port
from tools.benchkit import Api, busy, print_goals, stop_server, wait_for

BATCH = 5000
USERS = 50
VIEWS = {"stats": "GET /api/queue/stats",
         "queue50": "GET /api/queue?limit=50",
         "jobs200": "GET /api/jobs?limit=200",
         "jobs_next": "GET /api/jobs?limit=200&after=…",
         "jobs_status": "GET /api/jobs?limit=200&sort=status",
         "me": "GET /api/queue/me"}
SUBMIT = {"command": ["true"], "gpus": 0, "target": "worker"}


def seed_spec(i: int) -> ev.JobSpec:
    """A job as a sweep submits it: a short command, a few variables' digest, metadata."""
    return ev.JobSpec(job_id=f"{0x100000000000 + i:012x}", user=f"user{i % USERS}",
                      priority=10, team=f"team{i % 5}", gpus=1, target="worker",
                      command=["python", "train.py", "--config", f"configs/run{i % 97}.yaml",
                               "--seed", str(i % 1000)],
                      name=f"run{i % 97}", metadata={"experiment": f"exp-{i % 31}"})


async def seed(data: Path, count: int) -> float:
    """Write ``count`` waiting jobs into a fresh log; the seconds it took."""
    data.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    log = await EventLog.open(data / "events.db", RealClock().now)
    log.start()
    for first in range(0, count, BATCH):
        log.append("user:admin", [ev.JobSubmitted(job=seed_spec(i))
                                  for i in range(first, min(count, first + BATCH))])
        await log.flush()
    await log.close()
    return time.perf_counter() - t0


def start_server(data: Path, port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "eventq.cli.main", "server", "--data-dir",
                             str(data), "--port", str(port), "--gpus", "4xA100-80GB"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def answered(port: int, data: Path) -> bool:
    token = data / "admin.token"
    if not token.exists():
        return False
    api = Api(f"http://127.0.0.1:{port}", token.read_text().strip(), timeout=5)
    try:
        api.call("GET", "/api/queue/stats")
        return True
    except (OSError, RuntimeError):
        return False
    finally:
        api.close()


def started(data: Path, port: int) -> tuple[subprocess.Popen[bytes], float]:
    """A server on ``data``, and the seconds until it answered its first request."""
    t0 = time.perf_counter()
    proc = start_server(data, port)
    try:
        wait_for(lambda: proc.poll() is not None or answered(port, data), 900,
                 "the server's first answer", step=0.05)
    except BaseException:
        stop_server(proc)
        raise
    if proc.poll() is not None:
        raise RuntimeError(f"eventq server on {data} exited with {proc.returncode}")
    return proc, time.perf_counter() - t0


@dataclass
class Measured:
    first_start: float = 0.0
    restart: float = 0.0
    rss_mb: float = 0.0
    rss_after_restart_mb: float = 0.0
    #: (view, load) -> request times in seconds.
    times: dict[tuple[str, int], list[float]] = field(default_factory=dict)


def view_paths(api: Api) -> dict[str, str]:
    after = api.call("GET", "/api/jobs?limit=200")["next"]
    if after is None:
        raise RuntimeError("fewer than 200 jobs: --small must be larger")
    return {"stats": "/api/queue/stats", "queue50": "/api/queue?limit=50",
            "jobs200": "/api/jobs?limit=200", "jobs_next": f"/api/jobs?limit=200&after={after}",
            "jobs_status": "/api/jobs?limit=200&sort=status", "me": "/api/queue/me"}


def time_views(apis: list[Api], samples: int, load: int, out: list[Measured]) -> None:
    """Each view ``samples`` times on each server, the servers in turn (whatever else the
    machine does falls on both alike), a submission (not timed) before each request."""
    paths = [view_paths(api) for api in apis]
    for view in VIEWS:
        for api, path in zip(apis, paths, strict=True):
            for _ in range(5):  # warm: a fresh process's first answers say nothing of its size
                api.call("GET", path[view])
        for _ in range(samples):
            for api, path, measured in zip(apis, paths, out, strict=True):
                api.call("POST", "/api/queue/submit", SUBMIT)
                t0 = time.perf_counter()
                api.call("GET", path[view])
                measured.times.setdefault((view, load), []).append(time.perf_counter() - t0)


def measure(datas: list[Path], args: argparse.Namespace) -> list[Measured]:
    """Both servers up side by side for the views; then each killed and started alone."""
    out = [Measured() for _ in datas]
    ports = [free_port() for _ in datas]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for data, port, measured in zip(datas, ports, out, strict=True):
            proc, measured.first_start = started(data, port)
            procs.append(proc)
        apis = [Api(f"http://127.0.0.1:{port}", (data / "admin.token").read_text().strip())
                for data, port in zip(datas, ports, strict=True)]
        try:
            for load in sorted({0, args.load}):
                with busy(load):
                    time_views(apis, args.samples, load, out)
        finally:
            for api in apis:
                api.close()
        for at, (data, port, measured) in enumerate(zip(datas, ports, out, strict=True)):
            measured.rss_mb = rss_mb(procs[at].pid)
            os.kill(procs[at].pid, signal.SIGKILL)
            procs[at].wait()
            procs[at], measured.restart = started(data, port)
            measured.rss_after_restart_mb = rss_mb(procs[at].pid)
            stop_server(procs[at])
    finally:
        for proc in procs:
            stop_server(proc)
    return out


def median_ms(values: list[float]) -> float:
    return statistics.median(values) * 1e3


def report(args: argparse.Namespace, small: Measured, large: Measured) -> None:
    goals: list[tuple[str, bool, str]] = []
    print(f"views (median ms over {args.samples}, one client, a submission between requests)")
    for load in sorted({0, args.load}):
        print(f"  {'quiet' if not load else f'{load} busy processes'}:")
        for view, label in VIEWS.items():
            s, big = (median_ms(m.times[(view, load)]) for m in (small, large))
            ratio = big / s
            print(f"    {label:34s} {s:8.2f} at {args.small:>9,}  {big:8.2f} at "
                  f"{args.large:>9,}  ratio {ratio:5.2f}")
            goals.append((f"{label} at {args.large:,} / at {args.small:,} <= 2"
                          f"{'' if not load else ' (loaded)'}", ratio <= 2, f"{ratio:.2f}"))
    for n, m in ((args.small, small), (args.large, large)):
        print(f"  {n:>9,} queued: first start {m.first_start:6.1f} s, restart after kill -9 "
              f"{m.restart:6.1f} s (to the first answer); RSS {m.rss_mb:7.0f} MB "
              f"({m.rss_mb * 2**20 / n / 1024:.2f} KB per job), after the restart "
              f"{m.rss_after_restart_mb:7.0f} MB")
    per_job = (large.rss_mb - small.rss_mb) * 2**20 / (args.large - args.small)
    print(f"  RSS growth per queued job between the two: {per_job / 1024:.2f} KB")
    print_goals(goals)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--small", type=int, default=1000)
    p.add_argument("--large", type=int, default=1_000_000)
    p.add_argument("--samples", type=int, default=30, help="requests per view (30)")
    p.add_argument("--load", type=int, default=0,
                   help="busy processes beside the server for a second, loaded round")
    args = p.parse_args()
    print(f"machine: nproc={os.cpu_count()} python={platform.python_version()}; "
          f"load average {os.getloadavg()[0]:.2f}")
    work = Path(tempfile.mkdtemp(prefix="eventq-bench-scale-"))
    try:
        datas = []
        for n in (args.small, args.large):
            data = work / f"data-{n}"
            took = asyncio.run(seed(data, n))
            size = (data / "events.db").stat().st_size
            print(f"seeded {n:,} waiting jobs in {took:.1f} s ({n / took:,.0f} jobs/s); log "
                  f"{size / 2**20:.0f} MB ({size / n:.0f} B per job)")
            datas.append(data)
        report(args, *measure(datas, args))
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
