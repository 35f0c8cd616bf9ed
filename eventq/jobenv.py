"""A job's environment, kept out of the log.

Promises: an environment (API keys among it) never enters the append-only log, and a
submission acknowledged is never without its environment.

What a submission sends for the process — the variables it declares (``env``), and the
submitter's whole environment and working directory (``exported_env``, ``exported_cwd``)
— is written to ``DATA/env/<sha256>`` (mode 0600), and only that SHA-256 enters the log
(``JobSpec.env_sha256``). The file is written before the submission is decided and flushed
(it and its directory) beside the log's commit, not before it; the reply waits for both, so
a ``kill -9`` right after the reply finds it. A crash between the two may leave a recorded
job whose file is missing or torn: its submission was never acknowledged, and its start
fails naming the file (``read`` checks every file against its digest). Each file holds a
random nonce: its digest tells nothing of the values (a short password cannot be guessed
back from it), and no two submissions share a file. A batch writes one file per distinct
environment: 10,000 jobs sent from one shell cost one fsync.

The orchestrator's own node runs a job with all of it; a remote worker gets only what the
job declared, never the submitter's ``PATH`` or a directory of the orchestrator's machine.

A file is removed once no job names it: after a purge is durable, and at start-up for what
a crash left unnamed; never while a submission that wrote it is still being decided.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import os
import re
import secrets
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import msgspec
import structlog

from eventq import events as ev

if TYPE_CHECKING:
    from eventq.actors.scheduler_state import SchedulerState
    from eventq.log import Record

log = structlog.get_logger()

#: The folder of the data directory that holds the environments.
ENV_DIR = "env"
_DIGEST = re.compile(r"[0-9a-f]{64}")


class KeptEnv(msgspec.Struct, frozen=True, omit_defaults=True):
    """One environment file's contents."""

    #: Random: the digest of the file says nothing about the values in it.
    nonce: str
    #: Declared by the job (``--env``, ``--export-env NAME``): every node gets these.
    env: dict[str, str] = {}
    #: The submitter's environment: only the orchestrator's own node uses it.
    exported: dict[str, str] = {}
    #: The submitter's working directory: only the orchestrator's own node uses it.
    cwd: str | None = None


@dataclass(frozen=True)
class Sealed:
    """An environment ready to be written: its file's bytes and their SHA-256."""

    digest: str
    data: bytes


class EnvUnreadable(Exception):
    """A job's environment file is missing or does not match its digest."""


class EnvNotKept(Exception):
    """The environment file could not be written (the disk refused it)."""


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(KeptEnv)


def seal(env: dict[str, str], exported: dict[str, str], cwd: str | None) -> Sealed:
    data = _encoder.encode(KeptEnv(secrets.token_hex(16), env, exported, cwd))
    return Sealed(hashlib.sha256(data).hexdigest(), data)


#: Flushes the folder while the caller's thread flushes the files: as many threads as the
#: loop's default executor, which runs the callers (one would queue the folder flushes of
#: concurrent submissions one behind another).
_FOLDER_SYNC = ThreadPoolExecutor(min(32, (os.cpu_count() or 1) + 4),
                                  thread_name_prefix="eventq-env-folder")


def write(directory: Path, sealed: Collection[Sealed],
          written: Callable[[], None] | None = None) -> None:
    """Write each file under its name, call ``written``, then fsync the files and the
    folder side by side: on disk, named, when it returns.

    No temporary name and rename: nothing reads a file before a job names it, and ``read``
    checks every file against its digest; a file a crash tore is one whose submission was
    never acknowledged, and a job that names it fails to start saying so."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    opened: list[int] = []
    try:
        for one in sealed:
            # Not ``directory / one.digest``: pathlib interns each part of a path, and the
            # digest is the very string the job's spec holds, so every waiting job's would
            # stay in the interpreter's table of interned strings (~100 B a job).
            opened.append(os.open(os.path.join(directory, one.digest),
                                  os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600))
            os.write(opened[-1], one.data)
        opened.append(os.open(directory, os.O_RDONLY | os.O_DIRECTORY))
        if written is not None:
            written()
        named = _FOLDER_SYNC.submit(os.fsync, opened[-1])
        try:
            for fd in opened[:-1]:
                os.fsync(fd)
        finally:
            named.result()
    finally:
        for fd in opened:
            os.close(fd)


def read(data_dir: Path, digest: str) -> KeptEnv:
    """The environment a job names; EnvUnreadable if it is gone or not what was written."""
    if not _DIGEST.fullmatch(digest):
        raise EnvUnreadable(f"its environment's digest {digest!r} is not a SHA-256")
    path = Path(os.path.join(data_dir, ENV_DIR, digest))  # not interned: see ``write``
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise EnvUnreadable(f"its environment file {path} cannot be read: "
                            f"{exc.strerror}") from None
    if hashlib.sha256(data).hexdigest() != digest:
        raise EnvUnreadable(f"its environment file {path} is not what was written")
    try:
        return _decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise EnvUnreadable(f"its environment file {path} is unreadable: {exc}") from None


def for_local(data_dir: Path, spec: ev.JobSpec) -> ev.JobSpec:
    """The job as the orchestrator's own node runs it: with the submitter's environment
    and directory, the declared variables over them. EnvUnreadable if its file is lost."""
    if spec.env_sha256 is None:
        return spec
    kept = read(data_dir, spec.env_sha256)
    return msgspec.structs.replace(spec, env={**kept.exported, **spec.env, **kept.env},
                                   cwd=spec.cwd or kept.cwd)


def for_worker(data_dir: Path, spec: ev.JobSpec) -> tuple[dict[str, str], str | None]:
    """What a remote worker is sent: the declared variables and the declared directory.

    A job recorded before environments were kept out of the log has its env in the log;
    ``eventq jobs submit`` then sent its whole environment, always with ``PATH``: such an
    env (and the directory sent with it) belongs to the orchestrator's machine and is not
    sent. EnvUnreadable if the job's file is lost."""
    if spec.env_sha256 is not None:
        return read(data_dir, spec.env_sha256).env, spec.cwd
    if "PATH" in spec.env:
        return {}, None
    return spec.env, spec.cwd


def _named(state: SchedulerState) -> set[str]:
    return {job.spec.env_sha256 for job in state.jobs.values() if job.spec.env_sha256}


def _listed(directory: Path) -> list[str]:
    try:
        return os.listdir(directory)
    except FileNotFoundError:
        return []


def _settle(written: asyncio.Future[None]) -> None:
    if not written.done():
        written.set_result(None)


def _unlink(directory: Path, names: Iterable[str]) -> None:
    for name in names:
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):  # never written
            os.unlink(directory / name)


@dataclass
class EnvFiles:
    """Writes the environment files of submissions and removes those no job names."""

    DURABLE_READS: ClassVar[frozenset[type]] = frozenset({ev.JobsPurged})

    data_dir: Path
    state: SchedulerState
    #: What a flush that failed once its submission may be recorded calls: the log's own
    #: ``on_fatal`` (the server stops, as when a commit fails).
    on_fatal: Callable[[BaseException], None]
    #: Digests whose submission is still being decided: a sweep leaves their files alone.
    pending: collections.Counter[str] = field(default_factory=collections.Counter)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def directory(self) -> Path:
        return self.data_dir / ENV_DIR

    @contextlib.asynccontextmanager
    async def kept(self, sealed: Collection[Sealed]) -> AsyncIterator[None]:
        """Write ``sealed``, run the block that records the submission while the files
        are flushed (beside the log's own commit, not before it), and return once they
        are on disk: the reply waits for both.

        A file that cannot be written refuses the submission before anything is recorded
        (EnvNotKept). A refusal from the block (any exception but cancellation) removes
        the files again. A cancelled block leaves them pending: the scheduler may still
        record the submission, and a restart removes them if it did not. A flush that
        fails once the submission may be recorded stops the server (``on_fatal``), as a
        failed commit of the log does."""
        digests = [one.digest for one in sealed]
        if not digests:
            yield
            return
        self.pending.update(digests)
        flushed = await self._written(sealed, digests)
        try:
            yield
        except asyncio.CancelledError:
            flushed.add_done_callback(self._fatal_if_failed)
            raise
        except BaseException:
            with contextlib.suppress(OSError):
                await flushed
            self._release(digests, discard=True)
            raise
        try:
            await flushed
        except OSError as exc:
            self.on_fatal(exc)
            raise
        self._release(digests, discard=False)

    async def _written(self, sealed: Collection[Sealed],
                       digests: Sequence[str]) -> asyncio.Future[None]:
        """Once every file is written (not yet flushed): the future of their flush."""
        loop = asyncio.get_running_loop()
        written: asyncio.Future[None] = loop.create_future()

        def announce() -> None:  # on the writing thread
            loop.call_soon_threadsafe(_settle, written)

        flushed = loop.run_in_executor(None, write, self.directory, sealed, announce)
        await asyncio.wait([written, flushed], return_when=asyncio.FIRST_COMPLETED)
        if not written.done():
            written.cancel()
            try:
                await flushed
            except OSError as exc:
                self._release(digests, discard=True)
                raise EnvNotKept(f"cannot store the job's environment in {self.directory}: "
                                 f"{exc.strerror or exc}") from None
        return flushed

    def _fatal_if_failed(self, flushed: asyncio.Future[None]) -> None:
        if not flushed.cancelled() and flushed.exception() is not None:
            self.on_fatal(flushed.exception() or OSError())

    def _release(self, digests: Sequence[str], discard: bool) -> None:
        self.pending.subtract(digests)
        for digest in digests:
            if self.pending[digest] <= 0:
                del self.pending[digest]
        if discard:
            named = _named(self.state)
            _unlink(self.directory, [d for d in digests if d not in named])

    def sweep(self) -> int:
        """Remove every file no job names (and leftovers of interrupted writes); at
        start-up, before any submission. How many were removed."""
        named = _named(self.state)
        doomed = [n for n in _listed(self.directory) if n not in named]
        _unlink(self.directory, doomed)
        return len(doomed)

    def on_durable(self, records: Sequence[Record]) -> None:
        if any(isinstance(r.event, ev.JobsPurged) for r in records):
            task = asyncio.get_running_loop().create_task(self._sweep_after_purge())
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _sweep_after_purge(self) -> None:
        listed = await asyncio.to_thread(_listed, self.directory)
        # Decided here, on the loop: a file listed was pending before it was written, so
        # it is pending now, or named by a job, or refused.
        named = _named(self.state)
        doomed = [n for n in listed if _DIGEST.fullmatch(n) and n not in named
                  and n not in self.pending]
        await asyncio.to_thread(_unlink, self.directory, doomed)
        if doomed:
            log.info("environments_removed", files=len(doomed))

    async def stop(self) -> None:
        await asyncio.gather(*self.tasks, return_exceptions=True)
