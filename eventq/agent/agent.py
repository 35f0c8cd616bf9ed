"""The agent's loop: connect, say hello, run what the orchestrator sends, reconnect.

One connection at a time to ``/api/workers/ws``. After any disconnect the agent connects
again with jittered exponential backoff, capped at one heartbeat period (30 s by default;
the orchestrator waits four before it gives a worker up), so that a worker never misses
the time it is given to come back; its running attempts keep running meanwhile and are
listed in the next ``hello``. Heartbeats come from a task of their own that waits on
nothing but the clock and the socket, so a silent or busy job never delays them.

Attempts run only while the worker holds a lease (``eventq.leases``): the welcome grants
it and the orchestrator's answer to each heartbeat renews it. When it lapses (no answer:
a partition, or an orchestrator that is down or has given this worker up) the agent stops
its attempts, and each attempt's watchdog does so too if the agent is dead or frozen.

A rejected token (401/403) stops the agent's attempts and ends the agent with a clear
message: retrying cannot help, and the orchestrator will give the attempts to others. A
``shutdown`` ends it when it has nothing left running and the worker is not persistent;
otherwise it reconnects, which is also how it learns that its token was rotated or the
worker removed. A rotation that keeps the worker running hands it the new token instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import aiohttp
import structlog

from eventq import gpus, lockfile, runner
from eventq.agent import messages as m
from eventq.agent.attempts import Attempts
from eventq.agent.lease import Lease
from eventq.agent.link import Link
from eventq.agent.watchdog import now

log = structlog.get_logger()

WS_PATH = "/api/workers/ws"
BACKOFF_FIRST, BACKOFF_CAP = 0.2, 30.0
WELCOME_TIMEOUT = 30.0
#: Websocket-level ping, to notice a connection that died without closing.
PING_SECONDS = 20.0
#: What the orchestrator says to a connection another agent with the same token replaced.
REPLACED = "replaced by a newer connection"
LOCK_FILE = "worker.lock"
#: Unanswered heartbeats remembered (a long partition must not grow memory).
BEATS_KEPT = 64


@dataclass(frozen=True)
class AgentConfig:
    url: str
    token: str
    data_dir: Path
    name: str
    gpu_spec: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    #: Keep running when the orchestrator says shutdown after a job (else exit then).
    persistent: bool = False
    trainer: tuple[str, ...] = runner.DEFAULT_TRAINER
    grace_seconds: float = 10.0
    #: On a time-limited allocation (``--max-runtime``, ``--margin-time``): take only jobs
    #: known to end before this, and leave once none fits in the time left.
    accepts_until: float | None = None
    #: Verifies an https orchestrator (``--ca``); None: the system's CAs.
    ssl: ssl.SSLContext | None = None
    #: The GPUs a batch system gave this worker on a node it shares (Slurm's
    #: ``SLURM_JOB_GPUS``): NVML sees them all, the worker offers only these.
    allocated_gpus: tuple[int, ...] | None = None


class Refused(Exception):
    """The orchestrator will not take this agent: a bad token, or another agent uses it."""


class AgentBusy(Exception):
    """Another agent runs on the same data directory."""


class Backoff:
    """Jittered exponential delays between connection attempts."""

    def __init__(self) -> None:
        self.failures, self.cap = 0, BACKOFF_CAP

    def next(self) -> float:
        delay = min(self.cap, BACKOFF_FIRST * 2 ** self.failures)
        self.failures = min(self.failures + 1, 16)
        return random.uniform(delay / 2, delay)

    def reset(self, heartbeat_seconds: float) -> None:
        self.failures = 0
        self.cap = min(BACKOFF_CAP, max(1.0, heartbeat_seconds))


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.link = Link()
        self.token = config.token
        self.lease = Lease(config.data_dir)
        self.attempts = Attempts(config.data_dir, self.link, config.trainer,
                                 config.grace_seconds, self.lease)
        #: Heartbeat number -> when it was sent (CLOCK_BOOTTIME), until answered.
        self.beats: dict[int, float] = {}
        self.beat = 0
        self._hello_sent = 0.0
        self.backoff = Backoff()
        self.worker_id: str | None = None
        self.heartbeat_seconds = 30.0
        self.draining = False
        #: The reason of the last ``shutdown`` received, until acted upon.
        self.shutdown_reason: str | None = None
        self.last_shutdown: str | None = None
        self.end_reason = "stopped"
        self.signalled = asyncio.Event()
        self._gpu_text = ""
        self.budget_spent = False

    @property
    def ws_url(self) -> str:
        return self.config.url.rstrip("/") + WS_PATH

    async def run(self) -> int:
        """Work until told to stop; 0 on a clean end. Raises Refused or AgentBusy."""
        lock = take_lock(self.config.data_dir)
        self._handle_signals()
        left = 0
        guard: asyncio.Task[None] | None = None
        try:
            found = await self.attempts.adopt_all()
            if found:
                log.info("found_attempts", attempts=found, data_dir=str(self.config.data_dir))
            guard = asyncio.get_running_loop().create_task(self._guard_lease())
            timeout = aiohttp.ClientTimeout(total=None, connect=10, sock_connect=10)
            async with aiohttp.ClientSession(timeout=timeout) as session:
                await self._work(session)
        except Refused:
            self.end_reason = "refused by the orchestrator (see below)"
            await self._fence("the orchestrator refused this worker")
            raise
        finally:
            if guard is not None:
                guard.cancel()
            left = await self.attempts.close()
            self.lease.close()
            self._summary(left)
            lock.close()
        return 0

    async def _work(self, session: aiohttp.ClientSession) -> None:
        loop = asyncio.get_running_loop()
        while not self.signalled.is_set():
            number = self.link.number
            connection = loop.create_task(self._connection(session))
            signalled = loop.create_task(self.signalled.wait())
            await asyncio.wait({connection, signalled}, return_when=asyncio.FIRST_COMPLETED)
            signalled.cancel()
            if not connection.done():  # a signal: close the connection, then stop
                connection.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await connection
                break
            why = connection.result()
            if self._finished():
                return
            delay = self.backoff.next()
            log.info("disconnected" if self.link.number != number else "connect_failed",
                     reason=why, retry_in=f"{delay:.1f}s", running=self.attempts.running)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.signalled.wait(), delay)
        self.end_reason = ("its time budget has no room for any waiting job"
                           if self.budget_spent else "stopped by a signal")

    def _finished(self) -> bool:
        """After a connection ended: is the agent's work over?"""
        if self.signalled.is_set():
            self.end_reason = "stopped by a signal"
            return True
        reason, self.shutdown_reason = self.shutdown_reason, None
        if reason is None:
            return False
        if REPLACED in reason:
            raise Refused(f"the orchestrator closed this connection: {reason}. Another "
                          "`eventq worker` is using this worker's token; run only one.")
        done = self.attempts.counts["run"] + self.attempts.counts["adopted"] > 0
        if not self.config.persistent and done and not self.attempts.running \
                and not self.attempts.unsent:
            self.end_reason = reason
            return True
        return False

    # --- one connection -------------------------------------------------------------------

    async def _connection(self, session: aiohttp.ClientSession) -> str:
        """Connect, greet, and serve until the connection ends; why it ended."""
        try:
            ws = await session.ws_connect(
                self.ws_url, headers={"X-Worker-Token": self.token},
                heartbeat=PING_SECONDS, max_msg_size=8 * 2**20, ssl=self.config.ssl or True,
                timeout=aiohttp.ClientWSTimeout(ws_close=5.0))
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status in (401, 403):
                raise Refused(self._refusal(exc.status)) from None
            return f"the orchestrator answered HTTP {exc.status} {exc.message}"
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            return f"cannot reach {self.config.url}: {exc or type(exc).__name__}"
        try:
            async with ws:
                return await self._session(ws)
        except (aiohttp.ClientError, OSError, RuntimeError) as exc:
            return f"the connection failed: {exc!r}"

    async def _session(self, ws: aiohttp.ClientWebSocketResponse) -> str:
        welcome = await self._hello(ws)
        if isinstance(welcome, str):
            return welcome
        await self._welcomed(ws, welcome)
        beat = asyncio.get_running_loop().create_task(self._heartbeat())
        try:
            await self._serve(ws)
        finally:
            beat.cancel()
            self.link.detach()
        if self.shutdown_reason is not None:
            return f"shutdown: {self.shutdown_reason}"
        extra = f": {ws.exception()}" if ws.exception() else ""
        return f"the connection closed (code {ws.close_code}){extra}"

    def _refusal(self, status: int) -> str:
        said = f"; before that it said: {self.last_shutdown}" if self.last_shutdown else ""
        return (f"the orchestrator at {self.config.url} refused this worker's token "
                f"(HTTP {status}){said}. The token may have been rotated "
                "(`eventq workers token ID` prints a new one) or the worker removed.")

    async def _hello(self, ws: aiohttp.ClientWebSocketResponse) -> m.Welcome | str:
        inventory = gpus.allocated(await asyncio.to_thread(gpus.detect, self.config.gpu_spec),
                                   self.config.allocated_gpus)
        if inventory.nvml_error:
            log.warning("no_gpus", why=inventory.nvml_error)
        self._hello_sent = now()  # a lease the welcome grants counts from here
        await ws.send_json({
            "type": "hello", "name": self.config.name, "simulated": inventory.simulated,
            "gpus": [{"index": g.index, "name": g.name, "memory_gb": g.memory_gb,
                      "foreign_memory_percent": g.foreign_memory_percent}
                     for g in inventory.gpus],
            "labels": self.config.labels, "running": self.attempts.listed(),
            "accepts_until": self.config.accepts_until,
            "grace_seconds": self.config.grace_seconds})
        self._gpu_text = f"{len(inventory.gpus)}" + (" (simulated)" if inventory.simulated
                                                     else "")
        try:
            msg = await ws.receive(timeout=WELCOME_TIMEOUT)
        except TimeoutError:
            return "no welcome from the orchestrator"
        if msg.type != aiohttp.WSMsgType.TEXT:
            return f"the connection closed before the welcome (code {ws.close_code})"
        try:
            welcome = m.decode(msg.data)
        except m.Unreadable:
            welcome = None
        if not isinstance(welcome, m.Welcome):
            return f"the orchestrator refused the hello: {str(msg.data)[:300]}"
        return welcome

    async def _welcomed(self, ws: aiohttp.ClientWebSocketResponse, welcome: m.Welcome) -> None:
        self.worker_id = welcome.worker_id
        self.heartbeat_seconds = max(0.05, welcome.heartbeat_seconds)
        self.backoff.reset(self.heartbeat_seconds)
        self.lease.grant(welcome.lease_seconds, welcome.fence_grace_seconds, self._hello_sent)
        self.link.attach(ws)
        log.info("connected", url=self.config.url, worker_id=self.worker_id,
                 gpus=self._gpu_text, kept=len(welcome.keep), told_to_stop=len(welcome.stop),
                 lease=welcome.lease_seconds)
        await self.attempts.reconcile(set(welcome.keep))

    async def _heartbeat(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.heartbeat_seconds)
            self.attempts.confirm_delivered(loop.time(), self.heartbeat_seconds)
            self.beat += 1
            self.beats[self.beat] = now()
            self.beats.pop(self.beat - BEATS_KEPT, None)
            await self.link.send({"type": "heartbeat", "running": self.attempts.listed(),
                                  "beat": self.beat})
            if self.config.accepts_until is not None and await self._budget_spent():
                self.budget_spent = True
                self.signalled.set()
                return

    async def _budget_spent(self) -> bool:
        """Idle, and no waiting job fits in the time left (the orchestrator knows which)."""
        if self.attempts.running or self.attempts.unsent or self.worker_id is None:
            return False
        assert self.config.accepts_until is not None
        if time.time() >= self.config.accepts_until:
            return True
        url = f"{self.config.url.rstrip('/')}/api/workers/queue?worker_id={self.worker_id}"
        headers = {"X-Worker-Token": self.token}
        try:
            async with aiohttp.ClientSession(headers=headers) as s, \
                    s.get(url, timeout=aiohttp.ClientTimeout(total=10),
                          ssl=self.config.ssl or True) as resp:
                return resp.status == 200 and not (await resp.json())["has_jobs"]
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError):
            return False

    async def _serve(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for frame in ws:
            if frame.type != aiohttp.WSMsgType.TEXT:
                continue
            try:
                msg = m.decode(frame.data)
            except m.Unreadable as exc:
                log.warning("unreadable_message", error=str(exc), data=str(frame.data)[:200])
                continue
            if not self._handle(msg):
                return

    def _handle(self, msg: m.ServerMessage) -> bool:
        """Act on one message; False ends the connection."""
        if isinstance(msg, m.Run):
            self.attempts.run(msg)
        elif isinstance(msg, m.JobCancel):
            outcome = "timeout" if msg.reason == "timeout" else "cancelled"
            if not self.attempts.stop((msg.job_id, msg.attempt), outcome, msg.reason):
                log.info("cancel_ignored", job_id=msg.job_id, attempt=msg.attempt,
                         why="not running here")
        elif isinstance(msg, m.Drain):
            self.draining = True
            log.info("draining", reason=msg.reason, running=self.attempts.running)
        elif isinstance(msg, m.Shutdown):
            self.shutdown_reason = self.last_shutdown = msg.reason
            log.info("shutdown_requested", reason=msg.reason, running=self.attempts.running)
            return False
        elif isinstance(msg, m.LeaseRenewed):
            self._renewed(msg.beat)
        elif isinstance(msg, m.TokenRotated):
            self.token = msg.token
            log.warning("token_rotated", note="the orchestrator handed this worker a new token "
                        "and kept it running; the old one no longer works: give the new one "
                        "to this worker's configuration (`eventq workers token` printed it)")
        elif isinstance(msg, m.Error):
            log.warning("orchestrator_error", error=msg.error)
        return True

    # --- the lease ------------------------------------------------------------------------

    def _renewed(self, beat: int) -> None:
        sent = self.beats.pop(beat, None)
        for older in [b for b in self.beats if b < beat]:
            del self.beats[older]
        if sent is not None:
            self.lease.renew(sent)

    async def _guard_lease(self) -> None:
        """Stop every attempt when the lease lapses (their watchdogs would, a moment later)."""
        while True:
            left = self.lease.left
            if left > 0:
                await asyncio.sleep(min(left, 1.0))
                continue
            if self.attempts.running:
                why = (f"the worker's lease lapsed: no answer from the orchestrator for "
                       f"{self.lease.seconds}s")
                log.warning("lease_lapsed", running=self.attempts.running)
                self.attempts.fence_all(why)
            await asyncio.sleep(0.2)

    async def _fence(self, why: str) -> None:
        """Refused: nothing of this worker's may run on. Stop all, and wait for the ends."""
        self.lease.lapse()
        if self.attempts.running:
            log.warning("stopping_attempts", why=why, running=self.attempts.running)
            self.attempts.fence_all(why)
            await self.attempts.wait_stopped(self.lease.grace + 5.0)

    # --- ending ---------------------------------------------------------------------------

    def _handle_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal)

    def _on_signal(self) -> None:
        self.signalled.set()
        self.attempts.stopping.set()

    def _summary(self, left_running: int) -> None:
        c = self.attempts.counts
        log.info("shutdown", reason=self.end_reason, worker_id=self.worker_id,
                 attempts_run=c["run"], adopted=c["adopted"], completed=c["completed"],
                 failed=c["failed"], cancelled=c["cancelled"], timed_out=c["timeout"],
                 start_failed=c["start_failed"], left_running=left_running)
        if left_running:
            log.info("left_running", attempts=left_running,
                     data_dir=str(self.config.data_dir),
                     note="their processes keep running; an agent started again on this "
                          "data directory adopts them")


def take_lock(data_dir: Path) -> IO[str]:
    """One agent per data directory: two would start the same attempts."""
    try:
        return lockfile.take(data_dir / LOCK_FILE)
    except lockfile.Held as held:
        raise AgentBusy(f"another eventq worker (pid {held.holder}) runs on {data_dir}; "
                        "give this one its own --data-dir") from None
