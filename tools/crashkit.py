"""Crash harness: a real ``eventq server`` killed with SIGKILL at random moments.

The server runs as a real subprocess on one data directory. Many concurrent
clients submit jobs over HTTP; every job appends a line to a ledger file when it
starts and when it ends (tools/ledger.py). The ledger is the world's own record of what ran, kept
outside eventq, so the checks compare what eventq recorded with what happened:

* lost: a job acknowledged with a 2xx reply that the server does not know after
  a restart, or that never finished;
* double run: an attempt started twice, a job that ran more than one attempt
  (every attempt exits 0, so a second one means the job ran twice), attempts of
  one job that overlapped, or a run the log holds no durable dispatch for;
* double held: two runs that used the same GPU at the same time (from the
  ledger), or a GPU the log grants while another attempt holds it;
* spurious loss: an attempt declared lost by the very server that dispatched it
  (recovery may only judge attempts dispatched before the restart);
* state mismatch: after every restart, and at the end, the jobs and GPU holders the
  server shows over HTTP differ from what ``eventq.replay.fold`` rebuilds from its log
  up to the same seq (tools/statecheck.py).

The server is started under a tiny reaper (a child subreaper), so the attempts a
killed server leaves running are reaped when they end, as an init system does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from eventq import events as ev
from eventq.log import GENESIS, LogCorrupt, chain_hash, connect_readonly, iter_rows
from tools import statecheck
from tools.ledger import (
    Runs,
    job_command,
    overlapping_attempts,
    overlapping_gpus,
    read_ledger,
    started_twice,
    unfinished,
)

#: Runs the server as its child; adopts and reaps whatever the server leaves behind.
REAPER = """\
import ctypes, os, subprocess, sys
ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
code = subprocess.Popen(sys.argv[1:]).wait()
while True:
    try:
        os.wait()
    except ChildProcessError:
        break
    except InterruptedError:
        continue
sys.exit(code)
"""

DEFAULT_LIMITS = {"max_concurrent": 8, "user_max_concurrent": 8, "local_job_max_concurrent": 4}
ACTIVE = ("pending", "dispatched", "running")


class HarnessError(RuntimeError):
    """The harness could not do its part (a server would not start, a wait ran out)."""


def eventq_command(*args: str) -> list[str]:
    """The installed ``eventq`` next to this interpreter, else ``python -m eventq.cli.main``."""
    script = Path(sys.executable).parent / "eventq"
    if script.exists():
        return [str(script), *args]
    return [sys.executable, "-m", "eventq.cli.main", *args]


# --- the log: what eventq recorded -------------------------------------------------------


@dataclass
class LogAudit:
    """Reads the event log incrementally (chain checked) and folds what the checks need.

    Deliberately independent of eventq's own folds: it keeps its own GPU holdings.
    """

    path: Path
    seq: int = 0
    prev: bytes = GENESIS
    epoch_start: int = 0
    starts: int = 0
    held: dict[tuple[str, int], tuple[str, int]] = field(default_factory=dict)
    allocated: dict[tuple[str, int], int] = field(default_factory=dict)
    dispatched: dict[tuple[str, int], int] = field(default_factory=dict)
    started: set[tuple[str, int]] = field(default_factory=set)
    ended: dict[tuple[str, int], ev.AttemptEnded] = field(default_factory=dict)
    active: dict[str, int] = field(default_factory=dict)
    status: dict[str, str] = field(default_factory=dict)
    attempt: dict[str, int] = field(default_factory=dict)
    coverage: Counter[str] = field(default_factory=Counter)
    double_held: list[str] = field(default_factory=list)
    double_dispatch: list[str] = field(default_factory=list)
    spurious_lost: list[str] = field(default_factory=list)
    corrupt: str | None = None

    def read(self) -> int:
        """Fold the rows committed since the last read; returns how many."""
        if self.corrupt is not None:
            return 0
        conn = connect_readonly(self.path)
        count = 0
        try:
            for seq, t, principal, type_, job_id, version, body, stored in \
                    iter_rows(conn, self.seq + 1):
                if seq != self.seq + 1:
                    raise LogCorrupt(self.seq + 1, f"sequence jumps to {seq}")
                if chain_hash(self.prev, seq, t, principal, type_, job_id, version, body) \
                        != stored:
                    raise LogCorrupt(seq, "hash chain broken")
                self._evolve(seq, ev.decode(body, version))
                self.seq, self.prev = seq, stored
                count += 1
        except LogCorrupt as exc:
            self.corrupt = str(exc)
        finally:
            conn.close()
        return count

    def _evolve(self, seq: int, e: ev.Event) -> None:
        if isinstance(e, ev.ServerStarted):
            self._crash_boundary()
            self.epoch_start, self.starts = seq, self.starts + 1
        elif isinstance(e, ev.JobSubmitted):
            self.status[e.job.job_id] = "pending"
            self.attempt[e.job.job_id] = 0
        elif isinstance(e, ev.GpusAllocated):
            for gpu in e.gpus:
                holder = self.held.get((e.node, gpu))
                if holder is not None:
                    self.double_held.append(f"seq {seq}: GPU {gpu} granted to {e.job_id}#"
                                            f"{e.attempt} while {holder[0]}#{holder[1]} holds it")
                self.held[(e.node, gpu)] = (e.job_id, e.attempt)
            self.allocated[(e.job_id, e.attempt)] = seq
        elif isinstance(e, ev.GpusReleased):
            for gpu in e.gpus:
                if self.held.get((e.node, gpu)) == (e.job_id, e.attempt):
                    del self.held[(e.node, gpu)]
            if e.reason == "orphaned":
                kind = "ended" if (e.job_id, e.attempt) in self.ended else "undispatched"
                self.coverage[f"orphan released ({kind})"] += 1
        elif isinstance(e, ev.AttemptDispatched):
            key = (e.job_id, e.attempt)
            if key in self.dispatched:
                self.double_dispatch.append(f"seq {seq}: {e.job_id}#{e.attempt} dispatched "
                                            f"again (first at seq {self.dispatched[key]})")
            if e.job_id in self.active:
                self.double_dispatch.append(f"seq {seq}: {e.job_id}#{e.attempt} dispatched "
                                            f"while #{self.active[e.job_id]} is active")
            self.dispatched[key], self.active[e.job_id] = seq, e.attempt
            self.status[e.job_id], self.attempt[e.job_id] = "dispatched", e.attempt
        elif isinstance(e, ev.AttemptStarted):
            self.started.add((e.job_id, e.attempt))
            if e.adopted:
                self.coverage["adopted alive"] += 1
        elif isinstance(e, ev.AttemptEnded):
            key = (e.job_id, e.attempt)
            self.ended[key] = e
            if self.active.get(e.job_id) == e.attempt:
                del self.active[e.job_id]
            if e.outcome == "lost":
                self.coverage[f"lost: {e.detail}"] += 1
                if self.dispatched.get(key, 0) > self.epoch_start:
                    self.spurious_lost.append(
                        f"{e.job_id}#{e.attempt} dispatched at seq {self.dispatched[key]} by the "
                        f"server started at seq {self.epoch_start}, which then declared it lost "
                        f"({e.detail!r})")
        elif isinstance(e, ev.JobRequeued):
            self.status[e.job_id] = "pending"
        elif isinstance(e, ev.JobCompleted):
            self.status[e.job_id] = "completed"
        elif isinstance(e, ev.JobFailed):
            self.status[e.job_id] = "failed"
        elif isinstance(e, ev.JobCancelled | ev.JobRejected):
            self.status[e.job_id] = "cancelled"

    def _crash_boundary(self) -> None:
        """A server starts: note the windows the log was left in (the previous one died)."""
        if self.starts == 0:
            return
        for key in self.allocated.keys() - self.dispatched.keys():
            if key in self.held.values():
                self.coverage["crash after GpusAllocated, before AttemptDispatched"] += 1
        for job_id, attempt in self.active.items():
            if (job_id, attempt) in self.started:
                self.coverage["crash while an attempt ran"] += 1
            else:
                self.coverage["crash after AttemptDispatched, before AttemptStarted"] += 1
        for holder in set(self.held.values()):
            if holder in self.ended:
                self.coverage["crash after AttemptEnded, before GpusReleased"] += 1


# --- findings ----------------------------------------------------------------------------


@dataclass
class Findings:
    acked: int = 0
    unacked: int = 0
    jobs: int = 0
    runs: int = 0
    restarts: int = 0
    lost: list[str] = field(default_factory=list)
    unfinished: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    double_run: list[str] = field(default_factory=list)
    double_held: list[str] = field(default_factory=list)
    spurious_lost: list[str] = field(default_factory=list)
    wrong_attempt: list[str] = field(default_factory=list)
    unlogged_runs: list[str] = field(default_factory=list)
    leaked_gpus: list[str] = field(default_factory=list)
    http_errors: list[str] = field(default_factory=list)
    state_mismatch: list[str] = field(default_factory=list)
    verify: dict[str, Any] = field(default_factory=dict)
    coverage: Counter[str] = field(default_factory=Counter)

    def problems(self) -> dict[str, list[str]]:
        """Every kind of breach with its instances; empty when all is well."""
        kinds = {
            "lost": self.lost, "unfinished": self.unfinished, "failed": self.failed,
            "double_run": self.double_run, "double_held": self.double_held,
            "spurious_lost": self.spurious_lost, "wrong_attempt": self.wrong_attempt,
            "unlogged_runs": self.unlogged_runs, "leaked_gpus": self.leaked_gpus,
            "http_errors": self.http_errors, "state_mismatch": self.state_mismatch,
        }
        if self.verify and not self.verify.get("ok"):
            kinds["replay_verify"] = [json.dumps(self.verify)]
        return {k: v for k, v in kinds.items() if v}

    def merge(self, other: Findings) -> None:
        """Add another run's findings to these (one fuzz run may use several data dirs)."""
        for name in ("acked", "unacked", "jobs", "runs", "restarts"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for name in ("lost", "unfinished", "failed", "double_run", "double_held",
                     "spurious_lost", "wrong_attempt", "unlogged_runs", "leaked_gpus",
                     "http_errors", "state_mismatch"):
            getattr(self, name).extend(getattr(other, name))
        if other.verify and (not self.verify or self.verify.get("ok")):
            self.verify = other.verify
        self.coverage += other.coverage

    def counts(self) -> dict[str, int]:
        return {"acknowledged": self.acked, "unacknowledged": self.unacked, "jobs": self.jobs,
                "attempts_run": self.runs, "restarts": self.restarts, "lost": len(self.lost),
                "double_run": len(self.double_run), "double_held": len(self.double_held),
                "failed": len(self.failed), "spurious_lost": len(self.spurious_lost),
                "unfinished": len(self.unfinished), "wrong_attempt": len(self.wrong_attempt),
                "unlogged_runs": len(self.unlogged_runs), "leaked_gpus": len(self.leaked_gpus),
                "http_errors": len(self.http_errors),
                "state_mismatch": len(self.state_mismatch),
                "state_compared": self.coverage["state compared"],
                "replay_verify_ok": int(bool(self.verify.get("ok")))}


# --- the harness -------------------------------------------------------------------------


@dataclass
class Options:
    clients: int = 16
    burst: tuple[int, int] = (4, 24)
    #: 40% of kills come mid-burst (just after a random reply, other submissions in flight),
    #: 30% within this many seconds after the burst (jobs running and exiting), 30% a few
    #: milliseconds after a job's process writes its end line (its end, release, next dispatch).
    kill_window: float = 0.8
    gpus: tuple[int, ...] = (0, 1, 2)
    limits: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_LIMITS))
    #: The share of kill points followed by a second kill during the restart's recovery.
    recovery_kills: float = 0.15
    start_timeout: float = 20.0
    drain_timeout: float = 60.0
    #: How long the state check waits for a moment the log stands still.
    still_timeout: float = 5.0


class Harness:
    """``async with Harness(workdir, seed) as h: await h.start(); await h.crash_point() …``"""

    def __init__(self, workdir: Path, seed: int | None = None,
                 options: Options | None = None) -> None:
        self.workdir = workdir
        self.data_dir = workdir / "data"
        #: How the server is told its data directory, if not as ``data_dir`` (e.g. a symlink
        #: to it, or a path relative to ``workdir``, where the server runs).
        self.data_dir_arg: str | None = None
        self.ledger = workdir / "ledger.txt"
        self.server_log = workdir / "server.log"
        self.options = options or Options()
        self.rng = random.Random(seed)
        self.audit = LogAudit(self.data_dir / "events.db")
        self.findings = Findings()
        self.acked: dict[str, int] = {}
        self.launchers: list[subprocess.Popen[bytes]] = []
        self.url = ""
        self.token = ""
        self.server_pid: int | None = None
        self.point = 0
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Harness:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
        await self.cleanup()

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "use the harness as an async context manager"
        return self._session

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    # --- the server's life ---------------------------------------------------------------

    async def start(self) -> None:
        """Start the server; return once it answers. Raises HarnessError if it cannot."""
        server_file = self.data_dir / "server.json"
        server_file.unlink(missing_ok=True)  # a killed server leaves its own behind
        proc = self._launch()
        deadline = time.monotonic() + self.options.start_timeout
        info: dict[str, Any] | None = None
        while info is None:
            if proc.poll() is not None:
                raise HarnessError(f"server exited with {proc.returncode}: {self.log_tail()}")
            if time.monotonic() > deadline:
                raise HarnessError(f"server did not start in time: {self.log_tail()}")
            with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
                info = json.loads(server_file.read_text())
            if info is None:
                await asyncio.sleep(0.02)
        self.url, self.server_pid = info["url"], int(info["pid"])
        self.token = (self.data_dir / "admin.token").read_text().strip()
        while True:
            with contextlib.suppress(aiohttp.ClientError):
                async with self.session.get(f"{self.url}/api/queue", headers=self.headers) as r:
                    if r.status == 200:
                        break
            if time.monotonic() > deadline:
                raise HarnessError(f"server does not answer /api/queue: {self.log_tail()}")
            await asyncio.sleep(0.02)
        await self.set_limits()

    def _launch(self) -> subprocess.Popen[bytes]:
        cmd = eventq_command("server", "--data-dir", self.data_dir_arg or str(self.data_dir),
                             "--port", "0", "--gpus", "4xA100-80GB", "--grace", "1")
        with open(self.server_log, "ab") as out:
            proc = subprocess.Popen([sys.executable, "-c", REAPER, *cmd], stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=out, cwd=self.workdir)
        self.launchers.append(proc)
        return proc

    async def crash_in_recovery(self) -> None:
        """Start a server and SIGKILL it just after its first commit, mid-recovery."""
        wal = self.data_dir / "events.db-wal"

        def stamp() -> int:
            return wal.stat().st_mtime_ns if wal.exists() else 0

        before = stamp()
        proc = self._launch()
        deadline = time.monotonic() + self.options.start_timeout
        while stamp() == before and proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.002)
        await asyncio.sleep(self.rng.uniform(0, 0.02))
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
        with contextlib.suppress(OSError):
            for pid in children.read_text().split():
                self.server_pid = int(pid)
                await self.kill()
        self.findings.coverage["kill during recovery"] += 1
        self.findings.restarts += 1

    async def set_limits(self) -> None:
        async with self.session.get(f"{self.url}/api/queue/concurrency",
                                    headers=self.headers) as r:
            current = await r.json()
        if all(current.get(k) == v for k, v in self.options.limits.items()):
            return
        async with self.session.post(f"{self.url}/api/queue/concurrency", headers=self.headers,
                                     json=self.options.limits) as r:
            if r.status != 200:
                raise HarnessError(f"setting limits: {r.status} {await r.text()}")

    async def kill(self) -> None:
        """SIGKILL the server and wait until it is gone (its lock goes with it)."""
        pid = self.server_pid
        if pid is None:
            return
        self.server_pid = None
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        for _ in range(500):
            if not _alive(pid):
                return
            await asyncio.sleep(0.01)
        raise HarnessError(f"server {pid} survived SIGKILL")

    def recovered(self) -> Counter[str]:
        """What the servers' recoveries found, summed from their ``recovered`` log lines."""
        found: Counter[str] = Counter()
        text = self.server_log.read_text(errors="replace") if self.server_log.exists() else ""
        for line in text.splitlines():
            if "recovered" in line:
                for key, value in re.findall(r"\b(adopted|exited|vanished)=(\d+)", line):
                    found[f"recovery found attempts {key}"] += int(value)
        return found

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.server_log.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no server log)"

    # --- clients ---------------------------------------------------------------------------

    async def submit_burst(self, count: int, kill_at: int | None = None,
                           trigger: asyncio.Event | None = None) -> list[str]:
        """``count`` jobs from concurrent clients; the ids acknowledged with a 2xx reply.

        ``trigger`` is set once ``kill_at`` of them are acknowledged.
        """
        acked: list[str] = []
        remaining = count
        url = f"{self.url}/api/queue/submit"
        if trigger is not None and kill_at == 0:
            trigger.set()

        async def client() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                long_job = self.rng.random() < 0.2
                sleep = self.rng.uniform(0.1, 0.6) if long_job else self.rng.randint(1, 9) / 100
                body = {"command": job_command(self.ledger, sleep), "name": "crash",
                        "gpus": self.rng.choice(self.options.gpus)}
                try:
                    async with self.session.post(url, json=body, headers=self.headers) as r:
                        reply = await r.json()
                        if 200 <= r.status < 300:
                            acked.append(reply["job_id"])
                            self.acked[reply["job_id"]] = self.point
                        else:
                            self.findings.http_errors.append(f"submit: {r.status} {reply}")
                except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError):
                    self.findings.unacked += 1
                    return  # the server is gone; the next point submits to the next one
                if trigger is not None and kill_at is not None and len(acked) >= kill_at:
                    trigger.set()

        await asyncio.gather(*(client() for _ in range(self.options.clients)))
        return acked

    async def job(self, job_id: str) -> tuple[int, dict[str, Any]]:
        async with self.session.get(f"{self.url}/api/jobs/{job_id}", headers=self.headers) as r:
            return r.status, await r.json()

    async def wait_for(self, job_id: str, statuses: tuple[str, ...] = ("completed", "failed"),
                       timeout: float = 20.0) -> dict[str, Any]:
        """Poll one job until its status is one of ``statuses`` (bounded)."""
        deadline = time.monotonic() + timeout
        while True:
            status, job = await self.job(job_id)
            if status == 200 and job["status"] in statuses:
                return job
            if time.monotonic() > deadline:
                raise HarnessError(f"job {job_id} is {job}, never {statuses}")
            await asyncio.sleep(0.05)

    async def events(self, job_id: str) -> list[dict[str, Any]]:
        """The job's audit trail as the API serves it."""
        async with self.session.get(f"{self.url}/api/jobs/{job_id}/events",
                                    headers=self.headers) as r:
            return list((await r.json())["events"])

    async def submit(self, sleep: float, gpus: int) -> str:
        """One job; its id. Raises HarnessError unless the reply is a 2xx."""
        body = {"command": job_command(self.ledger, sleep), "name": "crash", "gpus": gpus}
        async with self.session.post(f"{self.url}/api/queue/submit", json=body,
                                     headers=self.headers) as r:
            reply = await r.json()
            if not 200 <= r.status < 300:
                raise HarnessError(f"submit: {r.status} {reply}")
        self.acked[reply["job_id"]] = self.point
        return str(reply["job_id"])

    async def jobs(self, job_ids: list[str]) -> dict[str, tuple[int, dict[str, Any]]]:
        limit = asyncio.Semaphore(16)

        async def one(job_id: str) -> tuple[str, tuple[int, dict[str, Any]]]:
            async with limit:
                return job_id, await self.job(job_id)

        return dict(await asyncio.gather(*(one(j) for j in job_ids)))

    # --- one kill point --------------------------------------------------------------------

    async def crash_point(self) -> float:
        """A burst of submissions, SIGKILL at a random moment, restart, quick checks.

        Returns the seconds the point took.
        """
        began = time.monotonic()
        self.point += 1
        count = self.rng.randint(*self.options.burst)
        trigger = asyncio.Event()
        mode = self.rng.random()
        mid_burst = mode < 0.4
        kill_at = self.rng.randint(0, count - 1) if mid_burst else None
        burst = asyncio.create_task(self.submit_burst(count, kill_at, trigger))
        if mid_burst:  # right after the kill_at-th reply, with other submissions in flight
            waiter = asyncio.create_task(trigger.wait())
            await asyncio.wait([burst, waiter], timeout=30, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            await asyncio.sleep(self.rng.uniform(0, 0.005))
            self.findings.coverage["kill mid-burst"] += 1
        elif mode < 0.7:  # while the jobs run and exit
            await asyncio.wait([burst], timeout=30)
            await asyncio.sleep(self.rng.uniform(0, self.options.kill_window))
            self.findings.coverage["kill after the burst"] += 1
        else:  # just after a job's process ends: its end, release and the next dispatch
            await asyncio.wait([burst], timeout=30)
            await self.next_job_end(timeout=2.0)
            await asyncio.sleep(self.rng.uniform(0, 0.015))
            self.findings.coverage["kill as a job ends"] += 1
        await self.kill()
        async with asyncio.timeout(30):
            acked = await burst
        if self.rng.random() < self.options.recovery_kills:
            await self.crash_in_recovery()
        await self.start()  # must succeed: the dead server's lock is released
        self.findings.restarts += 1
        for job_id, (status, _) in (await self.jobs(acked)).items():
            if status == 404:
                self.findings.lost.append(f"{job_id}: acknowledged before kill point "
                                          f"{self.point}, unknown after the restart")
        self.audit.read()
        await self.compare_state()
        return time.monotonic() - began

    async def compare_state(self) -> None:
        """At a moment the log stands still, the jobs and GPU holders the server shows over
        HTTP are the state its log replays to (``eventq.replay.fold``) up to that seq."""
        deadline = time.monotonic() + self.options.still_timeout
        while True:
            seq = await self.head_seq()
            live = await self.live_state()
            if await self.head_seq() == seq:
                break
            if time.monotonic() > deadline:
                self.findings.coverage["state not compared: the log never stood still"] += 1
                return
            await asyncio.sleep(0.005)
        replayed = await asyncio.to_thread(statecheck.replay_to, self.data_dir / "events.db",
                                           seq)
        self.findings.state_mismatch += [f"kill point {self.point}, seq {seq}: {d}"
                                         for d in statecheck.differences(live, replayed)]
        self.findings.coverage["state compared"] += 1
        if any(job.status in ("dispatched", "running") for job in live.jobs.values()):
            self.findings.coverage["state compared while attempts ran"] += 1

    async def head_seq(self) -> int:
        async with self.session.get(f"{self.url}/metrics", headers=self.headers) as r:
            return statecheck.head_seq(await r.text())

    async def live_state(self) -> statecheck.State:
        jobs: list[dict[str, Any]] = []
        while True:
            url = f"{self.url}/api/queue?include_completed=true&limit=10000&offset={len(jobs)}"
            async with self.session.get(url, headers=self.headers) as r:
                page = (await r.json())["jobs"]
            jobs += page
            if len(page) < 10000:
                break
        async with self.session.get(f"{self.url}/api/system/status?include_allocation=true",
                                    headers=self.headers) as r:
            status = await r.json()
        return statecheck.live_state(jobs, status)

    async def next_job_end(self, timeout: float) -> None:
        """Return when a job next writes its end line to the ledger (bounded)."""
        deadline = time.monotonic() + timeout
        seen = self.ledger.stat().st_size if self.ledger.exists() else 0
        while time.monotonic() < deadline:
            await asyncio.sleep(0.002)
            size = self.ledger.stat().st_size if self.ledger.exists() else 0
            if size > seen:
                with open(self.ledger, "rb") as f:
                    f.seek(seen)
                    if b" end " in f.read(size - seen):
                        return
                seen = size

    # --- the end -----------------------------------------------------------------------------

    async def drain(self) -> bool:
        """Wait (bounded) until no job is pending or running; True if the queue drained."""
        deadline = time.monotonic() + self.options.drain_timeout
        while time.monotonic() < deadline:
            async with self.session.get(f"{self.url}/api/queue/stats",
                                        headers=self.headers) as r:
                by_status = (await r.json())["by_status"]
            if not any(by_status.get(s) for s in ACTIVE):
                return True
            await asyncio.sleep(0.1)
        return False

    async def finish(self) -> Findings:
        """Drain the queue, then run every check; the findings."""
        f = self.findings
        if not await self.drain():
            f.unfinished.append(f"the queue did not drain in {self.options.drain_timeout}s")
        replies = await self.jobs(list(self.acked))
        self.audit.read()
        runs = read_ledger(self.ledger)
        f.acked, f.jobs, f.runs = len(self.acked), len(self.audit.status), len(runs)
        for job_id, (code, job) in replies.items():
            if code == 404:
                if not any(job_id in lost for lost in f.lost):
                    f.lost.append(f"{job_id}: acknowledged, unknown at the end")
            elif job["status"] == "failed":
                f.failed.append(f"{job_id}: failed after {job['attempt']} attempts: "
                                f"{job['error']}")
            elif job["status"] != "completed":
                f.unfinished.append(f"{job_id}: still {job['status']} after the drain")
        for job_id, status in self.audit.status.items():
            if job_id in self.acked:
                continue
            if status == "failed":
                f.failed.append(f"{job_id} (unacknowledged, yet recorded): failed")
            elif status in ACTIVE:
                f.unfinished.append(f"{job_id} (unacknowledged, yet recorded): still {status}")
        f.double_run += (started_twice(runs) + more_than_one_attempt(runs)
                         + overlapping_attempts(runs) + self.audit.double_dispatch)
        f.double_held += overlapping_gpus(runs) + self.audit.double_held
        f.unfinished += unfinished(runs)
        f.spurious_lost += self.audit.spurious_lost
        for (job_id, attempt), _run in runs.items():
            if (job_id, attempt) not in self.audit.dispatched:
                f.unlogged_runs.append(f"{job_id}#{attempt} ran without a durable dispatch")
            final = self.audit.attempt.get(job_id)
            if self.audit.status.get(job_id) == "completed" and final != attempt:
                f.wrong_attempt.append(f"{job_id}: attempt {attempt} ran, the log says "
                                       f"attempt {final} completed")
        for job_id, status in self.audit.status.items():
            if status == "completed" and (job_id, self.audit.attempt[job_id]) not in runs:
                f.wrong_attempt.append(f"{job_id}: completed without its attempt "
                                       f"{self.audit.attempt[job_id]} in the ledger")
        f.leaked_gpus += [f"GPU {node}:{gpu} still held by {job}#{attempt}"
                          for (node, gpu), (job, attempt) in self.audit.held.items()]
        if self.audit.corrupt:
            f.double_held.append(f"log unreadable: {self.audit.corrupt}")
        f.verify = self.replay_verify()
        await self.compare_state()
        f.coverage += self.audit.coverage + self.recovered() + Counter(
            {"kill points": self.point})
        return f

    def replay_verify(self) -> dict[str, Any]:
        done = subprocess.run(eventq_command("replay", "verify", "--data-dir", str(self.data_dir),
                                             "--format", "json"),
                              capture_output=True, text=True, timeout=120, check=False)
        try:
            result: dict[str, Any] = json.loads(done.stdout)
        except json.JSONDecodeError:
            return {"ok": False, "exit": done.returncode, "stderr": done.stderr[-2000:]}
        result["exit"] = done.returncode
        if len(result.get("problems", [])) > 20:
            result["problems"] = [*result["problems"][:20], "…"]
        return result

    async def cleanup(self) -> None:
        """Kill the server and every attempt left running; reap the reapers."""
        await self.kill()
        kill_attempts(self.data_dir)
        for proc in self.launchers:
            try:
                await asyncio.to_thread(proc.wait, 10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def more_than_one_attempt(runs: Runs) -> list[str]:
    """Jobs that ran more than one attempt: every attempt exits 0, so a second one ran twice."""
    by_job: dict[str, list[int]] = defaultdict(list)
    for job_id, attempt in runs:
        by_job[job_id].append(attempt)
    return [f"{job_id} ran attempts {sorted(attempts)}"
            for job_id, attempts in by_job.items() if len(attempts) > 1]


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def kill_attempts(data_dir: Path) -> int:
    """SIGKILL the process group of every attempt still running; how many were."""
    killed = 0
    for pid_file in data_dir.glob("jobs/*/*/pid"):
        try:
            pid = int(pid_file.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if str(pid_file.parent).encode() in cmdline.split(b"\0"):  # ours, not a reused pid
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
                killed += 1
    return killed


def second_server(data_dir: Path, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Start another server on ``data_dir`` in the foreground; what it did and said."""
    return subprocess.run(eventq_command("server", "--data-dir", str(data_dir), "--port", "0",
                                         "--gpus", "4xA100-80GB"),
                          capture_output=True, text=True, timeout=timeout, check=False)

