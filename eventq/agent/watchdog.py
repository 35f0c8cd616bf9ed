"""Stops a remote attempt when its worker's lease lapses, whatever became of the agent.

The promise it keeps (SPEC 6, docs/architecture.md "Leases"): a remote attempt runs only
while its worker holds a lease, so that the orchestrator, which requeues a lost worker's
attempts only after ``lease + grace + margin``, never starts a successor beside it.

The attempt's wrapper (``eventq.runner``) starts this in the attempt's own process group,
before the job, as ``python -I -m eventq.agent.watchdog WRAPPER_PID DIR LEASE_FILE``. The
agent renews the lease file (``deadline grace``, the deadline on CLOCK_BOOTTIME, which
goes on while the machine sleeps) each time the orchestrator answers it. The watchdog
sleeps until the deadline it last read and reads it again; once the deadline has passed
it marks the attempt ``fenced``, sends SIGTERM to the group, and SIGKILL after the grace.
It depends on nothing the agent does after the attempt starts: a killed or frozen agent
simply stops renewing. A missing or unreadable lease file counts as lapsed.

Only the standard library is used: it starts in a few tens of milliseconds beside the job.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from pathlib import Path

from eventq.procgroup import alive as group_alive

#: Written in the attempt's directory before the first signal: the agent reports the end
#: of a fenced attempt as lost, not as the job's own exit.
FENCED_FILE = "fenced"
#: The longest sleep between two reads of the lease file.
MAX_SLEEP = 5.0
POLL = 0.05


def now() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def read_lease(path: Path) -> tuple[float, float]:
    """(deadline, grace) from the lease file; a lapsed lease if it cannot be read."""
    try:
        deadline, grace = path.read_text().split()
        return float(deadline), float(grace)
    except (OSError, ValueError):
        return 0.0, 1.0


def watching(wrapper: int) -> bool:
    """The wrapper is our parent while it lives; after it, whatever is left of its group."""
    return os.getppid() == wrapper or group_alive(wrapper)


def fence(wrapper: int, directory: Path, grace: float) -> None:
    """SIGTERM to the attempt's group, SIGKILL after the grace (this process included)."""
    with contextlib.suppress(OSError):  # the stop matters more than the note
        (directory / FENCED_FILE).write_text(f"{time.time():.3f}\n")
    try:
        os.killpg(wrapper, signal.SIGTERM)
    except ProcessLookupError:
        return
    end = now() + grace
    while now() < end and watching(wrapper):
        time.sleep(POLL)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(wrapper, signal.SIGKILL)


def watch(wrapper: int, directory: Path, lease: Path) -> None:
    """Until nothing of the attempt is left: fence it once the lease has lapsed.

    SIGUSR1 is the wrapper's word that the job's own process ended; whatever the job left
    in its group is still the attempt's, and still watched."""
    ended = False
    while watching(wrapper):
        deadline, grace = read_lease(lease)
        left = deadline - now()
        if left <= 0:
            fence(wrapper, directory, grace)
            return
        if ended and not group_alive(wrapper, wrapper):
            return  # the wrapper is leaving and nothing else is: the agent need not wait
        sleep = POLL if ended else min(left, MAX_SLEEP)
        ended = signal.sigtimedwait([signal.SIGUSR1], sleep) is not None or ended


def main(argv: list[str]) -> int:
    wrapper, directory, lease = int(argv[1]), Path(argv[2]), Path(argv[3])
    # The group's SIGTERM is for the job: this process does the stopping, so it stays.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1])  # taken by sigtimedwait
    watch(wrapper, directory, lease)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
