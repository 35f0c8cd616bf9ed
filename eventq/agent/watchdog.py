"""Stops a worker's remote attempts when its lease lapses, whatever became of the agent.

The promise it keeps (SPEC 6, docs/architecture.md "Leases"): a remote attempt runs only
while its worker holds a lease, so that the orchestrator, which requeues a lost worker's
attempts only after ``lease + grace + margin``, never starts a successor beside it.

One watchdog per agent, not one per attempt: the agent starts it (``Watchdog``) as
``python -I -m eventq.agent.watchdog LEASE_FILE`` in a session of its own, so that nothing
aimed at the agent or an attempt's group reaches it, with its stdin the read end of a pipe
whose write end the agent keeps. Every attempt's wrapper (``eventq.runner``) is given that
write end and, before the job runs, writes on it one line, ``PGID DIRECTORY`` (shorter than
PIPE_BUF, so written whole), then closes it. A wrapper that cannot write (no watchdog reads
the pipe any more) runs nothing. So every attempt that runs is known to a live watchdog,
whatever the agent does after starting it: a killed or frozen agent simply stops renewing.

The agent renews the lease file (``deadline grace``, the deadline on CLOCK_BOOTTIME, which
goes on while the machine sleeps) each time the orchestrator answers it. The watchdog
sleeps until the deadline it last read, a new line on the pipe, or ``MAX_SLEEP``, and reads
the lease again; once the deadline has passed it marks each attempt ``fenced``, sends
SIGTERM to its group and SIGKILL after the grace, and goes on so with every attempt
announced while the lease stays lapsed. A missing or unreadable lease file counts as
lapsed. The pipe's end (the agent and every wrapper have closed it: the agent has ended)
leaves it watching what remains; it leaves once nothing it was told of is left.

Groups are forgotten within ``MAX_SLEEP`` of their end, long before the kernel could give
their number to another session (pids are handed out in turn), so a fence never reaches a
stranger. Only the standard library is used.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import signal
import sys
import time
from pathlib import Path

#: Written in the attempt's directory before the first signal: the agent reports the end
#: of a fenced attempt as lost, not as the job's own exit.
FENCED_FILE = "fenced"
#: The longest sleep between two reads of the lease file and two looks at the groups.
MAX_SLEEP = 1.0
#: How often it looks while fencing.
POLL = 0.05
#: Where its own complaints go, in the agent's data directory.
LOG_FILE = "watchdog.log"
#: Reads of the lease file at most, until two in a row agree.
READS_TO_AGREE = 5


def now() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def read_lease(path: Path) -> tuple[float, float]:
    """(deadline, grace) from the lease file; a lapsed lease if it cannot be read.

    The agent writes the file in place (``Lease._write``), and a read that meets a write
    half done could take a wrong deadline for a lapsed one: the file is read until two
    reads in a row agree."""
    try:
        text = path.read_bytes()
        for _ in range(READS_TO_AGREE):
            again = path.read_bytes()
            if again == text:
                break
            text = again
        deadline, grace = text.split()
        return float(deadline), float(grace)
    except (OSError, ValueError):
        return 0.0, 1.0


def group_left(pgid: int) -> bool:
    """Is anything (a zombie leader included) left in the group?"""
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:  # not ours: whoever it is, it is not an attempt of ours
        return False


class Watch:
    """The groups announced on the pipe and the fences under way; all of its decisions."""

    def __init__(self, lease: Path) -> None:
        self.lease = lease
        self.groups: dict[int, Path] = {}
        #: Fenced groups and when they get SIGKILL (CLOCK_BOOTTIME).
        self.kill_at: dict[int, float] = {}
        self.partial = b""

    def heard(self, data: bytes) -> None:
        """Lines ``PGID DIRECTORY`` from wrappers (and from the agent, for adopted ones)."""
        *lines, self.partial = (self.partial + data).split(b"\n")
        for line in lines:
            pgid, _, directory = line.partition(b" ")
            with contextlib.suppress(ValueError):
                self.groups[int(pgid)] = Path(os.fsdecode(directory))

    def look(self) -> float:
        """Forget ended groups, fence or kill what is due; seconds until the next look."""
        for pgid in [p for p in self.groups if not group_left(p)]:
            del self.groups[pgid]
            self.kill_at.pop(pgid, None)
        deadline, grace = read_lease(self.lease)
        moment = now()
        if deadline <= moment:
            for pgid in [p for p in self.groups if p not in self.kill_at]:
                self.fence(pgid, moment + grace)
        for pgid, due in self.kill_at.items():
            if due <= moment:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pgid, signal.SIGKILL)
        if self.kill_at or deadline <= moment:
            return POLL
        return max(0.0, min(deadline - moment, MAX_SLEEP))

    def fence(self, pgid: int, kill_at: float) -> None:
        with contextlib.suppress(OSError):  # the stop matters more than the note
            (self.groups[pgid] / FENCED_FILE).write_text(f"{time.time():.3f}\n")
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGTERM)
        self.kill_at[pgid] = kill_at


def watch(lease: Path, feed: int) -> None:
    """Until the pipe has ended and nothing announced on it is left."""
    state = Watch(lease)
    listening = True
    while listening or state.groups:
        wait = state.look()
        if not listening:
            time.sleep(wait)
            continue
        ready, _, _ = select.select([feed], [], [], wait)
        if ready:
            data = os.read(feed, 65536)
            state.heard(data)
            listening = bool(data)


def main(argv: list[str]) -> int:
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # only the lease stops it
    watch(Path(argv[1]), 0)
    return 0


class Watchdog:
    """The agent's handle on its watchdog: started when first needed, again if it left."""

    def __init__(self, lease: Path) -> None:
        self.lease = lease
        self.pid: int | None = None
        #: The pipe's write end, kept out of fds 0-9 so a wrapper's fd 3 is always a copy.
        self.feed_fd: int | None = None

    def feed(self) -> int:
        """The write end of a pipe that a live watchdog reads."""
        if self.pid is not None and not self._running():
            self._drop()
        if self.feed_fd is None:
            self._start()
        assert self.feed_fd is not None
        return self.feed_fd

    def announce(self, pgid: int, directory: Path) -> None:
        """An attempt this agent did not start (adopted after a restart) is watched too."""
        with contextlib.suppress(OSError):
            os.write(self.feed(), f"{pgid} {directory}\n".encode())

    def _start(self) -> None:
        read, write = os.pipe()
        try:
            log = self.lease.with_name(LOG_FILE)
            append = os.O_WRONLY | os.O_CREAT | os.O_APPEND
            self.pid = os.posix_spawn(
                sys.executable, [sys.executable, "-I", "-m", "eventq.agent.watchdog",
                                 str(self.lease)], dict(os.environ),
                file_actions=[(os.POSIX_SPAWN_DUP2, read, 0),
                              (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
                              (os.POSIX_SPAWN_OPEN, 2, str(log), append, 0o644)],
                setsid=True)
            self.feed_fd = fcntl.fcntl(write, fcntl.F_DUPFD_CLOEXEC, 10)
        finally:
            os.close(read)
            os.close(write)

    def _running(self) -> bool:
        assert self.pid is not None
        try:
            return os.waitpid(self.pid, os.WNOHANG)[0] == 0
        except ChildProcessError:  # reaped already
            return False

    def _drop(self) -> None:
        if self.feed_fd is not None:
            os.close(self.feed_fd)
        self.feed_fd = self.pid = None

    def close(self) -> None:
        """The agent leaves: the watchdog watches on until its attempts have ended."""
        pid = self.pid
        self._drop()
        if pid is not None:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
