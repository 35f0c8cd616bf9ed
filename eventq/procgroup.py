"""Whether anything of an attempt's process group still runs (standard library only).

``kill(-pgid, 0)`` is not enough: it also counts zombies, which hold no GPU and which an
init that reaps slowly (a container's, a VM's) may leave for a second or more.
"""

from __future__ import annotations

import os


def alive(pgid: int, *besides: int) -> bool:
    """Is a process that is not a zombie (and not this one, nor ``besides``) in the group?"""
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    skip = {os.getpid(), *besides}
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in skip:
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[-1].split()
        except OSError:
            continue
        if fields[0] != b"Z" and int(fields[2]) == pgid:
            return True
    return False


def left_behind(pgid: int) -> bool:
    """After its leader (an attempt's wrapper) ended: does anything of its group still run?

    While a group has members its number is not given to a new process, so a live process
    with that number means the group is gone and the number was reused: not ours."""
    try:
        with open(f"/proc/{pgid}/stat", "rb") as stat:
            leader_state = stat.read().rsplit(b")", 1)[-1].split()[0]
    except (OSError, IndexError):
        leader_state = b"Z"
    return leader_state == b"Z" and alive(pgid)


def strays(job_id: str, attempt: int) -> list[int]:
    """Live processes of the attempt, found by the variables every one of them inherits
    (``EVENTQ_JOB_ID``, ``EVENTQ_ATTEMPT``; ``runner.job_env`` sets them last, over any the
    submitter exported): what left the attempt's process group (a daemon the job forked
    calls ``setsid``) is still among them, and still holds the attempt's GPUs.

    A process's environment reads only where this one may signal it (the same user, or
    root), and a zombie's reads empty: it holds nothing and is not counted. Costs a read
    of each process's environment (~4 µs each on the machine of docs/performance.md)."""
    marks = (f"\0EVENTQ_JOB_ID={job_id}\0".encode(), f"\0EVENTQ_ATTEMPT={attempt}\0".encode())
    me, found = os.getpid(), []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as environ:
                env = b"\0" + environ.read()
        except OSError:
            continue
        if all(mark in env for mark in marks):
            found.append(int(name))
    return found
