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


def strays(job_id: str, attempt: int, since: int | None = None) -> list[int]:
    """Live processes of the attempt, found by the variables every one of them inherits
    (``EVENTQ_JOB_ID``, ``EVENTQ_ATTEMPT``; ``runner.job_env`` sets them last, over any the
    submitter exported): what left the attempt's process group (a daemon the job forked
    calls ``setsid``) is still among them, and still holds the attempt's GPUs.

    A process's environment reads only where this one may signal it (the same user, or
    root), and a zombie's reads empty: it holds nothing and is not counted. Each read costs
    ~4 µs (the kernel maps the process's memory), ~0.3 ms for the 72 processes of the
    machine of docs/performance.md, at every attempt's end; so with ``since`` (the pid of
    the attempt's wrapper) only pids from it on are read, as pids grow. While the last pid
    given is below ``since`` they have wrapped around, and every process is read; one
    started after a whole turn of them (``pid_max`` starts within the attempt) with a pid
    below ``since`` is missed."""
    marks = (f"\0EVENTQ_JOB_ID={job_id}\0".encode(), f"\0EVENTQ_ATTEMPT={attempt}\0".encode())
    newer = since if since is not None and since <= _last_pid() else 0
    me, found = os.getpid(), []
    for name in os.listdir("/proc"):
        if not name.isdigit() or (pid := int(name)) < newer or pid == me:
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as environ:
                env = b"\0" + environ.read()
        except OSError:
            continue
        if all(mark in env for mark in marks):
            found.append(pid)
    return found


def _last_pid() -> int:
    """The pid given last in this pid namespace; 0 where that cannot be read."""
    try:
        with open("/proc/sys/kernel/ns_last_pid", "rb") as last:
            return int(last.read())
    except (OSError, ValueError):
        return 0
