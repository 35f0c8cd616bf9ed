"""HTTP throughput: durable submissions/s, and the queue views under a 100,000-job queue.

Every figure is a ratio against a bare aiohttp app measured in the same run, on the
same machine, with the same client: a no-op POST handler for submissions, a no-op
GET handler for the views. Both servers run as separate processes on loopback; the
load comes from one client process with ``--clients`` concurrent keep-alive
connections (64 by default).

(a) ``POST /api/queue/submit`` of a CPU job with ``target: worker`` (no worker is
    connected, so nothing runs: the figure is the durable submit path — validation,
    the scheduler's decision, the pass, the group commit — not process start-up).
(b) ``GET /api/queue/stats`` and ``GET /api/queue?limit=50`` with ``--queued`` jobs
    waiting (100,000 by default), written into the log before the server starts.

Run from the repository root: ``.venv/bin/python tools/bench_http.py``
(``--queued 10000 --seconds 2`` for a quick run). Goals: each ratio >= 0.5.

``--log-levels info,warning --rounds 5`` runs one server per level, each on a copy of the
same seeded log, its lines written to a file as a supervisor would keep them, and measures
each phase on each in turn: at ``info`` the server writes a line per action
(``eventq/actionlog.py``), at ``warning`` none, so the ratio of the two is what those lines
cost.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import aiohttp

from eventq import events as ev
from eventq.clock import RealClock
from eventq.log import EventLog

NOOP_APP = """
import sys
from aiohttp import web
async def ok(request):
    await request.read()
    return web.json_response({"success": True})
app = web.Application()
app.add_routes([web.post("/noop", ok), web.get("/noop", ok)])
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
"""


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def wait_up(url: str, headers: dict[str, str]) -> None:
    async with aiohttp.ClientSession(headers=headers) as http:
        for _ in range(600):
            try:
                async with http.get(url) as resp:
                    if resp.status < 500:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise RuntimeError(f"{url} never came up")


class Rate(NamedTuple):
    per_second: float
    requests: int


def cpu_ns(pid: int) -> int:
    """The CPU time a process's threads have run, in ns (``/proc/PID/task/*/schedstat``,
    the log's writer thread included): unlike a rate, it hardly moves with what else the
    machine runs. A thread that ended meanwhile is not counted (the server keeps its own)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):
            total += int((task / "schedstat").read_text().split()[0])
    return total


async def rate(method: str, url: str, body: object, headers: dict[str, str], clients: int,
               seconds: float) -> Rate:
    """Requests per second over ``seconds`` with ``clients`` concurrent connections."""
    connector = aiohttp.TCPConnector(limit=clients)
    done = 0
    async with aiohttp.ClientSession(connector=connector, headers=headers) as http:
        stop = time.perf_counter() + seconds

        async def client() -> None:
            nonlocal done
            while time.perf_counter() < stop:
                async with http.request(method, url, json=body) as resp:
                    await resp.read()
                    if resp.status >= 400:
                        raise RuntimeError(f"{url}: HTTP {resp.status}")
                done += 1

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        return Rate(done / (time.perf_counter() - start), done)


async def seed_queue(data: Path, count: int) -> None:
    """Write ``count`` waiting jobs (target worker: none will run) into a fresh log."""
    data.mkdir(parents=True, exist_ok=True)
    log = await EventLog.open(data / "events.db", RealClock().now)
    log.start()
    for first in range(0, count, 5000):
        log.append("user:admin", [ev.JobSubmitted(job=ev.JobSpec(
            job_id=f"seed{i:07d}", user=f"user{i % 50}", priority=10,
            command=["python", "train.py", "--seed", str(i)], gpus=1, target="worker",
            name="train", metadata={"run_name": f"run-{i}"}))
            for i in range(first, min(count, first + 5000))])
        await log.flush()
    await log.close()


def start_eventq(data: Path, port: int, level: str) -> subprocess.Popen[bytes]:
    with open(data.parent / f"server-{level}.log", "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "eventq.cli.main", "server",
                                 "--data-dir", str(data), "--port", str(port), "--gpus",
                                 "4xA100-80GB", "--log-format", "json", "--log-level", level],
                                stdout=out, stderr=out)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


PHASES = (("stats", "GET", "/api/queue/stats", None),
          ("list50", "GET", "/api/queue?limit=50", None),
          ("submit", "POST", "/api/queue/submit",
           {"command": ["true"], "gpus": 0, "target": "worker"}))


async def measure_eventq(data: dict[str, Path], args: argparse.Namespace,
                         noop: str) -> dict[str, dict[str, float]]:
    """Each level's server on its own copy of the log, all running at once; every phase
    is measured on each in turn and on the no-op app, ``--rounds`` times: the medians."""
    ports = {level: free_port() for level in data}
    servers = {level: start_eventq(data[level], ports[level], level) for level in data}
    try:
        headers = {level: await _ready(data[level], ports[level]) for level in data}
        samples: dict[str, dict[str, list[float]]] = {level: {} for level in [*data, "noop"]}
        for round_ in range(args.rounds):
            order = list(ports.items())
            order = order[round_ % len(order):] + order[:round_ % len(order)]  # none first always
            for name, method, url, body in PHASES:
                for level, port in order:
                    before = cpu_ns(servers[level].pid)
                    done = await rate(method, f"http://127.0.0.1:{port}{url}", body,
                                      headers[level], args.clients, args.seconds)
                    spent = cpu_ns(servers[level].pid) - before
                    samples[level].setdefault(name, []).append(done.per_second)
                    samples[level].setdefault(f"cpu_{name}", []).append(
                        spent / 1000 / max(done.requests, 1))
                samples["noop"].setdefault(name, []).append((await rate(
                    method, noop, {} if method == "POST" else None, {}, args.clients,
                    args.seconds)).per_second)
        noop_median = {f"noop_{n}": statistics.median(v) for n, v in samples["noop"].items()}
        return {level: {**{n: statistics.median(v) for n, v in samples[level].items()},
                        **noop_median} for level in data}
    finally:
        for server in servers.values():
            stop(server)


async def _ready(data: Path, port: int) -> dict[str, str]:
    while not (data / "admin.token").exists():
        await asyncio.sleep(0.05)
    headers = {"Authorization": f"Bearer {(data / 'admin.token').read_text().strip()}"}
    await wait_up(f"http://127.0.0.1:{port}/api/queue/stats", headers)
    return headers


ROWS = [("durable submissions/s", "submit"), ("GET /api/queue/stats", "stats"),
        ("GET /api/queue?limit=50", "list50")]


def ratios(r: dict[str, float]) -> dict[str, float]:
    return {key: r[key] / r[f"noop_{key}"] for _, key in ROWS}


def report(r: dict[str, float], args: argparse.Namespace) -> None:
    print(f"{'':28}{'eventq/s':>10}{'no-op/s':>10}{'ratio':>8}  goal >= 0.5")
    results = ratios(r)
    for label, key in ROWS:
        ratio = results[key]
        print(f"{label:28}{r[key]:10.0f}{r[f'noop_{key}']:10.0f}{ratio:8.2f}  "
              f"{'met' if ratio >= 0.5 else 'MISSED'}")
    print("server CPU per request: " + ", ".join(
        f"{key} {r[f'cpu_{key}']:.0f} µs" for _, key in ROWS))
    if args.json:
        print(json.dumps({"queued": args.queued, **r, "ratios": results}))


async def main(args: argparse.Namespace) -> int:
    work = Path(tempfile.mkdtemp(prefix="eventq-bench-http-"))
    noop_port = free_port()
    noop = subprocess.Popen([sys.executable, "-c", NOOP_APP, str(noop_port)])
    try:
        noop_url = f"http://127.0.0.1:{noop_port}/noop"
        await wait_up(noop_url, {})
        print(f"machine: {os.cpu_count()} cores, Python {platform.python_version()}; "
              f"{args.clients} clients, {args.seconds:.0f} s per phase")
        t0 = time.perf_counter()
        await seed_queue(work / "data", args.queued)
        print(f"seeded {args.queued:,} waiting jobs in {time.perf_counter() - t0:.1f} s")
        levels = args.log_levels.split(",")
        for level in levels[1:]:
            shutil.copytree(work / "data", work / f"data-{level}")
        runs = await measure_eventq({level: work / ("data" if i == 0 else f"data-{level}")
                                     for i, level in enumerate(levels)}, args, noop_url)
        for level, r in runs.items():
            print(f"server at --log-level {level}:")
            report(r, args)
        if len(levels) > 1:
            first, *rest = levels
            for level in rest:
                print(f"--log-level {first} against {level}, requests/s: " + ", ".join(
                    f"{key} {ratios(runs[first])[key] / ratios(runs[level])[key]:.3f}"
                    for _, key in ROWS))
                print(f"--log-level {first} against {level}, server CPU per request: " +
                      ", ".join(f"{key} {runs[first][f'cpu_{key}'] / runs[level][f'cpu_{key}']:.3f}"
                                for _, key in ROWS))
        return 0
    finally:
        stop(noop)
        shutil.rmtree(work, ignore_errors=True)


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--seconds", type=float, default=5.0, help="per phase")
    p.add_argument("--queued", type=int, default=100_000)
    p.add_argument("--rounds", type=int, default=1,
                   help="measure every phase this many times, in turn on each server; "
                        "medians (the load of other work on the machine evens out)")
    p.add_argument("--json", action="store_true", help="also print the raw figures as JSON")
    p.add_argument("--log-levels", default="info", metavar="LEVEL,…",
                   help="measure the server at each of these --log-level values in turn "
                        "(info,warning: what a line per action costs)")
    return p.parse_args()


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse())))
