"""Runs one attempt as a subprocess in its own process group and its own directory.

Starting a process cannot be written ahead in the log, so the attempt directory
is the process's own durable record. A tiny ``sh`` wrapper of shell builtins only
(no extra process before the job's own) first claims the directory (creating
``claim`` with noclobber, i.e. O_EXCL: atomic), writes its pid, runs the job, and
writes the exit code. Recovery claims the same directory: if recovery wins, the process never
started and never will; if the wrapper won, its pid and exit files say what
became of it. Either way an attempt runs at most once.

A remote attempt may run only while its worker holds a lease (SPEC 6): its wrapper is
given the pipe of its worker's watchdog (``eventq.agent.watchdog``) as fd 3 and, before the
job, tells it its process group and directory; a wrapper that cannot (the watchdog has
gone) runs nothing. The watchdog stops the group once the lease lapses, whether or not the
agent that renews it is alive.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from eventq import procgroup
from eventq.events import JobSpec

WRAPPER = """\
d=$1; c=$2; w=$3; shift 3
set -C
{ : > "$d/claim"; } 2>/dev/null || exit 99
set +C
echo $$ > "$d/pid"
trap ':' TERM INT HUP
if [ -n "$w" ]; then { echo "$$ $d" >&3; } 2>/dev/null || exit 98; exec 3>&-; fi
if cd "$c"; then "$@"; else false; fi
rc=$?
echo $rc > "$d/exit"
exit $rc
"""

#: Exit code of a wrapper that found its directory already claimed.
CLAIMED = 99
#: Exit code of a wrapper that found no watchdog to tell (it ran nothing; without a
#: SIGPIPE ignored it dies of that signal instead).
UNWATCHED = 98
DEFAULT_TRAINER = ("python", "-m", "simpletuner.train")


def attempt_dir(data_dir: Path, job_id: str, attempt: int) -> Path:
    return data_dir / "jobs" / job_id / str(attempt)


def job_argv(spec: JobSpec, directory: Path, trainer: tuple[str, ...]) -> list[str]:
    """The command to run: a list as is, a string through ``sh -c``, a config via the trainer."""
    if spec.config is not None:
        (directory / "config.json").write_text(json.dumps(spec.config))  # CONFIG_PATH
        if not spec.command:
            return list(trainer)
    if isinstance(spec.command, str):
        return ["sh", "-c", spec.command]
    return list(spec.command)


def job_env(spec: JobSpec, attempt: int, gpus: list[int], directory: Path,
            base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The job's environment: ``base`` (this process's own by default), the job's, and
    eventq's variables."""
    env = {**(os.environ if base is None else base), **spec.env}
    env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in gpus)
    env["EVENTQ_JOB_ID"], env["EVENTQ_ATTEMPT"] = spec.job_id, str(attempt)
    if spec.config is not None:
        env["CONFIG_PATH"] = str(directory / "config.json")
    return env


def spawn(spec: JobSpec, attempt: int, gpus: list[int], directory: Path,
          trainer: tuple[str, ...] = DEFAULT_TRAINER, watch: int | None = None,
          base_env: Mapping[str, str] | None = None) -> int:
    """Start the attempt in a new session (its own process group); its pid.

    With ``watch`` (the write end of the worker's watchdog pipe), the watchdog stops the
    attempt once the worker's lease lapses. ``base_env``: the environment jobs start from,
    where the caller keeps a copy (``os.environ`` decodes every variable at each read: a
    third of a millisecond a job). ``posix_spawn``, not an asyncio transport:
    closing the event loop must not kill a running job (a restarted server adopts it
    instead), and spawning this way avoids copying the server's memory on the dispatch
    path.
    """
    directory.mkdir(parents=True, exist_ok=True)
    argv = job_argv(spec, directory, trainer)
    append = os.O_WRONLY | os.O_CREAT | os.O_APPEND
    actions: list[tuple[int, ...] | tuple[int, int, str, int, int]] = [
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, str(directory / "stdout.log"), append, 0o644),
        (os.POSIX_SPAWN_OPEN, 2, str(directory / "stderr.log"), append, 0o644)]
    if watch is not None:
        actions.append((os.POSIX_SPAWN_DUP2, watch, 3))
    return os.posix_spawn(
        "/bin/sh",
        ["sh", "-c", WRAPPER, "eventq-attempt", str(directory), spec.cwd or str(directory),
         "" if watch is None else "3", *argv],
        job_env(spec, attempt, gpus, directory, base_env), file_actions=actions, setsid=True)


async def wait_child(pid: int) -> int:
    """Wait for our own child without blocking the loop; its exit code (-N for signal N)."""
    await _pidfd_ready(pid)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


async def _pidfd_ready(pid: int) -> None:
    """Return once ``pid`` has exited (a pidfd becomes readable)."""
    loop = asyncio.get_running_loop()
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    done: asyncio.Future[None] = loop.create_future()
    loop.add_reader(fd, _settle, done)
    try:
        await done
    finally:
        loop.remove_reader(fd)
        os.close(fd)


def _settle(done: asyncio.Future[None]) -> None:
    if not done.done():
        done.set_result(None)


#: Seconds between two looks at whether an ended attempt's group is empty.
GROUP_POLL = 0.02


async def end_group(pgid: int, grace: float) -> None:
    """After the wrapper: stop what the job left in its group and wait until it is gone.

    An attempt ends only when nothing of it is left to hold its GPUs, so the next attempt
    there never starts beside a straggler (a child that outlived ``sh -c``, a daemon the
    job forked): SIGTERM at once, SIGKILL after the grace, as Slurm does at a job's end.
    """
    if not procgroup.left_behind(pgid) or not signal_group(pgid, signal.SIGTERM):
        return
    loop = asyncio.get_running_loop()
    kill_at: float | None = loop.time() + grace
    while procgroup.left_behind(pgid):
        if kill_at is not None and loop.time() >= kill_at:
            signal_group(pgid, signal.SIGKILL)
            kill_at = None
        await asyncio.sleep(GROUP_POLL)


def signal_group(pgid: int, sig: signal.Signals) -> bool:
    """Signal the attempt's whole process group; False if nothing is left in it."""
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


@dataclass(frozen=True)
class Found:
    """What an attempt directory says about its process after a restart."""

    state: str  # "never_started" | "alive" | "exited" | "vanished"
    pid: int | None = None
    exit_code: int | None = None


def read_exit(directory: Path) -> int | None:
    try:
        return int((directory / "exit").read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def is_ours(pid: int, directory: Path) -> bool:
    """Is ``pid`` alive and still our wrapper for this directory (not a reused pid)?"""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return False
    zombie = stat.rsplit(")", 1)[-1].split()[0] == "Z"
    return not zombie and str(directory).encode() in cmdline.split(b"\0")


async def inspect(directory: Path) -> Found:
    """Claim the directory or read what its wrapper left (see module docstring).

    Liveness is looked at before the exit file: the wrapper writes ``exit`` before it
    ends, so a wrapper found gone has left its exit code for the look that follows. The
    other order would miss a wrapper that writes its code and ends between the two looks,
    and judge a finished attempt vanished, to be run again.
    """
    directory.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(directory / "claim", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        return Found("never_started")
    except FileExistsError:
        pass
    pid = None
    for _ in range(50):  # the wrapper writes its pid right after claiming
        try:
            pid = int((directory / "pid").read_text().strip())
            break
        except (FileNotFoundError, ValueError):
            await asyncio.sleep(0.02)
    if pid is not None and is_ours(pid, directory):
        return Found("alive", pid)
    code = read_exit(directory)
    if code is not None:
        return Found("exited", pid, code)
    return Found("vanished", pid)


async def wait_foreign(pid: int, directory: Path) -> int | None:
    """Wait for a process that is not our child (adopted after a restart); its exit code."""
    await _pidfd_ready(pid)
    return read_exit(directory)
