"""The attempts an agent runs: each started at most once, watched, stopped, its output sent.

Every attempt lives in ``DATA/jobs/JOB/ATTEMPT`` exactly as on the orchestrator's own
node (``eventq.runner``: claim, pid and exit files, ``stdout.log`` and ``stderr.log``), in
its own process group. Processes outlive the agent, so an agent that restarts finds in
these directories what its processes did while it was away; and a ``run`` for an attempt
whose directory is already claimed never starts a second process.

The orchestrator must hear how every attempt ended. An ended attempt therefore stays
listed (in ``hello`` and heartbeats) until the orchestrator surely has its end: a
``welcome`` that does not keep it, or its ``exited`` sent on a connection that then stayed
up for a whole heartbeat period (an orchestrator that dies before committing the report
closes the connection well within that time). Its directory is then marked ``reported``.

No GPU is held by two of its attempts: a ``run`` whose GPUs an attempt here still uses
(one the orchestrator gave away and told it to stop, say) starts once that one has ended.
Nothing starts once the worker's lease has lapsed (``eventq.agent.lease``), and nothing
runs unknown to the worker's watchdog (``eventq.agent.watchdog``) while a lease binds it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import time
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from eventq import runner
from eventq.agent.lease import Lease
from eventq.agent.link import Link
from eventq.agent.messages import Run
from eventq.agent.watchdog import FENCED_FILE, Watchdog

log = structlog.get_logger()

Key = tuple[str, int]
STREAMS = ("stdout", "stderr")
#: Most bytes of one stream sent in one ``log`` message.
CHUNK = 64 * 1024
#: How often a running attempt's output files are looked at.
POLL_SECONDS = 0.2
#: Bytes of stdout and stderr already sent (``"OUT ERR"``), so a restart sends nothing twice.
SENT_FILE = "sent"
#: The orchestrator has this attempt's end: a restarted agent leaves the directory alone.
REPORTED_FILE = "reported"
#: When its max_runtime runs out (epoch seconds), so that a restarted agent honours it too.
DEADLINE_FILE = "deadline"
#: How long a start waits to be told: a job that has ended by then has its start and its end
#: sent back to back, which the orchestrator commits together.
STARTED_AFTER = 0.01
#: How long the end of a job killed by a signal the agent did not send waits for the
#: agent's own stop: a stop of the whole worker (Slurm's ``scancel``, a node's shutdown)
#: signals the job and the agent at once, in either order.
STOPPED_WITH_WORKER = 1.0
#: Exit codes of a job (or of its wrapper) ended by a stop signal.
STOP_CODES = frozenset(c for s in (signal.SIGTERM, signal.SIGKILL, signal.SIGINT, signal.SIGHUP)
                       for c in (128 + s, -s))
SAFE_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


@dataclass(frozen=True)
class Exit:
    """How an attempt ended, as the ``exited`` message says it."""

    outcome: str  # "exited" | "timeout" | "cancelled" | "start_failed" | "lost"
    exit_code: int | None
    detail: str = ""


@dataclass(eq=False)
class Attempt:
    job_id: str
    attempt: int
    directory: Path
    #: The GPUs it runs on (CUDA_VISIBLE_DEVICES).
    gpus: frozenset[int] = frozenset()
    #: When it must be stopped for exceeding its max_runtime (epoch seconds).
    deadline: float | None = None
    pid: int | None = None
    adopted: bool = False
    #: Why it is being stopped ("cancelled", "timeout", or "lost" when fenced).
    stop_reason: str | None = None
    stopping: bool = False
    #: Seconds between SIGTERM and SIGKILL when it is stopped (None: the agent's own).
    grace: float | None = None
    offsets: list[int] = field(default_factory=lambda: [0, 0])
    #: Set once the process has ended and all its output has been sent.
    exit: Exit | None = None
    #: (connection number, loop time) of the last ``exited`` sent for it.
    exit_sent: tuple[int, float] | None = None
    process_done: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def key(self) -> Key:
        return (self.job_id, self.attempt)

    @property
    def running(self) -> bool:
        return self.exit is None and not self.process_done.is_set()


class Attempts:
    """Every attempt the agent has not yet seen recorded by the orchestrator."""

    def __init__(self, data_dir: Path, link: Link, trainer: tuple[str, ...],
                 grace_seconds: float, lease: Lease | None = None) -> None:
        # Absolute: the runner's wrapper writes its exit file after changing directory.
        self.data_dir, self.link = data_dir.absolute(), link
        self.trainer, self.grace_seconds = trainer, grace_seconds
        #: The environment every job starts from: the agent's own, read once (the agent
        #: never changes it once it runs; the worker's token left it before).
        self.environ = dict(os.environ)
        self.lease = lease or Lease(self.data_dir)
        self.watchdog = Watchdog(self.lease.path)
        #: Set when the agent itself is told to stop (SIGTERM, SIGINT).
        self.stopping = asyncio.Event()
        self.by_key: dict[Key, Attempt] = {}
        #: The attempts of ``by_key`` that may still run (those that have ended leave it at
        #: the next start).
        self.live: dict[Key, Attempt] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        #: run, adopted, completed, failed, cancelled, timeout, start_failed: for the last line.
        self.counts: Counter[str] = Counter()

    # --- what the orchestrator is told --------------------------------------------------

    def listed(self) -> list[list[Any]]:
        """[job id, attempt] of every attempt still to be accounted for (hello, heartbeat)."""
        return [[job_id, attempt] for job_id, attempt in sorted(self.by_key)]

    @property
    def running(self) -> int:
        return sum(a.running for a in self.by_key.values())

    @property
    def unsent(self) -> int:
        """Attempts whose end has not yet been sent even once."""
        return sum(a.exit_sent is None for a in self.by_key.values())

    async def reconcile(self, keep: set[Key]) -> None:
        """After a ``welcome``: forget what the orchestrator no longer counts as ours, stop
        what was given away, and repeat what it may have missed about the rest."""
        for key, att in list(self.by_key.items()):
            if key not in keep:
                if att.running:
                    self.stop(key, "cancelled", "the orchestrator gave it to another worker")
                elif att.exit is not None:
                    self._forget(att)
            elif att.exit is not None:
                await self._send_exit(att)
            elif att.pid is not None:
                await self._send_started(att)

    def confirm_delivered(self, now: float, period: float) -> None:
        """Ends sent on this connection at least ``period`` ago have surely been recorded."""
        for att in list(self.by_key.values()):
            sent = att.exit_sent
            if sent is not None and sent[0] == self.link.number and self.link.is_up \
                    and now - sent[1] >= period:
                self._forget(att)

    def _forget(self, att: Attempt) -> None:
        with contextlib.suppress(OSError):
            (att.directory / REPORTED_FILE).touch()
        self.by_key.pop(att.key, None)

    async def _send_started(self, att: Attempt) -> None:
        await self.link.send({"type": "started", "job_id": att.job_id, "attempt": att.attempt,
                              "pid": att.pid})

    async def _refuse(self, msg: Run, why: str) -> None:
        await self.link.send({"type": "exited", "job_id": msg.job_id, "attempt": msg.attempt,
                              "exit_code": None, "outcome": "start_failed", "detail": why})

    async def _send_exit(self, att: Attempt) -> None:
        """Once per connection: its own end and a welcome's repeat may meet."""
        end, before = att.exit, att.exit_sent
        assert end is not None
        if before is not None and before[0] == self.link.number and self.link.is_up:
            return
        att.exit_sent = (self.link.number, asyncio.get_running_loop().time())
        if not await self.link.send({"type": "exited", "job_id": att.job_id,
                                     "attempt": att.attempt, "exit_code": end.exit_code,
                                     "outcome": end.outcome, "detail": end.detail}):
            att.exit_sent = before

    # --- starting and finding attempts --------------------------------------------------

    def run(self, msg: Run) -> None:
        """Start an attempt the orchestrator sent, unless it was ever started here."""
        key = (msg.job_id, msg.attempt)
        if key in self.by_key:
            log.info("run_ignored", job_id=msg.job_id, attempt=msg.attempt,
                     why="this attempt is already here")
            return
        if not SAFE_ID.match(msg.job_id) or msg.attempt < 1:
            log.error("run_refused", job_id=msg.job_id, attempt=msg.attempt, why="bad job id")
            self._spawn(self._refuse(msg, "its job id cannot name a directory"))
            return
        directory = runner.attempt_dir(self.data_dir, msg.job_id, msg.attempt)
        att = Attempt(msg.job_id, msg.attempt, directory, frozenset(msg.gpus))
        self.by_key[key] = self.live[key] = att
        if (directory / "claim").exists():  # started before (or claimed by a restart)
            att.offsets, att.deadline = _read_offsets(directory), _read_deadline(directory)
            self._watch(att, self._inspect(att))
            return
        holders = self._holders(att)
        if holders:
            log.info("run_waits", job_id=msg.job_id, attempt=msg.attempt,
                     gpus=sorted(att.gpus & frozenset().union(*(a.gpus for a in holders))),
                     held_by=[a.key for a in holders])
            self._spawn(self._start_after(att, msg, holders))
            return
        self._start(att, msg)

    def _holders(self, att: Attempt) -> list[Attempt]:
        """Attempts here still using one of its GPUs. Looked for among those that may still
        run (``live``), not all the ended ones listed until the orchestrator surely has
        their ends: a worker that runs short jobs would look at hundreds for each."""
        for key in [k for k, a in self.live.items() if not a.running]:
            del self.live[key]
        return [a for a in self.live.values()
                if a is not att and not a.gpus.isdisjoint(att.gpus)]

    async def _start_after(self, att: Attempt, msg: Run, holders: list[Attempt]) -> None:
        """Start once the attempts still using its GPUs have ended."""
        await asyncio.wait([asyncio.ensure_future(a.process_done.wait()) for a in holders])
        self._start(att, msg)

    def _start(self, att: Attempt, msg: Run) -> None:
        if att.stop_reason is not None:  # stopped while it waited for its GPUs
            self._watch(att, _now(Exit(att.stop_reason, None, "stopped before it started")))
            return
        if self.lease.lapsed:
            self._watch(att, _now(Exit("start_failed", None, "the worker's lease has lapsed; "
                                       "it starts nothing until the orchestrator answers")))
            return
        directory = att.directory
        try:
            watch = self.watchdog.feed() if self.lease.seconds is not None else None
            att.pid = runner.spawn(msg.spec(), msg.attempt, msg.gpus, directory, self.trainer,
                                   watch, self.environ)
        except (OSError, ValueError) as exc:
            self._watch(att, _now(Exit("start_failed", None, f"could not start: {exc}")))
            return
        if msg.max_runtime is not None:
            att.deadline = time.time() + msg.max_runtime
            with contextlib.suppress(OSError):
                (directory / DEADLINE_FILE).write_text(f"{att.deadline}\n")
        self.counts["run"] += 1
        log.info("run", job_id=msg.job_id, attempt=msg.attempt, gpus=msg.gpus, pid=att.pid)
        self._watch(att, self._child(att), announce=True)

    async def adopt_all(self) -> int:
        """At start-up: take back every attempt whose end the orchestrator may not have."""
        for directory in sorted(self.data_dir.glob("jobs/*/*")):
            if not directory.name.isdigit() or not directory.is_dir() \
                    or (directory / REPORTED_FILE).exists():
                continue
            seen = await runner.inspect(directory)
            if seen.state == "never_started" or (seen.state == "vanished" and seen.pid is None):
                # Claimed now (or before) so it never starts: a resent run reports that.
                (directory / REPORTED_FILE).touch()
                continue
            att = Attempt(directory.parent.name, int(directory.name), directory,
                          _read_gpus(seen.pid) if seen.state == "alive" else frozenset(),
                          _read_deadline(directory), offsets=_read_offsets(directory))
            self.by_key[att.key] = self.live[att.key] = att
            if seen.state == "alive" and seen.pid is not None and self.lease.path.exists():
                self.watchdog.announce(seen.pid, directory)  # in case its own has gone
            self._watch(att, self._found(att, seen))
        return len(self.by_key)

    async def _inspect(self, att: Attempt) -> Exit:
        return await self._found(att, await runner.inspect(att.directory))

    async def _found(self, att: Attempt, seen: runner.Found) -> Exit:
        """What a directory that was claimed before says about its process."""
        if seen.state == "alive" and seen.pid is not None:
            att.pid, att.adopted = seen.pid, True
            self.counts["adopted"] += 1
            log.info("adopted", job_id=att.job_id, attempt=att.attempt, pid=att.pid)
            await self._send_started(att)
            if att.stop_reason is not None:
                self._spawn(self._stop(att))
            code = await runner.wait_foreign(seen.pid, att.directory)
            await self._left_behind(att)
            if code is None:
                return _ended(att, code, "the adopted process ended without an exit code")
            return _ended(att, code)
        if seen.state == "exited":
            if seen.pid is not None:
                att.pid = seen.pid
                await self._left_behind(att)  # what the job left in its group, if anything
            att.process_done.set()
            return _ended(att, seen.exit_code, "it ended while the agent was away")
        if seen.pid is not None:
            att.pid = seen.pid
            await self._left_behind(att)  # a daemon it forked may outlive its wrapper
            return _ended(att, None, "the process vanished while the agent was away")
        att.process_done.set()
        return Exit("start_failed", None,
                    "the agent stopped before this attempt could start; it never will")

    async def _child(self, att: Attempt) -> Exit:
        assert att.pid is not None
        code = await runner.wait_child(att.pid)
        if code == runner.CLAIMED and _read_pid(att.directory) != att.pid:
            att.process_done.set()
            return Exit("start_failed", None, "its directory was already claimed")
        if code in (runner.UNWATCHED, -signal.SIGPIPE) and runner.read_exit(att.directory) is None:
            att.process_done.set()
            return Exit("start_failed", None, "the worker's lease watchdog was not there to "
                                              "watch it, so it did not run")
        await self._left_behind(att)
        if att.stop_reason is None and code in STOP_CODES and await self._stopped_with_worker():
            return Exit("lost", code, "ended by the stop of its worker (its allocation or "
                                      "machine ended), not by itself")
        return _ended(att, code)

    async def _stopped_with_worker(self) -> bool:
        """Is the agent being stopped too (now, or within ``STOPPED_WITH_WORKER``)?"""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), STOPPED_WITH_WORKER)
        return self.stopping.is_set()

    async def _left_behind(self, att: Attempt) -> None:
        """The job's process ended: the attempt ends once nothing of it is left, in its
        group or out of it (``runner.end_group``)."""
        assert att.pid is not None
        await runner.end_group(att.pid, self.grace_seconds if att.grace is None else att.grace,
                               (att.job_id, att.attempt))
        att.process_done.set()

    # --- watching -----------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _watch(self, att: Attempt, ended: Coroutine[Any, Any, Exit],
               announce: bool = False) -> None:
        self._spawn(self._lifecycle(att, ended, announce))

    async def _lifecycle(self, att: Attempt, ended: Coroutine[Any, Any, Exit],
                         announce: bool = False) -> None:
        """Say it started (``announce``), send its output while it runs, then the rest,
        then how it ended."""
        waiter = asyncio.ensure_future(ended)
        timer = None
        if att.deadline is not None:
            timer = asyncio.get_running_loop().call_later(
                max(0.0, att.deadline - time.time()), self.stop, att.key, "timeout",
                "max_runtime exceeded")
        try:
            if announce:  # a job that ends at once: its start and end leave together
                await asyncio.wait({waiter}, timeout=STARTED_AFTER)
                await self._send_started(att)
            await self._follow(att, waiter)
        finally:
            waiter.cancel()
            if timer is not None:
                timer.cancel()
        try:
            att.exit = waiter.result()
        except OSError as exc:  # its directory could not be read: say so, do not hang
            att.process_done.set()
            att.exit = Exit("exited", None, f"the agent lost track of it: {exc}")
        self._count(att.exit)
        log.info("exited", job_id=att.job_id, attempt=att.attempt, outcome=att.exit.outcome,
                 exit_code=att.exit.exit_code, detail=att.exit.detail or None)
        await self._send_exit(att)

    async def _follow(self, att: Attempt, waiter: asyncio.Future[Exit]) -> None:
        while True:
            finished = waiter.done()
            sent = await self._send_output(att, final=finished)
            if sent is None:  # no connection: the output waits for the next one
                await asyncio.sleep(POLL_SECONDS)
                await self.link.up.wait()
            elif sent:
                await asyncio.sleep(0)  # a chatty job must not starve heartbeats
            else:
                if finished:
                    return
                await asyncio.wait({waiter}, timeout=POLL_SECONDS)

    async def _send_output(self, att: Attempt, final: bool) -> int | None:
        """Bytes of new output sent (at most one chunk per stream); None if not connected."""
        total = 0
        try:
            for index, stream in enumerate(STREAMS):
                data = _read_chunk(att.directory / f"{stream}.log", att.offsets[index])
                cut = len(data) if final and len(data) < CHUNK else complete_utf8(data)
                if cut == 0:
                    continue
                if not await self.link.send({
                        "type": "log", "job_id": att.job_id, "attempt": att.attempt,
                        "stream": stream, "data": data[:cut].decode("utf-8", "replace")}):
                    return None
                att.offsets[index] += cut
                total += cut
        finally:
            if total:
                _write_offsets(att.directory, att.offsets)
        return total

    def _count(self, end: Exit) -> None:
        if end.outcome == "exited":
            self.counts["completed" if end.exit_code == 0 else "failed"] += 1
        else:
            self.counts[end.outcome] += 1

    # --- stopping -----------------------------------------------------------------------

    def stop(self, key: Key, reason: str, why: str, grace: float | None = None) -> bool:
        """Stop a running attempt (SIGTERM to its group, SIGKILL after the grace period)."""
        att = self.by_key.get(key)
        if att is None or not att.running:
            return False
        if att.stop_reason is None:
            att.stop_reason, att.grace = reason, grace
            log.info("stopping", job_id=att.job_id, attempt=att.attempt, why=why)
        if att.pid is not None:
            self._spawn(self._stop(att))
        return True

    def fence_all(self, why: str) -> None:
        """The lease lapsed or was refused: stop every attempt, within the lease's grace."""
        for att in list(self.by_key.values()):
            if att.running:
                with contextlib.suppress(OSError):
                    (att.directory / FENCED_FILE).write_text(f"{time.time():.3f}\n")
                self.stop(att.key, "lost", why, self.lease.grace)

    async def wait_stopped(self, timeout: float) -> None:
        waits = [asyncio.ensure_future(a.process_done.wait()) for a in self.by_key.values()
                 if a.running]
        if waits:
            _, pending = await asyncio.wait(waits, timeout=timeout)
            for waiting in pending:
                waiting.cancel()

    async def _stop(self, att: Attempt) -> None:
        if att.stopping or att.pid is None:
            return
        att.stopping = True
        runner.signal_group(att.pid, signal.SIGTERM)
        grace = self.grace_seconds if att.grace is None else att.grace
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(att.process_done.wait(), grace)
        runner.signal_group(att.pid, signal.SIGKILL)  # and whatever is left in its group

    async def close(self) -> int:
        """Stop watching; running processes keep running for the next agent to adopt."""
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.watchdog.close()
        return self.running


async def _now(end: Exit) -> Exit:
    return end


def _ended(att: Attempt, code: int | None, detail: str = "") -> Exit:
    """How a process that ran ended: stopped by a lapsed lease, asked to stop, by itself,
    or with no exit code to tell (it vanished while the agent was away, or was adopted and
    ended without one): lost, as the orchestrator's own node reports it, so the job runs
    again. It was reported exited with no code, and the job failed for good."""
    if (att.directory / FENCED_FILE).exists():
        return Exit("lost", code, "stopped when the worker's lease lapsed (no answer from "
                                  "the orchestrator in time)")
    if code is None and att.stop_reason is None:
        return Exit("lost", None, detail)
    return Exit(att.stop_reason or "exited", code, detail)


def _read_gpus(pid: int | None) -> frozenset[int]:
    """The GPUs an adopted attempt runs on, from its wrapper's environment."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return frozenset()
    for entry in environ:
        if entry.startswith(b"CUDA_VISIBLE_DEVICES="):
            text = entry.split(b"=", 1)[1].decode()
            return frozenset(int(g) for g in text.split(",") if g.strip().isdigit())
    return frozenset()


def complete_utf8(data: bytes) -> int:
    """Length of the longest prefix of ``data`` that does not end inside a UTF-8 sequence."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 == 0x80:  # a continuation byte: look further back for its lead
            continue
        need = 2 if byte >> 5 == 0b110 else 3 if byte >> 4 == 0b1110 \
            else 4 if byte >> 3 == 0b11110 else 1
        return len(data) if need <= back else len(data) - back
    return len(data)


def _read_chunk(path: Path, offset: int) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(CHUNK)
    except FileNotFoundError:
        return b""


def _read_offsets(directory: Path) -> list[int]:
    try:
        out, err = (directory / SENT_FILE).read_text().split()
        return [int(out), int(err)]
    except (OSError, ValueError):
        return [0, 0]


def _write_offsets(directory: Path, offsets: list[int]) -> None:
    with contextlib.suppress(OSError):
        (directory / SENT_FILE).write_text(f"{offsets[0]} {offsets[1]}\n")


def _read_deadline(directory: Path) -> float | None:
    try:
        return float((directory / DEADLINE_FILE).read_text())
    except (OSError, ValueError):
        return None


def _read_pid(directory: Path) -> int | None:
    try:
        return int((directory / "pid").read_text().strip())
    except (OSError, ValueError):
        return None
