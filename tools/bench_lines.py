"""What the server's line per action costs: the same HTTP load against a server at
``--log-level info`` (a line per action, ``eventq/actionlog.py``) and one at ``warning``
(none written when nothing goes wrong), in the same run.

One server per level runs on a copy of the same seeded log (``--queued`` waiting jobs),
``--log-format json`` into a file, as a supervisor would keep its lines. Every phase of
``tools/bench_http.py`` (a durable submission, which writes one line each, and the two queue
views, which write none: the noise) is measured on each server in turn, the order rotating
each round, and on a bare aiohttp app, ``--rounds`` times; the figures are medians. Beside
each rate the tool prints the server's CPU time per request (``/proc/PID/task/*/schedstat``,
the log's writer thread included), which moves far less than a rate with the other work on
the machine.

Run from the repository root: ``.venv/bin/python tools/bench_lines.py`` (``--queued 10000
--rounds 2`` for a quick run). Goal: a submission at info costs at most 1.05 times the CPU
it costs at warning.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.bench_http import NOOP_APP, free_port, rate, seed_queue, stop, wait_up

PHASES = (("submit", "POST", "/api/queue/submit",
           {"command": ["true"], "gpus": 0, "target": "worker"}),
          ("stats", "GET", "/api/queue/stats", None),
          ("list50", "GET", "/api/queue?limit=50", None))
LEVELS = ("info", "warning")
Samples = dict[str, dict[str, list[float]]]


def cpu_ns(pid: int) -> int:
    """CPU time of all a process's threads, in ns."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):
            total += int((task / "schedstat").read_text().split()[0])
    return total


def start(data: Path, port: int, level: str) -> subprocess.Popen[bytes]:
    with open(data.parent / f"server-{level}.log", "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "eventq.cli.main", "server",
                                 "--data-dir", str(data), "--port", str(port), "--gpus",
                                 "4xA100-80GB", "--log-format", "json", "--log-level", level],
                                stdout=out, stderr=out)


async def ready(data: Path, port: int) -> dict[str, str]:
    while not (data / "admin.token").exists():
        await asyncio.sleep(0.05)
    headers = {"Authorization": f"Bearer {(data / 'admin.token').read_text().strip()}"}
    await wait_up(f"http://127.0.0.1:{port}/api/queue/stats", headers)
    return headers


async def one_round(round_: int, servers: dict[str, tuple[subprocess.Popen[bytes], int]],
                    headers: dict[str, dict[str, str]], noop: str,
                    args: argparse.Namespace, samples: Samples) -> None:
    order = list(LEVELS[round_ % 2:] + LEVELS[:round_ % 2])  # neither goes first always
    for name, method, path, body in PHASES:
        for level in order:
            proc, port = servers[level]
            before, started = cpu_ns(proc.pid), time.perf_counter()
            per_second = await rate(method, f"http://127.0.0.1:{port}{path}", body,
                                    headers[level], args.clients, args.seconds)
            requests = per_second * (time.perf_counter() - started)
            samples[level].setdefault(name, []).append(per_second)
            samples[level].setdefault(f"cpu_{name}", []).append(
                (cpu_ns(proc.pid) - before) / 1000 / max(requests, 1.0))
        samples["noop"].setdefault(name, []).append(await rate(
            method, noop, {} if method == "POST" else None, {}, args.clients, args.seconds))


async def measure(work: Path, noop: str, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    shutil.copytree(work / "info", work / "warning")
    ports = {level: free_port() for level in LEVELS}
    servers = {level: (start(work / level, ports[level], level), ports[level])
               for level in LEVELS}
    try:
        headers = {level: await ready(work / level, ports[level]) for level in LEVELS}
        samples: Samples = {level: {} for level in (*LEVELS, "noop")}
        for round_ in range(args.rounds):
            await one_round(round_, servers, headers, noop, args, samples)
        return {who: {k: statistics.median(v) for k, v in figures.items()}
                for who, figures in samples.items()}
    finally:
        for proc, _ in servers.values():
            stop(proc)


def report(medians: dict[str, dict[str, float]]) -> None:
    print(f"{'':10}{'':24}{'eventq/s':>10}{'no-op/s':>10}{'ratio':>7}{'CPU/request':>13}")
    for level in LEVELS:
        for name, *_ in PHASES:
            got, bare = medians[level][name], medians["noop"][name]
            print(f"{level:10}{name:24}{got:10.0f}{bare:10.0f}{got / bare:7.2f}"
                  f"{medians[level]['cpu_' + name]:11.0f} µs")
    for name, *_ in PHASES:
        cpu = medians["info"][f"cpu_{name}"] / medians["warning"][f"cpu_{name}"]
        speed = medians["info"][name] / medians["warning"][name]
        print(f"info / warning, {name}: CPU per request {cpu:.3f}, requests/s {speed:.3f}"
              + (f"  goal <= 1.05: {'met' if cpu <= 1.05 else 'MISSED'}"
                 if name == "submit" else "  (no line: the noise)"))


async def main(args: argparse.Namespace) -> int:
    work = Path(tempfile.mkdtemp(prefix="eventq-bench-lines-"))
    noop_port = free_port()
    noop = subprocess.Popen([sys.executable, "-c", NOOP_APP, str(noop_port)])
    try:
        noop_url = f"http://127.0.0.1:{noop_port}/noop"
        await wait_up(noop_url, {})
        print(f"machine: {os.cpu_count()} cores, Python {platform.python_version()}; "
              f"{args.clients} clients, {args.seconds:.0f} s per phase, {args.rounds} rounds")
        await seed_queue(work / "info", args.queued)
        report(await measure(work, noop_url, args))
        return 0
    finally:
        stop(noop)
        shutil.rmtree(work, ignore_errors=True)


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--seconds", type=float, default=1.5, help="per phase")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--queued", type=int, default=100_000)
    return p.parse_args()


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse())))
