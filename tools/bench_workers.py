"""Many remote workers on real websockets: the orchestrator's cost, dispatch, reconnection.

A real ``eventq server`` subprocess (temporary data directory, simulated GPUs) is
connected to by N simulated workers: real websockets on loopback to
``/api/workers/ws``, spread over enough client processes (one per 1,000 workers, at
least four) that the clients are not the bottleneck; their CPU is printed. Each worker
sends ``hello`` with one simulated GPU, then a numbered heartbeat every
``heartbeat_seconds`` of its welcome (30 s with the default offline timeout: the real
rate, as eventq's agent sends it; ``--interval`` compresses it), answered by the
server's ``lease``. For each N (default 100, then 1,000; ``--workers 10000``) it
measures, in the same run:

- the orchestrator's CPU (% of one core: its process CPU time from /proc over the
  window, not wall time) and RSS while the workers only heartbeat;
- events appended to the log per idle heartbeat (goal 0: liveness is kept in memory);
- dispatch latency to a remote worker: the clock starts just before
  ``POST /api/queue/submit`` (``target: worker``); two stops: the worker's client
  process has read the ``run`` message, and the process the worker starts for it
  (``date +%s%N``) has read the clock (all CLOCK_REALTIME). Against local dispatch in
  the same server, alternated sample by sample: submit -> the local job's own process
  reads the clock (as in bench_dispatch.py). Each sample waits for its job to complete
  before the next. Quiet, then with ``--load N`` busy processes beside the server
  (``tools/benchkit.py``). Goal: remote p99 to the process start <= 50 ms, quiet. The
  three slowest samples of each phase are printed stop by stop, with what was not
  eventq's: how late the worker's client process's own loop woke around it (a 20 ms
  ticker), and how long the server was ready to run but waited for a CPU
  (``/proc/PID/task/*/schedstat``) between the submission and the process start; and,
  as context only, the p99 with each sample's wait for a CPU taken out;
- after ``kill -9`` of the orchestrator and a restart on the same port and data
  directory: the time until every worker has reconnected and been welcomed again
  (workers reconnect with eventq's agent's own jittered exponential backoff,
  ``eventq.agent.agent.Backoff``). Goal: <= 60 s.

It raises its own open-file limit to the hard limit (the server holds one socket per
worker) and says what it needs if the hard limit is too low. The client processes share
the machine with the server, so the figures are for that machine (printed first). Run
from the repository root: ``.venv/bin/python tools/bench_workers.py`` (about 1.5
minutes per size; 10,000 workers: ``--workers 10000``, about 3 minutes). Everything it
starts is stopped and its temporary directory removed, also on Ctrl-C or an error.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import math
import os
import platform
import queue
import random
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eventq.agent.agent import PING_SECONDS, WELCOME_TIMEOUT, Backoff
from tools.benchkit import Api, busy, percentile, print_goals, read_stamp, wait_for

REPO = Path(__file__).resolve().parents[1]
JOB = ["date", "+%s%N"]  # the job's process reads the clock as it starts
COMPRESSED_TIMEOUT = "3600"  # no worker is lost while --interval compresses time
WORKERS_PER_CLIENT = 1000
TICK_NS = 20_000_000
#: How far before a ``run`` was read its client's lag may have held the read back.
LAG_LOOKBACK_NS = 50_000_000
#: Open files beside one per worker: the log, the server's own, the clients' pipes.
SPARE_FILES = 512


def emit(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


@dataclass
class Fleet:
    url: str
    tokens: list[tuple[int, str]]
    #: Seconds between heartbeats; 0: the welcome's ``heartbeat_seconds``, as the agent.
    interval: float
    heartbeats: int = 0
    stopping: bool = False
    #: (when the loop should have woken, how late it woke), ns: this process's own lag.
    ticks: collections.deque[tuple[int, int]] = field(
        default_factory=lambda: collections.deque(maxlen=500))
    ticker: asyncio.Task[None] | None = None

    async def run(self) -> None:
        import aiohttp

        connector = aiohttp.TCPConnector(limit=0)  # one connection per worker, no pool cap
        timeout = aiohttp.ClientTimeout(total=None, connect=10, sock_connect=10)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            workers = [asyncio.create_task(self.worker(session, i, t)) for i, t in self.tokens]
            await self.commands()
            self.stopping = True
            if self.ticker is not None:
                self.ticker.cancel()
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)

    async def commands(self) -> None:
        """Lines on stdin: ``mark`` -> ``M <heartbeats sent so far>``; ``watch``: keep the
        loop's lag from now on (not while the idle CPU is measured); ``quit`` or EOF."""
        while True:
            line = (await asyncio.to_thread(sys.stdin.readline)).strip()
            if line == "mark":
                emit(f"M {self.heartbeats}")
            elif line == "watch" and self.ticker is None:
                self.ticker = asyncio.create_task(self.tick())
            elif line in ("quit", ""):
                return

    async def tick(self) -> None:
        """Wake every few ms and keep how late: the client's own loop lag, so that a slow
        sample can be told apart from a slow orchestrator."""
        while True:
            due = time.time_ns() + TICK_NS
            await asyncio.sleep(TICK_NS / 1e9)
            self.ticks.append((due, time.time_ns() - due))

    def lag_within(self, since: int, until: int) -> int:
        """The most this loop woke late (ns) in a wait that overlapped [since, until]."""
        return max((late for due, late in self.ticks if due <= until and due + late >= since),
                   default=0)

    async def worker(self, session: Any, index: int, token: str) -> None:
        """eventq's agent's connection loop, without its GPUs: connect, hello, heartbeat,
        run what it is sent; reconnect after the agent's own jittered backoff."""
        import aiohttp

        backoff = Backoff()
        hello = {"type": "hello", "simulated": True, "name": f"sim-{index}", "running": [],
                 "gpus": [{"index": 0, "name": "A100", "memory_gb": 80}]}
        while not self.stopping:
            try:
                async with session.ws_connect(self.url + "/api/workers/ws",
                                              headers={"X-Worker-Token": token},
                                              heartbeat=PING_SECONDS) as ws:
                    await ws.send_json(hello)
                    welcome = await ws.receive_json(timeout=WELCOME_TIMEOUT)
                    emit(f"W {index} {time.time_ns()}")
                    period = float(welcome.get("heartbeat_seconds", 30))
                    backoff.reset(period)
                    beat = asyncio.create_task(self.heartbeat(ws, self.interval or period))
                    try:
                        await self.serve(ws)
                    finally:
                        beat.cancel()
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError, TypeError):
                pass
            if not self.stopping:
                await asyncio.sleep(backoff.next())

    async def heartbeat(self, ws: Any, period: float) -> None:
        # The first one at a random point of the period: the fleet's steady rate from
        # the start (the agent's first comes one period after its own welcome).
        await asyncio.sleep(random.uniform(0, period))
        beat = 0
        while not ws.closed:
            beat += 1
            await ws.send_json({"type": "heartbeat", "running": [], "beat": beat})
            self.heartbeats += 1
            await asyncio.sleep(period)

    async def serve(self, ws: Any) -> None:
        import aiohttp

        async for msg in ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            got = time.time_ns()
            data = json.loads(msg.data)
            if data.get("type") == "run":
                emit(f"R {data['job_id']} {got}")
                await self.run_job(ws, data["job_id"], data["attempt"], got)

    async def run_job(self, ws: Any, job_id: str, attempt: int, got: int) -> None:
        """Start the job's process as the agent would, and say when it read the clock."""
        proc = await asyncio.create_subprocess_exec(*JOB, stdout=asyncio.subprocess.PIPE,
                                                    stdin=asyncio.subprocess.DEVNULL)
        job = {"job_id": job_id, "attempt": attempt}
        await ws.send_json({"type": "started", "pid": proc.pid, **job})
        out, _ = await proc.communicate()
        start = int(out.decode().strip() or 0)
        emit(f"S {job_id} {start}")
        emit(f"L {job_id} {self.lag_within(got - LAG_LOOKBACK_NS, start)}")
        await ws.send_json({"type": "exited", "exit_code": proc.returncode,
                            "outcome": "exited", **job})


def client_main(tokens_file: str, first: int, count: int, url: str, interval: float) -> int:
    tokens = json.loads(Path(tokens_file).read_text())[first:first + count]
    fleet = Fleet(url, [(first + i, t) for i, t in enumerate(tokens)], interval)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(fleet.run())
    return 0


# --- the orchestrator ------------------------------------------------------------------


class Server:
    """``eventq server`` in its own process group; kill -9 and restart on the same port."""

    def __init__(self, data_dir: Path, log: Path, offline_timeout: str | None) -> None:
        self.data_dir, self.log = data_dir, log
        self.offline_timeout = offline_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.url = ""

    def start(self) -> float:
        """Start it; returns the time (time.time_ns()/1e9) it wrote server.json."""
        (self.data_dir / "server.json").unlink(missing_ok=True)
        exe = Path(sys.executable).with_name("eventq")
        env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTQ_")}
        if self.offline_timeout is not None:
            env["EVENTQ_HEARTBEAT_TIMEOUT"] = self.offline_timeout
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [str(exe) if exe.exists() else "eventq", "server", "--data-dir",
                 str(self.data_dir), "--port", str(self.port), "--gpus", "1xA100-80GB",
                 "--grace", "2", "--log-format", "json"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                start_new_session=True)
        proc, server_file = self.proc, self.data_dir / "server.json"

        def ready() -> str | None:
            if proc.poll() is not None:
                raise RuntimeError(f"eventq server exited with {proc.returncode}; see "
                                   f"{self.log}")
            try:  # written once it listens; whole only once it parses
                url: str = json.loads(server_file.read_text())["url"]
            except (FileNotFoundError, ValueError, KeyError):
                return None
            return url

        self.url = wait_for(ready, 60, "eventq server start", step=0.005)
        listening = time.time_ns() / 1e9
        self.port = urlsplit(self.url).port or 0
        return listening

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.kill9()

    def admin_token(self) -> str:
        return (self.data_dir / "admin.token").read_text().strip()

    def head_seq(self) -> int:
        conn = sqlite3.connect(f"file:{self.data_dir / 'events.db'}?mode=ro", uri=True)
        try:
            return int(conn.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0])
        finally:
            conn.close()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


# --- the client processes, seen from the benchmark -------------------------------------


@dataclass
class Clients:
    """The fleet's processes; a thread per process turns its lines into ``inbox``."""

    procs: list[subprocess.Popen[str]] = field(default_factory=list)
    inbox: queue.Queue[tuple[str, str, int]] = field(default_factory=queue.Queue)
    welcomed: dict[int, int] = field(default_factory=dict)
    runs: dict[str, int] = field(default_factory=dict)
    starts: dict[str, int] = field(default_factory=dict)
    #: job id -> the most its client's loop woke late between reading ``run`` and the start.
    lags: dict[str, int] = field(default_factory=dict)
    marks: list[int] = field(default_factory=list)

    def start(self, url: str, tokens_file: Path, workers: int, processes: int,
              interval: float) -> None:
        share = math.ceil(workers / processes)
        for first in range(0, workers, share):
            proc = subprocess.Popen(
                [sys.executable, __file__, "--client", str(tokens_file), str(first),
                 str(min(share, workers - first)), url, str(interval)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                text=True, bufsize=1, start_new_session=True, cwd=REPO)
            self.procs.append(proc)
            assert proc.stdout is not None
            threading.Thread(target=self._read, args=(proc.stdout,), daemon=True).start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            kind, key, value = [*line.split(), "", ""][:3]
            self.inbox.put((kind, key, int(value or 0)))

    def drain(self, timeout: float = 0.0) -> None:
        """Take what the clients said (waiting up to ``timeout`` for the first line)."""
        try:
            item = self.inbox.get(timeout=timeout) if timeout else self.inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, key, value = item
            if kind == "W":
                self.welcomed[int(key)] = value
            elif kind == "R":
                self.runs[key] = value
            elif kind == "S":
                self.starts[key] = value
            elif kind == "L":
                self.lags[key] = value
            elif kind == "M":
                self.marks.append(int(key))
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                return

    def tell(self, line: str) -> None:
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.write(line + "\n")
            proc.stdin.flush()

    def heartbeats_sent(self) -> int:
        """Ask every client for its count of heartbeats sent, and add them up."""
        self.marks.clear()
        self.tell("mark")
        deadline = time.monotonic() + 30
        while len(self.marks) < len(self.procs) and time.monotonic() < deadline:
            self.drain(0.05)
        if len(self.marks) < len(self.procs):
            raise TimeoutError("the clients did not report their heartbeat counts")
        return sum(self.marks)

    def wait_welcomed(self, workers: int, since: float, timeout: float, what: str) -> float:
        """The time (s) the last of ``workers`` was welcomed after ``since``."""
        def done() -> bool:
            self.drain(0.05)
            return sum(1 for t in self.welcomed.values() if t / 1e9 >= since) >= workers

        try:
            wait_for(done, timeout, what, step=0)
        except TimeoutError:
            back = sum(1 for t in self.welcomed.values() if t / 1e9 >= since)
            raise TimeoutError(f"{what}: {back} of {workers} within {timeout:.0f} s") from None
        return max(t for t in self.welcomed.values()) / 1e9

    def cpu(self) -> list[float]:
        """Each client process's CPU seconds so far."""
        return [cpu_seconds(p.pid) if p.poll() is None else 0.0 for p in self.procs]

    def stop(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(OSError, ValueError):
                assert proc.stdin is not None
                proc.stdin.write("quit\n")
                proc.stdin.close()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
            if proc.stdout is not None:
                proc.stdout.close()


# --- one run at N workers ---------------------------------------------------------------

PHASES = ("quiet", "loaded")
KINDS = ("remote_run", "remote_start", "local_start")


@dataclass
class Figures:
    workers: int
    create_s: float = 0.0
    connect_s: float = 0.0
    cpu_percent: float = 0.0
    clients_cpu_percent: float = 0.0
    busiest_client_percent: float = 0.0
    rss_mib: float = 0.0
    heartbeats: int = 0
    idle_s: float = 0.0
    events_in_idle: int = 0
    #: phase -> kind -> seconds, one per sample.
    dispatch: dict[str, dict[str, list[float]]] = field(default_factory=lambda: {
        phase: {kind: [] for kind in KINDS} for phase in PHASES})
    reconnect_from_kill_s: float = 0.0
    reconnect_from_listen_s: float = 0.0
    samples: dict[str, list[Sample]] = field(default_factory=lambda: {p: [] for p in PHASES})

    def report(self) -> dict[str, Any]:
        per_beat = self.events_in_idle / self.heartbeats if self.heartbeats else float("nan")
        out: dict[str, Any] = {
            "workers": self.workers, "create_s": round(self.create_s, 2),
            "connect_s": round(self.connect_s, 2), "server_cpu_percent": round(self.cpu_percent, 2),
            "clients_cpu_percent": round(self.clients_cpu_percent, 1),
            "busiest_client_cpu_percent": round(self.busiest_client_percent, 1),
            "server_rss_mib": round(self.rss_mib, 1), "idle_s": round(self.idle_s, 1),
            "idle_heartbeats": self.heartbeats, "events_per_idle_heartbeat": per_beat,
            "reconnect_after_kill_s": round(self.reconnect_from_kill_s, 2),
            "reconnect_after_listen_s": round(self.reconnect_from_listen_s, 2)}
        for phase, kinds in self.dispatch.items():
            for kind, xs in kinds.items():
                if xs:
                    out[f"{phase}_{kind}_p50_ms"] = round(percentile(xs, 50) * 1e3, 2)
                    out[f"{phase}_{kind}_p99_ms"] = round(percentile(xs, 99) * 1e3, 2)
        for phase, samples in self.samples.items():
            if samples:
                waits = [x.server_cpu_wait / 1e9 for x in samples]
                less = [max(0, x.start - x.server_cpu_wait) / 1e9 for x in samples]
                out[f"{phase}_server_cpu_wait_p99_ms"] = round(percentile(waits, 99) * 1e3, 2)
                out[f"{phase}_remote_start_less_cpu_wait_p99_ms"] = round(
                    percentile(less, 99) * 1e3, 2)
        return out

    def machine_line(self, phase: str) -> str:
        """The machine's share of the remote figure: context, never the goal's figure."""
        r = self.report()
        if f"{phase}_server_cpu_wait_p99_ms" not in r:
            return ""
        wait = r[f"{phase}_server_cpu_wait_p99_ms"]
        return (f"{phase}: the server waited for a CPU up to {wait:.1f} ms in a sample (p99); "
                "remote to the process start with each sample's wait "
                f"taken out: p99 {r[f'{phase}_remote_start_less_cpu_wait_p99_ms']:.1f} ms")

    def dispatch_line(self, phase: str) -> str:
        r = self.report()
        if f"{phase}_remote_start_p50_ms" not in r:
            return f"{phase}: not measured"
        return (f"{phase}: remote to the process start p50 {r[f'{phase}_remote_start_p50_ms']:.1f}"
                f" ms p99 {r[f'{phase}_remote_start_p99_ms']:.1f} ms (to `run` read: p50 "
                f"{r[f'{phase}_remote_run_p50_ms']:.1f} p99 {r[f'{phase}_remote_run_p99_ms']:.1f})"
                f"; local p50 {r[f'{phase}_local_start_p50_ms']:.1f} ms p99 "
                f"{r[f'{phase}_local_start_p99_ms']:.1f} ms; remote/local p50 "
                f"{r[f'{phase}_remote_start_p50_ms'] / r[f'{phase}_local_start_p50_ms']:.2f}x")


def until_completed(api: Api, job_id: str) -> None:
    wait_for(lambda: api.call("GET", f"/api/jobs/{job_id}")["status"] == "completed", 30,
             f"completion of job {job_id}", step=0.002)


@dataclass
class Sample:
    """One remote dispatch, each stop in ns after the submission was sent."""

    job_id: str
    reply: int
    run: int
    start: int
    #: The most the worker's client process woke late around it (its own lag, not eventq's).
    client_lag: int
    #: How long the server was ready to run but waited for a CPU, from the submission to
    #: the process start (/proc/PID/schedstat): the machine's share, not eventq's.
    server_cpu_wait: int

    def line(self) -> str:
        return (f"{self.job_id}: reply {self.reply / 1e6:.1f}, run read {self.run / 1e6:.1f}, "
                f"process start {self.start / 1e6:.1f} ms; client lag {self.client_lag / 1e6:.1f}"
                f" ms; server waited for a CPU {self.server_cpu_wait / 1e6:.1f} ms")


def cpu_wait_ns(pid: int) -> int:
    """Time the process's threads have spent ready to run, waiting for a CPU."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            total += int((task / "schedstat").read_text().split()[1])
    return total


def sample_remote(api: Api, clients: Clients, server_pid: int) -> Sample:
    """Submit one job for a worker; when its stops were reached."""
    body = json.dumps({"command": ["true"], "gpus": 1, "target": "worker"}).encode()
    waited = cpu_wait_ns(server_pid)
    t0 = time.time_ns()
    job_id = api.send("POST", "/api/queue/submit", body)["job_id"]
    reply = time.time_ns() - t0

    def started() -> bool:
        clients.drain(0.01)
        return job_id in clients.lags

    wait_for(started, 30, f"the process of job {job_id} at a worker", step=0)
    waited = cpu_wait_ns(server_pid) - waited
    until_completed(api, job_id)
    return Sample(job_id, reply, clients.runs[job_id] - t0, clients.starts[job_id] - t0,
                  clients.lags[job_id], waited)


def sample_local(api: Api, data_dir: Path) -> float:
    t0 = time.time_ns()
    job_id = api.call("POST", "/api/queue/submit", {
        "command": JOB, "gpus": 1, "target": "local"})["job_id"]
    out = data_dir / "jobs" / job_id / "1" / "stdout.log"
    stamp = wait_for(lambda: read_stamp(out), 30, f"start of local job {job_id}")
    until_completed(api, job_id)
    return float((stamp - t0) / 1e9)


def measure_dispatch(fig: Figures, phase: str, api: Api, clients: Clients, server: Server,
                     args: argparse.Namespace) -> None:
    assert server.proc is not None
    server_pid, data_dir = server.proc.pid, server.data_dir
    clients.tell("watch")
    for _ in range(args.warmup):
        sample_remote(api, clients, server_pid)
        sample_local(api, data_dir)
    got = fig.dispatch[phase]
    for _ in range(args.samples):
        time.sleep(args.gap)
        sample = sample_remote(api, clients, server_pid)
        fig.samples[phase].append(sample)
        got["remote_run"].append(sample.run / 1e9)
        got["remote_start"].append(sample.start / 1e9)
        time.sleep(args.gap)
        got["local_start"].append(sample_local(api, data_dir))
    print(f"  {fig.dispatch_line(phase)} (n={args.samples} each)", flush=True)
    for sample in sorted(fig.samples[phase], key=lambda x: -x.start)[:3]:
        print(f"    slowest: {sample.line()}", flush=True)
    print(f"    {fig.machine_line(phase)}", flush=True)


def create_tokens(url: str, admin: str, workers: int) -> list[str]:
    """One worker each, over a few connections at once (their commits are shared)."""
    def create(first: int) -> list[str]:
        api = Api(url, admin)
        try:
            return [api.call("POST", "/api/admin/workers", {"name": f"sim-{i}"})["token"]
                    for i in range(first, workers, 8)]
        finally:
            api.close()

    with ThreadPoolExecutor(8) as pool:
        shares = list(pool.map(create, range(8)))
    return [shares[i % 8][i // 8] for i in range(workers)]


def measure_idle(fig: Figures, server: Server, clients: Clients, idle: float) -> None:
    """Heartbeats only: the server's CPU time over the window, from /proc."""
    assert server.proc is not None
    pid = server.proc.pid
    seq0, beats0, cpu0, ccpu0 = server.head_seq(), clients.heartbeats_sent(), \
        cpu_seconds(pid), clients.cpu()
    w0 = time.monotonic()
    time.sleep(idle)
    wall = time.monotonic() - w0
    fig.idle_s = wall
    fig.cpu_percent = (cpu_seconds(pid) - cpu0) / wall * 100
    spent = [b - a for a, b in zip(ccpu0, clients.cpu(), strict=True)]
    fig.clients_cpu_percent = sum(spent) / wall * 100
    fig.busiest_client_percent = max(spent) / wall * 100
    fig.heartbeats = clients.heartbeats_sent() - beats0
    fig.events_in_idle = server.head_seq() - seq0
    fig.rss_mib = rss_mib(pid)
    print(f"  idle {wall:.0f} s: {fig.heartbeats} heartbeats, {fig.events_in_idle} events, "
          f"server CPU {fig.cpu_percent:.1f}% of a core, RSS {fig.rss_mib:.0f} MiB; "
          f"{len(clients.procs)} clients {fig.clients_cpu_percent:.1f}% (busiest "
          f"{fig.busiest_client_percent:.1f}%)", flush=True)


def connect_fleet(fig: Figures, server: Server, clients: Clients, args: argparse.Namespace,
                  tmp: Path) -> Api:
    api = Api(server.url, server.admin_token())
    api.call("POST", "/api/queue/concurrency", {
        "max_concurrent": 100, "user_max_concurrent": 100, "local_job_max_concurrent": 100})
    t = time.monotonic()
    tokens = create_tokens(server.url, server.admin_token(), fig.workers)
    fig.create_s = time.monotonic() - t
    tokens_file = tmp / f"tokens-{fig.workers}.json"
    tokens_file.write_text(json.dumps(tokens))
    processes = args.clients or max(4, math.ceil(fig.workers / WORKERS_PER_CLIENT))
    t = time.time_ns() / 1e9
    clients.start(server.url, tokens_file, fig.workers, processes, args.interval)
    clients.wait_welcomed(fig.workers, t, args.reconnect_timeout,
                          f"{fig.workers} workers connecting")
    fig.connect_s = time.time_ns() / 1e9 - t
    print(f"  {fig.workers} workers: created in {fig.create_s:.1f} s, connected from "
          f"{processes} client processes in {fig.connect_s:.1f} s", flush=True)
    return api


def run_at(workers: int, args: argparse.Namespace, tmp: Path) -> Figures:
    fig = Figures(workers)
    data_dir = tmp / f"data-{workers}"
    server = Server(data_dir, tmp / f"server-{workers}.log",
                    COMPRESSED_TIMEOUT if args.interval else None)
    clients = Clients()
    try:
        server.start()
        api = connect_fleet(fig, server, clients, args, tmp)
        time.sleep(2.0)  # the connections settle
        measure_idle(fig, server, clients, args.idle)
        measure_dispatch(fig, "quiet", api, clients, server, args)
        if args.load:
            with busy(args.load):
                measure_dispatch(fig, "loaded", api, clients, server, args)
        api.close()

        killed = time.time_ns() / 1e9
        server.kill9()
        listening = server.start()
        last = clients.wait_welcomed(workers, killed, args.reconnect_timeout,
                                     f"{workers} workers reconnecting")
        fig.reconnect_from_kill_s = last - killed
        fig.reconnect_from_listen_s = last - listening
        print(f"  kill -9 and restart: all {workers} back {fig.reconnect_from_kill_s:.1f} s after "
              f"the kill ({fig.reconnect_from_listen_s:.1f} s after it listened again)",
              flush=True)
    finally:
        clients.stop()
        server.stop()
    return fig


@contextlib.contextmanager
def temporary_dir() -> Iterator[Path]:
    tmp = Path(tempfile.mkdtemp(prefix="eventq-bench-workers-"))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def raise_file_limit(workers: int) -> int:
    """Raise the soft open-file limit to the hard one (the server and clients inherit it);
    exit saying what is needed if even the hard limit is too low."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = workers + SPARE_FILES
    if hard != resource.RLIM_INFINITY and hard < need:
        sys.exit(f"{workers} workers need {need} open files in the server, but the hard "
                 f"limit is {hard}: raise it (as root: `ulimit -Hn {need}`, "
                 f"LimitNOFILE={need} in a systemd unit, or nofile in "
                 "/etc/security/limits.conf), or run fewer workers")
    if soft == resource.RLIM_INFINITY or (hard != resource.RLIM_INFINITY and soft >= hard):
        return soft
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Goals at the largest size: server CPU < 20% of a core "
                                       "at the real heartbeat; remote dispatch p99 to the "
                                       "process start <= 50 ms; all reconnected <= 60 s after "
                                       "a kill -9; 0 events per idle heartbeat.")
    p.add_argument("--workers", default="100,1000",
                   help="comma-separated fleet sizes, one run each (default 100,1000)")
    p.add_argument("--clients", type=int, default=0,
                   help="client processes the workers are spread over (default: one per "
                        f"{WORKERS_PER_CLIENT} workers, at least 4)")
    p.add_argument("--interval", type=float, default=0.0,
                   help="seconds between a worker's heartbeats (default 0: the welcome's "
                        "heartbeat_seconds, 30 s, the real rate)")
    p.add_argument("--idle", type=float, default=60.0,
                   help="seconds of heartbeats only, for CPU and events (default 60: two "
                        "heartbeat periods)")
    p.add_argument("--load", type=int, default=0,
                   help="busy processes beside the server for the loaded dispatch figures "
                        "(default 0: quiet only)")
    p.add_argument("--samples", type=int, default=30,
                   help="dispatch samples per phase, each remote and local (default 30)")
    p.add_argument("--warmup", type=int, default=3, help="unmeasured samples first (default 3)")
    p.add_argument("--gap", type=float, default=0.02,
                   help="idle seconds before each dispatch sample (default 0.02)")
    p.add_argument("--reconnect-timeout", type=float, default=180.0,
                   help="give up waiting for (re)connections after this (default 180 s)")
    p.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = p.parse_args(argv)
    args.sizes = [int(x) for x in args.workers.split(",") if x.strip()]
    if not args.sizes or min(args.sizes) < 1 or args.clients < 0 or args.samples < 1 \
            or args.load < 0:
        p.error("--workers and --samples must be positive, --clients and --load not negative")
    return args


def summary(results: list[Figures], args: argparse.Namespace) -> None:
    print("results:")
    for fig in results:
        r = fig.report()
        print(f"  {fig.workers:>5} workers: server CPU {r['server_cpu_percent']:.1f}% "
              f"(clients {r['clients_cpu_percent']:.1f}%, busiest "
              f"{r['busiest_client_cpu_percent']:.1f}%), RSS {r['server_rss_mib']:.0f} MiB, "
              f"{r['events_per_idle_heartbeat']:.4f} events/idle heartbeat; reconnect "
              f"{r['reconnect_after_kill_s']:.1f} s after kill -9")
        for phase in PHASES:
            print(f"         {fig.dispatch_line(phase)}")
            if fig.samples[phase]:
                print(f"           ({fig.machine_line(phase)})")
    big = max(results, key=lambda f: f.workers)
    r = big.report()
    real = "" if not args.interval else f" (heartbeat compressed to {args.interval} s)"
    print_goals([
        ("0 events per idle heartbeat", all(f.events_in_idle == 0 for f in results),
         ", ".join(f"{f.events_in_idle} events / {f.heartbeats} heartbeats" for f in results)),
        (f"server CPU < 20% of a core at {big.workers} workers{real}",
         r["server_cpu_percent"] < 20, f"{r['server_cpu_percent']:.1f}%"),
        (f"remote p99 to the process start <= 50 ms at {big.workers} workers, quiet",
         r["quiet_remote_start_p99_ms"] <= 50, f"{r['quiet_remote_start_p99_ms']:.1f} ms"),
        (f"all {big.workers} reconnected <= 60 s after a kill -9",
         big.reconnect_from_kill_s <= 60, f"{big.reconnect_from_kill_s:.1f} s")])
    if args.json:
        print(json.dumps([f.report() for f in results]))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--client"]:
        tokens_file, first, count, url, interval = argv[1:6]
        return client_main(tokens_file, int(first), int(count), url, float(interval))
    args = parse(argv)
    files = raise_file_limit(max(args.sizes))
    print(f"machine: nproc={os.cpu_count()} python={platform.python_version()} "
          f"{platform.machine()}; load average {os.getloadavg()[0]:.2f}; open files "
          f"{files}; heartbeat "
          f"{'every ' + str(args.interval) + ' s' if args.interval else 'as welcomed (30 s)'}; "
          f"loaded: {args.load} busy processes", flush=True)
    results: list[Figures] = []
    with temporary_dir() as tmp:
        for n in args.sizes:
            print(f"{n} workers ...", flush=True)
            results.append(run_at(n, args, tmp))
    summary(results, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
