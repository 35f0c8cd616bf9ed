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
import contextlib
import json
import os
import re
import shlex
import signal
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from eventq import procgroup
from eventq.events import JobSpec

#: The wrapper's lines once it knows ``d`` (the attempt's directory) and ``c`` (its working
#: directory), and ``"$@"`` is the job's command: the claim, then the job, then its code.
_CLAIM = """\
set -C
{ : > "$d/claim"; } 2>/dev/null || exit 99
set +C
echo $$ > "$d/pid"
trap ':' TERM INT HUP
"""
_RUN = """\
if cd "$c"; then "$@"; else false; fi
rc=$?
echo $rc > "$d/exit"
exit $rc
"""
WRAPPER = ('d=$1; c=$2; w=$3; shift 3\n' + _CLAIM
           + 'if [ -n "$w" ]; then { echo "$$ $d" >&3; } 2>/dev/null || exit 98; exec 3>&-; fi\n'
           + _RUN)
#: The same wrapper started before its attempt is known (``Standby``). Its pipe brings the
#: attempt as shell lines the server writes whole, then closes: ``d``, ``c``, the job's
#: variables, its command as ``set --``, and ``EVENTQ_HANDED=1`` last. The server's end
#: closed before that line (it stopped, or it wrote part of the lines and died) runs
#: nothing, whatever the standby's own environment holds; the job never sees the name.
STANDBY = ('EVENTQ_HANDED=\n. /dev/stdin\n[ "$EVENTQ_HANDED" = 1 ] || exit 0\n'
           'unset EVENTQ_HANDED\n'
           'exec </dev/null >>"$d/stdout.log" 2>>"$d/stderr.log"\n' + _CLAIM + _RUN)
#: Its last argument, by which ``is_ours`` knows it (its command line has no directory).
STANDBY_NAME = "eventq-standby"

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
    env = job_env(spec, attempt, gpus, directory, base_env)
    if "OPTIND" in env:  # the shell sets its own, and refuses to start on one not a number
        env["OPTIND"] = "1"
    return os.posix_spawn(
        "/bin/sh",
        ["sh", "-c", WRAPPER, "eventq-attempt", str(directory), spec.cwd or str(directory),
         "" if watch is None else "3", *argv], env, file_actions=actions, setsid=True)


#: Variables dash sets for itself as it starts, whatever its environment says: a job's
#: value for one of them is exported as the standby's shell has it, as a spawned wrapper's
#: shell would.
_SHELL_OWN = frozenset({"IFS", "OPTIND", "PPID"})


#: A name a shell can hold; dash drops the others from the environment it passes on.
_SHELL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def handoff(spec: JobSpec, attempt: int, gpus: list[int], directory: Path,
            trainer: tuple[str, ...]) -> bytes:
    """The lines ``STANDBY`` reads for this attempt: what ``spawn`` gives its wrapper as
    environment (beyond the base one the standby has already) and as arguments. The
    variables come first: the wrapper's own ``d``, ``c`` and ``w`` are set after them, as
    ``WRAPPER`` sets them after the shell has read its environment."""
    lines = []
    for name, value in job_env(spec, attempt, gpus, directory, base={}).items():
        if name in _SHELL_OWN:
            lines.append(f"export {name}")
        elif _SHELL_NAME.fullmatch(name) and name != "EVENTQ_HANDED":
            lines.append(f"export {name}={shlex.quote(value)}")
    argv = job_argv(spec, directory, trainer)
    lines += [f"d={shlex.quote(str(directory))}", f"c={shlex.quote(spec.cwd or str(directory))}",
              "w=", "set -- " + " ".join(map(shlex.quote, argv)), "EVENTQ_HANDED=1", ""]
    return os.fsencode("\n".join(lines))


class Standby:
    """A wrapper started between attempts, idle on its pipe until ``hand`` gives it one.

    Why: on a busy machine a process created at the moment of a start waits for a CPU
    before it runs at all. ``spawn`` creates two in a row (the wrapper, then the job), and
    ``posix_spawn`` holds the server's loop (and the GIL) until the first has run. A
    standby wakes as any sleeper does, and the job's own process is the only one created
    on the path: beside two busy processes, from the call to the job's start, p50 16.5 ms
    spawned against 2.5 ms handed (``tools/bench_start.py``; ``docs/performance.md`` 31).
    """

    def __init__(self) -> None:
        read, self._pipe = os.pipe()
        try:
            self.pid = os.posix_spawn(
                "/bin/sh", ["sh", "-c", STANDBY, STANDBY_NAME], os.environ, file_actions=[
                    (os.POSIX_SPAWN_DUP2, read, 0),
                    (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
                    (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0)], setsid=True)
        except BaseException:
            os.close(self._pipe)
            raise
        finally:
            os.close(read)
        os.set_blocking(self._pipe, False)

    def hand(self, spec: JobSpec, attempt: int, gpus: list[int], directory: Path,
             trainer: tuple[str, ...] = DEFAULT_TRAINER) -> bool:
        """Give the standby this attempt, which it then runs as ``spawn``'s wrapper would
        (its pid is ``self.pid``). False if it cannot take it (it has gone, the lines do not
        fit its pipe at once, or the attempt's directory cannot be made, which ``spawn``
        then says): it then runs nothing, and ends."""
        try:
            directory.mkdir(parents=True, exist_ok=True)
            lines = handoff(spec, attempt, gpus, directory, trainer)
            return os.write(self._pipe, lines) == len(lines)  # a part lacks the last line
        except (OSError, ValueError):
            return False
        finally:
            self.retire()

    def retire(self) -> None:
        """Close its pipe: told nothing, it ends (its caller still reaps ``pid``)."""
        if self._pipe >= 0:
            os.close(self._pipe)
            self._pipe = -1


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


async def end_group(pgid: int, grace: float, attempt: tuple[str, int] | None = None) -> None:
    """After the wrapper: stop what the job left and wait until it is gone.

    An attempt ends only when nothing of it is left to hold its GPUs, so the next attempt
    there never starts beside a straggler (a child that outlived ``sh -c``, a daemon the
    job forked): SIGTERM at once, SIGKILL after the grace, as Slurm does at a job's end.
    What it left is its process group and, given ``attempt`` (job id, number), every
    process that carries its variables: a daemon leaves the group with ``setsid``.
    """
    def left() -> list[int]:
        return procgroup.strays(*attempt, since=pgid) if attempt is not None else []

    grouped, strays = procgroup.left_behind(pgid), left()
    if not grouped and not strays:
        return
    if not _signal_all(pgid if grouped else None, strays, signal.SIGTERM):
        return
    loop = asyncio.get_running_loop()
    kill_at: float | None = loop.time() + grace
    while True:
        grouped, strays = procgroup.left_behind(pgid), left()
        if not grouped and not strays:
            return
        if kill_at is not None and loop.time() >= kill_at:
            _signal_all(pgid if grouped else None, strays, signal.SIGKILL)
            kill_at = None
        await asyncio.sleep(GROUP_POLL)


def _signal_all(pgid: int | None, pids: list[int], sig: signal.Signals) -> bool:
    """The group (if given) and each of ``pids``; False if none of them was left."""
    sent = pgid is not None and signal_group(pgid, sig)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)
            sent = True
    return sent


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
    """Is ``pid`` alive and still our wrapper for this directory (not a reused pid)? A
    spawned wrapper names the directory in its command line; a ``Standby``'s names none,
    and is known by its standard output, which it points at the directory's log before
    it claims."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        stat = Path(f"/proc/{pid}/stat").read_text()
        mine = str(directory).encode() in args or (
            STANDBY_NAME.encode() in args
            and os.readlink(f"/proc/{pid}/fd/1") == str(directory / "stdout.log"))
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return False
    zombie = stat.rsplit(")", 1)[-1].split()[0] == "Z"
    return mine and not zombie


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
