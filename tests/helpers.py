"""Helpers the tests share."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import AnyStr

import pytest

#: Prefix of a command that runs with SIGINT and SIGTERM at their defaults, whatever this
#: test run inherited: an ignored signal stays ignored across exec (a background CI step
#: runs with SIGINT ignored), and Python then never raises KeyboardInterrupt.
DEFAULT_SIGNALS = [sys.executable, "-c",
                   "import os, signal, sys\n"
                   "for s in (signal.SIGINT, signal.SIGTERM): signal.signal(s, signal.SIG_DFL)\n"
                   "os.execvp(sys.argv[1], sys.argv[1:])"]


def stop(proc: subprocess.Popen[AnyStr], sig: int = signal.SIGTERM,
         timeout: float = 10.0) -> tuple[AnyStr | None, AnyStr | None]:
    """Send ``sig`` and collect the output (its pipes closed, it reaped). One that does not
    end in time is killed, and the test fails saying so."""
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError(f"{proc.args!r} did not end within {timeout}s of "
                             f"{signal.Signals(sig).name}") from None


async def until(check: Callable[[], bool], what: str = "the condition",
                seconds: float = 10.0) -> None:
    """Wait, polling every 10 ms, until ``check()`` holds; fail after ``seconds``."""
    for _ in range(int(seconds / 0.01)):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never happened: {what}")


def mount(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["mount", *args], capture_output=True, text=True, check=False)


@contextmanager
def tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` at ``where`` for the block (skips the test if none can be had)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (as CI runs): a read-only or full disk "
                    "cannot be made otherwise for a process that owns its files")
    if shutil.which("mount") is None:
        pytest.skip("no mount command on this machine")
    where.mkdir()
    done = mount("-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where))
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, check=False)


def fill(where: Path) -> None:
    """Write into ``where`` until its file system has no room left."""
    with (where / "filler").open("wb", buffering=0) as out, pytest.raises(OSError):
        while True:
            out.write(b"\0" * 4096)
