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
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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


async def rate(method: str, url: str, body: object, headers: dict[str, str], clients: int,
               seconds: float) -> float:
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
        return done / (time.perf_counter() - start)


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


def start_eventq(data: Path, port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "eventq.cli.main", "server", "--data-dir",
                             str(data), "--port", str(port), "--gpus", "4xA100-80GB"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


async def measure_eventq(data: Path, args: argparse.Namespace, noop: str) -> dict[str, float]:
    port = free_port()
    server = start_eventq(data, port)
    try:
        while not (data / "admin.token").exists():
            await asyncio.sleep(0.05)
        headers = {"Authorization": f"Bearer {(data / 'admin.token').read_text().strip()}"}
        base = f"http://127.0.0.1:{port}"
        await wait_up(base + "/api/queue/stats", headers)
        out: dict[str, float] = {}
        for name, method, url, body in (
                ("stats", "GET", "/api/queue/stats", None),
                ("list50", "GET", "/api/queue?limit=50", None),
                ("submit", "POST", "/api/queue/submit",
                 {"command": ["true"], "gpus": 0, "target": "worker"})):
            out[name] = await rate(method, base + url, body, headers, args.clients, args.seconds)
            verb = "POST" if method == "POST" else "GET"
            out[f"noop_{name}"] = await rate(verb, noop, {} if verb == "POST" else None, {},
                                             args.clients, args.seconds)
        return out
    finally:
        stop(server)


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
        r = await measure_eventq(work / "data", args, noop_url)
        rows = [("durable submissions/s", "submit"), ("GET /api/queue/stats", "stats"),
                ("GET /api/queue?limit=50", "list50")]
        print(f"{'':28}{'eventq/s':>10}{'no-op/s':>10}{'ratio':>8}  goal >= 0.5")
        results = {}
        for label, key in rows:
            ratio = r[key] / r[f"noop_{key}"]
            results[key] = ratio
            print(f"{label:28}{r[key]:10.0f}{r[f'noop_{key}']:10.0f}{ratio:8.2f}  "
                  f"{'met' if ratio >= 0.5 else 'MISSED'}")
        if args.json:
            print(json.dumps({"queued": args.queued, **r, "ratios": results}))
        return 0
    finally:
        stop(noop)
        shutil.rmtree(work, ignore_errors=True)


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--seconds", type=float, default=5.0, help="per phase")
    p.add_argument("--queued", type=int, default=100_000)
    p.add_argument("--json", action="store_true", help="also print the raw figures as JSON")
    return p.parse_args()


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse())))
