"""One process per data directory: an exclusive ``flock`` that dies with its holder."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO


class Held(Exception):
    """Another process holds the lock; ``holder`` is its pid as it wrote it."""

    def __init__(self, holder: str) -> None:
        super().__init__(f"held by pid {holder}")
        self.holder = holder


def take(path: Path) -> IO[str]:
    """Lock ``path`` (created if needed) and write our pid in it; keep the handle open.

    The lock is released when the process dies, however it dies, so a restart after a
    ``kill -9`` never finds it stale. The handle is not inherited by children.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")  # noqa: SIM115 - held for the holder's life
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise Held(holder) from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle
