"""The local node: starts and stops attempts on the orchestrator's own machine.

It acts only on durable events (write-ahead effects): a process is started once
its ``AttemptDispatched`` is on disk, and stopped once ``AttemptStopRequested``
is. It tells the scheduler what became of each process.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import structlog

from eventq import events as ev
from eventq import jobenv, procgroup, runner
from eventq.actors.scheduler import AttemptReport, Scheduler
from eventq.actors.scheduler_state import SchedulerState
from eventq.log import Record

log = structlog.get_logger()

#: Seconds after a start before the next standby is started.
STANDBY_AFTER = 0.01


@dataclass
class LocalNode:
    DURABLE_READS: ClassVar[frozenset[type]] = frozenset({ev.AttemptDispatched,
                                                          ev.AttemptStopRequested})
    data_dir: Path
    scheduler: Scheduler
    state: SchedulerState
    grace_seconds: float = 10.0
    trainer: tuple[str, ...] = runner.DEFAULT_TRAINER
    #: (job id, attempt) -> pid (= process group) of live attempts.
    pids: dict[tuple[str, int], int] = field(default_factory=dict)
    tasks: set[asyncio.Task[object]] = field(default_factory=set)
    exited: dict[tuple[str, int], asyncio.Event] = field(default_factory=dict)
    #: The wrapper waiting for the next attempt (``runner.Standby``), if one is.
    standby: runner.Standby | None = None
    _standing_by: asyncio.TimerHandle | None = None

    def on_durable(self, records: Sequence[Record]) -> None:
        for record in records:
            e = record.event
            if isinstance(e, ev.AttemptDispatched) and e.node == "local":
                self._start(e)
            elif isinstance(e, ev.AttemptStopRequested):
                job = self.state.jobs.get(e.job_id)
                if job is not None and job.node == "local":
                    self._spawn_task(self._stop(e.job_id, e.attempt))

    def _spawn_task(self, coro: Coroutine[Any, Any, object]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _report(self, report: AttemptReport) -> None:
        if not self.scheduler._stopped:
            self.scheduler.tell(report)

    def _start(self, e: ev.AttemptDispatched) -> None:
        """Start the process right here, in the durable callback: not a loop turn later."""
        key = (e.job_id, e.attempt)
        self.exited[key] = asyncio.Event()
        directory = runner.attempt_dir(self.data_dir, e.job_id, e.attempt)
        try:
            spec = jobenv.for_local(self.data_dir, self.state.jobs[e.job_id].spec)
        except jobenv.EnvUnreadable as exc:
            self._ended(key, AttemptReport(e.job_id, e.attempt, "ended", outcome="start_failed",
                                           detail=f"could not start: {exc}"))
            return
        try:
            pid = self._handed(spec, e.attempt, e.gpus, directory)
            if pid is None:
                pid = runner.spawn(spec, e.attempt, e.gpus, directory, self.trainer)
        except (OSError, ValueError) as exc:
            self._ended(key, AttemptReport(e.job_id, e.attempt, "ended", outcome="start_failed",
                                           detail=f"could not start: {exc}"))
            return
        self.pids[key] = pid
        self._report(AttemptReport(e.job_id, e.attempt, "started", pid=pid))
        self._spawn_task(self._watch(key, pid))

    def _handed(self, spec: ev.JobSpec, attempt: int, gpus: list[int],
                directory: Path) -> int | None:
        """The standby's pid once it has the attempt; None where there is none to take it
        (a start right after another, before the next stands by) or it could not."""
        standby, self.standby = self.standby, None
        self.stand_by(STANDBY_AFTER)
        if standby is None:
            return None
        if standby.hand(spec, attempt, gpus, directory, self.trainer):
            return standby.pid
        self._spawn_task(runner.wait_child(standby.pid))  # reaped once it has ended
        return None

    def stand_by(self, after: float = 0.0) -> None:
        """Start the next standby ``after`` seconds from now: not at once after a start,
        whose reply and report come first (``posix_spawn`` holds the loop meanwhile)."""
        if self._standing_by is None:
            loop = asyncio.get_running_loop()
            self._standing_by = loop.call_later(after, self._new_standby)

    def _new_standby(self) -> None:
        self._standing_by = None
        if self.standby is not None:
            return
        try:
            self.standby = runner.Standby()
        except OSError as exc:  # starts spawn their wrappers instead
            log.warning("standby_failed", error=str(exc))

    async def _watch(self, key: tuple[str, int], pid: int) -> None:
        code = await runner.wait_child(pid)
        if code == runner.CLAIMED:
            log.error("attempt_already_claimed", job_id=key[0], attempt=key[1])
        else:
            await runner.end_group(pid, self.grace_seconds, key)
        self._ended(key, AttemptReport(*key, "ended", exit_code=code))

    def _ended(self, key: tuple[str, int], report: AttemptReport) -> None:
        self.pids.pop(key, None)
        self._report(report)
        done = self.exited.pop(key, None)
        if done is not None:
            done.set()

    async def _stop(self, job_id: str, attempt: int) -> None:
        """SIGTERM to the whole group, SIGKILL after the grace period."""
        key = (job_id, attempt)
        pgid = self.pids.get(key)
        if pgid is None:
            return
        runner.signal_group(pgid, signal.SIGTERM)
        done = self.exited.get(key)
        if done is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), self.grace_seconds)
        runner.signal_group(pgid, signal.SIGKILL)

    async def wait_ended(self, job_id: str, attempt: int, timeout: float) -> None:
        done = self.exited.get((job_id, attempt))
        if done is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), timeout)

    # --- recovery ----------------------------------------------------------------------

    async def recover(self, left_active: list[tuple[str, int]]) -> dict[str, int]:
        """Reconcile the attempts a previous server left active here with their directories.

        Only those: an attempt this server dispatched (its first pass runs before this)
        has its own live runner, and claiming its directory would declare it lost.
        """
        found = {"adopted": 0, "exited": 0, "vanished": 0}
        for key in left_active:
            job = self.state.jobs[key[0]]
            if not job.active or job.attempt != key[1]:
                continue
            directory = runner.attempt_dir(self.data_dir, *key)
            seen = await runner.inspect(directory)
            if seen.state == "alive" and seen.pid is not None:
                found["adopted"] += 1
                self.pids[key] = seen.pid
                self.exited[key] = asyncio.Event()
                self._report(AttemptReport(*key, "started", pid=seen.pid, adopted=True))
                self._spawn_task(self._watch_adopted(key, seen.pid, directory))
            elif seen.state == "exited":
                found["exited"] += 1
                self._report_once_gone(seen.pid, key, AttemptReport(
                    *key, "ended", pid=seen.pid, exit_code=seen.exit_code))
            else:
                found["vanished"] += 1
                why = ("the process never started before the server stopped"
                       if seen.state == "never_started" else "the process vanished while the "
                       "server was down")
                self._report_once_gone(seen.pid, key, AttemptReport(
                    *key, "ended", outcome="lost", detail=why))
        return found

    def _report_once_gone(self, pid: int | None, key: tuple[str, int],
                          ended: AttemptReport) -> None:
        """Report an attempt recovery found ended once nothing of it is left: a straggler
        in its group, or a daemon of it outside (``runner.end_group``)."""
        if pid is not None and (procgroup.left_behind(pid) or procgroup.strays(*key, since=pid)):
            self._spawn_task(self._after_group(pid, key, ended))
        else:
            self._report(ended)

    async def _after_group(self, pgid: int, key: tuple[str, int],
                           ended: AttemptReport) -> None:
        await runner.end_group(pgid, self.grace_seconds, key)
        self._report(ended)

    async def _watch_adopted(self, key: tuple[str, int], pid: int, directory: Path) -> None:
        code = await runner.wait_foreign(pid, directory)
        await runner.end_group(pid, self.grace_seconds, key)
        if code is None:
            self._ended(key, AttemptReport(*key, "ended", outcome="lost",
                                           detail="adopted process ended without an exit code"))
        else:
            self._ended(key, AttemptReport(*key, "ended", exit_code=code))

    async def shutdown(self) -> None:
        """Stop watching; running attempts keep running and are adopted after a restart."""
        if self._standing_by is not None:
            self._standing_by.cancel()
        if self.standby is not None:
            standby, self.standby = self.standby, None
            standby.retire()  # told nothing, it ends at once
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(runner.wait_child(standby.pid), 5)
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
