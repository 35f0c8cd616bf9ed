"""Helpers the tests share."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections.abc import Callable
from typing import AnyStr

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
