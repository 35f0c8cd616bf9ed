"""An attempt's output files: capped reads, trimming of old output, deletion with the job.

The job's process writes ``stdout.log`` and ``stderr.log`` itself (opened ``O_APPEND``
by the runner) and must outlive a server restart, so the server never writes to, truncates
or renames them. Instead every reader sees at most the newest ``cap`` bytes of a file,
starting at a line boundary, behind a marker line ``[eventq: N bytes dropped]``; and the disk
space of what no reader can see any more is given back by punching a hole over it
(``fallocate(PUNCH_HOLE)``, which keeps the file's size and offsets). Where the filesystem
cannot punch holes only the reads are capped.

Offsets are always offsets in the file as written, so a follower's position stays valid
while older output is dropped behind it.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import re
import shutil
import threading
import zlib
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

import structlog

from eventq import events as ev
from eventq import runner
from eventq.actors.scheduler_state import SchedulerState
from eventq.log import Record

log = structlog.get_logger()

DEFAULT_CAP = 64 * 2**20
STREAMS = ("stdout", "stderr")
#: How far past the cap's cut a reader looks for the end of the cut line.
LINE_SEARCH = 64 * 1024
#: How often the output of running attempts is trimmed when nobody reads it.
SWEEP_SECONDS = 30.0
_SAFE_JOB_ID = re.compile(r"[A-Za-z0-9_.-]+")

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02


def _load_fallocate() -> Callable[[int, int, int, int], int] | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).fallocate
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_int
    return fn


_fallocate = _load_fallocate()
#: Readers and trimmers of one file take the same lock (striped by path), so that a hole is
#: never punched under bytes a reader has just decided to show.
_LOCKS = tuple(threading.Lock() for _ in range(64))


def _lock(path: Path) -> threading.Lock:
    return _LOCKS[zlib.crc32(str(path).encode()) % len(_LOCKS)]


def log_path(data_dir: Path, job_id: str, attempt: int, stream: str) -> Path:
    return runner.attempt_dir(data_dir, job_id, attempt) / f"{stream}.log"


def marker(dropped: int) -> bytes:
    return f"[eventq: {dropped} bytes dropped]\n".encode()


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Free the disk space of a byte range, keeping the file's size; False if not possible."""
    if _fallocate is None or length <= 0:
        return False
    if _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.EPERM, errno.ENODEV):
        return False
    raise OSError(code, os.strerror(code))


def _keep_start(f: BinaryIO, size: int, cap: int) -> int:
    """Where the visible part of a file of ``size`` bytes begins: the first whole line
    among its newest ``cap`` bytes (or the exact cut, for a line longer than the search)."""
    if size <= cap:
        return 0
    cut = size - cap
    f.seek(cut - 1)
    head = f.read(min(LINE_SEARCH, cap) + 1)
    newline = head.find(b"\n")
    return cut if newline < 0 else cut + newline


@dataclass(frozen=True)
class Chunk:
    """Output read from ``start`` to ``end``; ``dropped`` bytes before it were skipped."""

    dropped: int
    data: bytes
    end: int

    def text(self) -> bytes:
        return (marker(self.dropped) if self.dropped else b"") + self.data


def read_from(path: Path, offset: int, cap: int, limit: int) -> Chunk:
    """At most ``limit`` bytes from ``offset``, skipping what the cap has dropped."""
    with _lock(path):
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed below, under the lock
        except FileNotFoundError:
            return Chunk(0, b"", offset)
        with f:
            size = os.fstat(f.fileno()).st_size
            start = _keep_start(f, size, cap)
            dropped = max(0, start - offset)
            offset = max(offset, start)
            f.seek(offset)
            data = f.read(max(0, min(limit, size - offset)))
            return Chunk(dropped, data, offset + len(data))


def read_capped(path: Path, cap: int) -> bytes:
    """The whole visible output of one file (marker first when older output was dropped);
    the disk space of the dropped part is freed on the way."""
    chunk = read_from(path, 0, cap, cap)
    trim(path, cap)
    return chunk.text()


def trim(path: Path, cap: int) -> int:
    """Punch a hole over whole blocks older than the newest ``cap`` bytes; the end of the
    hole (0 when nothing could be freed)."""
    with _lock(path):
        try:
            fd = os.open(path, os.O_WRONLY)
        except (FileNotFoundError, PermissionError):
            return 0
        try:
            st = os.fstat(fd)
            block = st.st_blksize or 4096
            end = max(0, (st.st_size - cap) // block * block)
            return end if end and punch_hole(fd, 0, end) else 0
        finally:
            os.close(fd)


def delete_job(data_dir: Path, job_id: str) -> None:
    """Remove every attempt directory of a purged job."""
    if not _SAFE_JOB_ID.fullmatch(job_id) or job_id in (".", ".."):
        log.warning("job_files_kept", job_id=job_id, why="not a plain name")
        return
    shutil.rmtree(data_dir / "jobs" / job_id, ignore_errors=True)


@dataclass
class AttemptLogs:
    """Keeps the attempts' output bounded and removes it with its job.

    Acts on durable events only: a purged job's files go once ``JobsPurged`` is on disk,
    an ended attempt's output is trimmed once, and running attempts are trimmed now and
    then even when nobody reads them. File work runs in threads, off the event loop.
    """

    DURABLE_READS: ClassVar[frozenset[type]] = frozenset({ev.JobsPurged, ev.AttemptEnded})

    data_dir: Path
    state: SchedulerState
    cap: Callable[[], int]
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    _sweeper: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_loop())

    def on_durable(self, records: Sequence[Record]) -> None:
        for record in records:
            e = record.event
            if isinstance(e, ev.JobsPurged):
                for job_id in e.job_ids:
                    self._in_thread(delete_job, self.data_dir, job_id)
            elif isinstance(e, ev.AttemptEnded):
                self._in_thread(self._trim_attempts, [(e.job_id, e.attempt)])

    def _in_thread(self, fn: Callable[..., Any], *args: Any) -> None:
        self._spawn(asyncio.to_thread(fn, *args))

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("log_files_failed", error=repr(task.exception()))

    def _trim_attempts(self, attempts: Iterable[tuple[str, int]]) -> None:
        cap = self.cap()
        for job_id, attempt in attempts:
            for stream in STREAMS:
                trim(log_path(self.data_dir, job_id, attempt, stream), cap)

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_SECONDS)
            running = [(j.spec.job_id, j.attempt) for j in self.state.with_status(
                "dispatched", "running") if j.node == "local"]
            await asyncio.to_thread(self._trim_attempts, running)

    async def stop(self) -> None:
        """Stop sweeping; let deletions already decided finish."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        await asyncio.gather(*self.tasks, return_exceptions=True)
