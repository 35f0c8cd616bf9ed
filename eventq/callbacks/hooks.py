"""``eventq server --on-finish CMD``: a local script run when a job ends.

It never holds the queue or the event loop: each run is its own process (``sh -c CMD`` in
its own session, started with ``posix_spawn`` as attempts are), awaited through a pidfd,
ended with its whole group after a timeout, and at most ``AT_ONCE`` run together. Its
outcome is logged and recorded (``HookRan``). A hook is run once, after the job's end is
durable; one the server stopped is not run again (``--notify-url`` is the delivery that
survives restarts).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import tempfile
from dataclasses import dataclass, field
from typing import IO

import structlog

from eventq import events as ev
from eventq import runner
from eventq.callbacks.owed import Ending, iso
from eventq.log import EventLog

log = structlog.get_logger()

#: Hooks running at once; more wait their turn.
AT_ONCE = 4
#: Seconds between SIGTERM and SIGKILL to a hook that ran out of time.
GRACE = 2.0
#: Bytes of a hook's output kept for the server's log.
TAIL_BYTES = 2_000


def hook_env(ending: Ending) -> dict[str, str]:
    """The server's environment and the job's facts: never the job's own environment."""
    facts = {
        "EVENTQ_JOB_ID": ending.job_id, "EVENTQ_JOB_NAME": ending.name,
        "EVENTQ_USER": ending.user, "EVENTQ_TEAM": ending.team or "",
        "EVENTQ_STATUS": ending.status,
        "EVENTQ_EXIT_CODE": "" if ending.exit_code is None else str(ending.exit_code),
        "EVENTQ_ATTEMPT": str(ending.attempt), "EVENTQ_REASON": ending.reason or "",
        "EVENTQ_NODE": ending.node or "", "EVENTQ_SUBMITTED_AT": iso(ending.submitted_at) or "",
        "EVENTQ_STARTED_AT": iso(ending.started_at) or "", "EVENTQ_ENDED_AT":
        iso(ending.ended_at) or ""}
    return {**os.environ, **{k: v.replace("\0", "") for k, v in facts.items()}}


def spawn(command: str, env: dict[str, str], out: IO[bytes]) -> int:
    """``sh -c command`` in a new session, its output to ``out``; its pid."""
    return os.posix_spawn(
        "/bin/sh", ["sh", "-c", command], env,
        file_actions=[(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                      (os.POSIX_SPAWN_DUP2, out.fileno(), 1),
                      (os.POSIX_SPAWN_DUP2, out.fileno(), 2)],
        setsid=True)


def _tail(out: IO[bytes]) -> str:
    out.seek(max(0, out.seek(0, os.SEEK_END) - TAIL_BYTES))
    return out.read().decode(errors="replace").strip()


@dataclass
class Hooks:
    """Runs the hook for each ending it is given, in the background."""

    command: str
    timeout: float
    log: EventLog
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _turns: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(AT_ONCE))

    def run_for(self, ending: Ending) -> None:
        task = asyncio.get_running_loop().create_task(self._run(ending))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _run(self, ending: Ending) -> None:
        async with self._turns:
            with tempfile.TemporaryFile() as out:
                try:
                    pid = spawn(self.command, hook_env(ending), out)
                except OSError as exc:
                    self._record(ending, "start_failed", None, f"could not start: {exc}", "")
                    return
                outcome, code = await self._wait(pid)
                self._record(ending, outcome, code, _detail(outcome, code, self.timeout),
                             _tail(out))

    async def _wait(self, pid: int) -> tuple[ev.HookOutcome, int | None]:
        """Its exit code; past the timeout, or when the server stops, its whole group is
        ended (SIGTERM, SIGKILL after a grace), what it started in the background too."""
        outcome: ev.HookOutcome = "exited"
        try:
            async with asyncio.timeout(self.timeout):
                return outcome, await runner.wait_child(pid)
        except TimeoutError:
            outcome = "timeout"
        except asyncio.CancelledError:
            outcome = "stopped"
        runner.signal_group(pid, signal.SIGTERM)
        try:
            async with asyncio.timeout(GRACE):
                code = await runner.wait_child(pid)
        except TimeoutError:
            runner.signal_group(pid, signal.SIGKILL)
            code = await runner.wait_child(pid)
        await runner.end_group(pid, GRACE)
        return outcome, code

    def _record(self, ending: Ending, outcome: ev.HookOutcome, code: int | None, detail: str,
                output: str) -> None:
        ok = outcome == "exited" and code == 0
        (log.info if ok else log.warning)(
            "hook_ran" if ok else "hook_failed", job_id=ending.job_id, status=ending.status,
            outcome=outcome, exit_code=code, detail=detail, output=output or None)
        with contextlib.suppress(RuntimeError):  # the log closed under a stopping server
            self.log.append("system", [ev.HookRan(
                job_id=ending.job_id, ending=ending.ending, outcome=outcome, exit_code=code,
                detail=detail)])

    async def stop(self) -> None:
        """End running hooks (recorded as stopped); hooks not yet started never run."""
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


def _detail(outcome: str, code: int | None, timeout: float) -> str:
    if outcome == "timeout":
        return f"still running after {timeout:g} s: stopped"
    if outcome == "stopped":
        return "the server stopped before it ended"
    return f"exit code {code}"
