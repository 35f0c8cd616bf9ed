"""HTTP throughput: durable submissions/s, and the queue views under a 100,000-job queue.

Every figure is a ratio against a bare aiohttp app measured in the same run, on the
same machine, with the same client: a no-op POST handler for submissions, a no-op
GET handler for the views. Both servers run as separate processes on loopback; the
load comes from ``wrk`` (Debian's package: ``apt-get install wrk``) with ``--clients``
concurrent keep-alive connections (64 by default), whose own CPU is printed beside each
figure so a reader sees it was not the bottleneck; the same phases driven by a Python
aiohttp client follow as a second figure. ``--load N`` runs N busy processes beside the
servers (the figures quiet, then loaded). Beside each rate it prints each server's own CPU
per request (all its threads, from /proc): what a request costs, which the neighbours of
a shared machine change far less than the rates; under the submissions, the events per
commit of eventq's log (from its /metrics). ``--rounds N`` drives each phase N times,
eventq and the no-op in turn, and reports the round of the median ratio.

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
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from eventq import events as ev
from eventq.clock import RealClock
from eventq.log import EventLog
from tools.benchkit import busy

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


@dataclass
class Driven:
    """What one load generator measured against one URL."""

    rate: float
    #: The client's CPU seconds per wall second (1.0 = one core busy).
    client_cpu: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    #: Requests answered in the phase (0: rate x seconds).
    requests: int = 0
    #: The server process's CPU microseconds per request (0: not measured).
    server_us: float = 0.0
    #: Events per commit of the log over the phase's rounds (0: not measured).
    per_commit: float = 0.0


def process_cpu(pid: int) -> float:
    """CPU seconds a process has used, all its threads (0.0 where /proc is missing)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


WRK_BODY = """wrk.method = "{method}"
wrk.body = '{body}'
wrk.headers["Content-Type"] = "application/json"
"""
_LATENCY = re.compile(r"^\s+(50|99)(?:\.000)?%\s+([\d.]+)(us|ms|s)\s*$", re.M)
_UNIT = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def wrk_rate(method: str, url: str, body: object, headers: dict[str, str], clients: int,
             seconds: float, work: Path) -> Driven:
    """``wrk`` against ``url``: requests/s, its own CPU share, and its latency percentiles."""
    script = work / f"wrk-{method.lower()}.lua"
    script.write_text(WRK_BODY.format(method=method, body=json.dumps(body or {})))
    argv = ["wrk", "-t2", f"-c{clients}", f"-d{seconds:.0f}s", "--latency", "-s", str(script)]
    for name, value in headers.items():
        argv += ["-H", f"{name}: {value}"]
    proc = subprocess.Popen([*argv, url], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    start = time.perf_counter()
    assert proc.stdout is not None
    out = proc.stdout.read().decode()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    found = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    if proc.returncode != 0 or found is None or "Non-2xx" in out:
        raise RuntimeError(f"wrk against {url} failed:\n{out}")
    latency = {p: float(v) * _UNIT[u] for p, v, u in _LATENCY.findall(out)}
    return Driven(float(found.group(1)), (usage.ru_utime + usage.ru_stime) / wall,
                  latency.get("50", 0.0), latency.get("99", 0.0),
                  requests=int(total.group(1)) if total else 0)


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


PHASES = (("submit", "POST", "/api/queue/submit",
           {"command": ["true"], "gpus": 0, "target": "worker"}),
          ("stats", "GET", "/api/queue/stats", None),
          ("list50", "GET", "/api/queue?limit=50", None))
LABELS = {"submit": "durable submissions/s", "stats": "GET /api/queue/stats",
          "list50": "GET /api/queue?limit=50"}


async def drive(client: str, method: str, url: str, body: object, headers: dict[str, str],
                args: argparse.Namespace, work: Path, server: int) -> Driven:
    """One phase against one server (``server``: its pid, for its CPU per request)."""
    before = process_cpu(server)
    if client == "wrk":
        driven = await asyncio.to_thread(wrk_rate, method, url, body, headers, args.clients,
                                         args.seconds, work)
    else:
        driven = Driven(await rate(method, url, body, headers, args.clients, args.seconds))
    requests = driven.requests or driven.rate * args.seconds
    driven.server_us = (process_cpu(server) - before) / max(requests, 1) * 1e6
    return driven


_COUNTER = re.compile(r"^eventq_log_(commits|committed_events)_total ([\d.e+]+)$", re.M)


async def log_counters(base: str, headers: dict[str, str]) -> tuple[float, float]:
    """The server's commits and committed events so far (from its /metrics)."""
    async with aiohttp.ClientSession(headers=headers) as http, \
            http.get(base + "/metrics") as resp:
        found = dict(_COUNTER.findall(await resp.text()))
    return float(found.get("commits", 0)), float(found.get("committed_events", 0))


async def measure_eventq(data: Path, args: argparse.Namespace, noop: tuple[str, int],
                         client: str, work: Path) -> dict[str, tuple[Driven, Driven]]:
    """Each phase against eventq, then the same against the no-op app, one after another
    (``--rounds`` times: the round of the median ratio is kept)."""
    port = free_port()
    server = start_eventq(data, port)
    try:
        while not (data / "admin.token").exists():
            await asyncio.sleep(0.05)
        headers = {"Authorization": f"Bearer {(data / 'admin.token').read_text().strip()}"}
        base = f"http://127.0.0.1:{port}"
        await wait_up(base + "/api/queue/stats", headers)
        out = {}
        for name, method, path, body in PHASES:
            rounds = []
            commits, events = await log_counters(base, headers)
            for _ in range(args.rounds):
                eventq = await drive(client, method, base + path, body, headers, args, work,
                                     server.pid)
                bare = await drive(client, method, noop[0], {} if method == "POST" else None,
                                   {}, args, work, noop[1])
                rounds.append((eventq, bare))
            rounds.sort(key=lambda pair: pair[0].rate / pair[1].rate)
            out[name] = rounds[len(rounds) // 2]
            commits_after, events_after = await log_counters(base, headers)
            if commits_after > commits:
                out[name][0].per_commit = (events_after - events) / (commits_after - commits)
        return out
    finally:
        stop(server)


def report(title: str, measured: dict[str, tuple[Driven, Driven]]) -> dict[str, float]:
    print(title)
    print(f"  {'':26}{'eventq/s':>10}{'no-op/s':>10}{'ratio':>7}{'p50 ms':>8}{'p99 ms':>8}"
          f"{'client CPU':>11}{'server us/req':>15}{'CPU ratio':>10}  goal >= 0.5")
    ratios = {}
    for name, (eventq, bare) in measured.items():
        ratios[name] = ratio = eventq.rate / bare.rate
        cpu = f"{eventq.client_cpu:.2f}/{bare.client_cpu:.2f}" if eventq.client_cpu else "-"
        p50, p99 = (f"{v:.1f}" if eventq.client_cpu else "-"
                    for v in (eventq.p50_ms, eventq.p99_ms))
        server = f"{eventq.server_us:.0f}/{bare.server_us:.0f}"
        by_cpu = bare.server_us / eventq.server_us if eventq.server_us else 0.0
        print(f"  {LABELS[name]:26}{eventq.rate:10.0f}{bare.rate:10.0f}{ratio:7.2f}"
              f"{p50:>8}{p99:>8}{cpu:>11}{server:>15}{by_cpu:10.2f}  "
              f"{'met' if ratio >= 0.5 else 'MISSED'}")
        if eventq.per_commit:
            print(f"  {'':26}the log: {eventq.per_commit:.1f} events per commit over the "
                  "phase's rounds")
    return ratios


async def main(args: argparse.Namespace) -> int:
    work = Path(tempfile.mkdtemp(prefix="eventq-bench-http-"))
    noop_port = free_port()
    noop = subprocess.Popen([sys.executable, "-c", NOOP_APP, str(noop_port)])
    clients = ["wrk", "python"] if shutil.which("wrk") else ["python"]
    if "wrk" not in clients:
        print("wrk not found (apt-get install wrk): the Python client only, which may be "
              "the bottleneck")
    try:
        noop_url = f"http://127.0.0.1:{noop_port}/noop"
        await wait_up(noop_url, {})
        print(f"machine: {os.cpu_count()} cores, Python {platform.python_version()}; "
              f"{args.clients} connections, {args.seconds:.0f} s per phase; "
              "client CPU = the load generator's CPU seconds per second (eventq/no-op)")
        t0 = time.perf_counter()
        await seed_queue(work / "data", args.queued)
        print(f"seeded {args.queued:,} waiting jobs in {time.perf_counter() - t0:.1f} s")
        results: dict[str, dict[str, float]] = {}
        for load in sorted({0, args.load}):
            for client in clients:
                with busy(load):
                    measured = await measure_eventq(work / "data", args, (noop_url, noop.pid),
                                                    client, work)
                title = f"{client} client, {'quiet' if not load else f'{load} busy processes'}"
                results[title] = report(title, measured)
        if args.json:
            print(json.dumps({"queued": args.queued, "ratios": results}))
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
                   help="drive each phase this many times, in turn (the median ratio's round)")
    p.add_argument("--load", type=int, default=0,
                   help="busy processes beside the servers for a second, loaded run")
    p.add_argument("--json", action="store_true", help="also print the raw figures as JSON")
    return p.parse_args()


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse())))
