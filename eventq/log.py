"""The event log: one SQLite table, append-only, hash-chained, group-committed.

``append`` is synchronous: it numbers and chains the events, hands them to every
subscriber in seq order (actors and projections evolve at once, so a reply can
read its own write), and queues them for the writer. The writer task owns the
write connection and commits everything waiting in one ``BEGIN IMMEDIATE …
COMMIT``. Effects (replies, process starts) wait for ``Appended.durable``. If a
commit fails the process stops: memory must never run ahead of a disk that
refused it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import sqlite3
import struct
import sys
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Protocol

import aiosqlite
import msgspec

from eventq import events as ev
from eventq.gcpause import collector_paused

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY,
    time REAL NOT NULL,
    principal TEXT NOT NULL,
    type TEXT NOT NULL,
    job_id TEXT,
    v INTEGER NOT NULL,
    body BLOB NOT NULL,
    hash BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_job ON events(job_id, seq) WHERE job_id IS NOT NULL;
-- The last row whose chain is known good: written by this server, or verified at a start.
CREATE TABLE IF NOT EXISTS checkpoint (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    seq INTEGER NOT NULL,
    hash BLOB NOT NULL
);
"""

GENESIS = b"\x00" * 32
_SEQ_TIME = struct.Struct(">qd")

Row = tuple[int, float, str, str, str | None, int, bytes, bytes]


class Record(msgspec.Struct, frozen=True, gc=False):
    """One logged event with its envelope."""

    seq: int
    time: float
    principal: str
    event: ev.AnyEvent
    hash: bytes

    @property
    def type(self) -> str:
        return ev.event_type(self.event)


def chain_hash(prev: bytes, seq: int, time: float, principal: str, type_: str,
               job_id: str | None, version: int, body: bytes) -> bytes:
    """The hash of one row, chained to the previous row's hash."""
    fields = f"{principal}\x1f{type_}\x1f{job_id or ''}\x1f{version}".encode()
    return hashlib.sha256(b"".join((prev, _SEQ_TIME.pack(seq, time), fields, body))).digest()


class LogCorrupt(Exception):
    """The hash chain or the sequence is broken at ``seq``."""

    def __init__(self, seq: int, why: str) -> None:
        super().__init__(f"log is corrupt at seq {seq}: {why}")
        self.seq = seq
        self.why = why


class Unstorable(ValueError):
    """An event the log cannot encode (msgpack has no integers beyond 64 bits); nothing
    of its append was recorded."""

    def __init__(self, index: int, why: str) -> None:
        super().__init__(f"event {index} cannot be stored: {why}")
        self.index, self.why = index, why


def _encode_all(events: Sequence[ev.Event]) -> list[bytes]:
    """Every body, or ``Unstorable`` before anything is numbered, folded or queued."""
    try:
        return [ev.encode(e) for e in events]
    except (OverflowError, msgspec.EncodeError):
        for i, event in enumerate(events):
            try:
                ev.encode(event)
            except (OverflowError, msgspec.EncodeError) as exc:
                raise Unstorable(i, str(exc)) from None
        raise


def connect_readonly(path: Path) -> sqlite3.Connection:
    """A plain read connection, for replay and audit whether or not a server runs."""
    if not path.exists():
        raise FileNotFoundError(f"no event log at {path}")
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True)


def select_rows(from_seq: int, to_seq: int | None,
                job_id: str | None) -> tuple[str, list[object]]:
    """The query for rows by seq range and/or job, oldest first, with its arguments."""
    sql = "SELECT seq, time, principal, type, job_id, v, body, hash FROM events WHERE seq >= ?"
    args: list[object] = [from_seq]
    if to_seq is not None:
        sql += " AND seq <= ?"
        args.append(to_seq)
    if job_id is not None:
        sql += " AND job_id = ?"
        args.append(job_id)
    return sql + " ORDER BY seq", args


def iter_rows(conn: sqlite3.Connection, from_seq: int = 1, to_seq: int | None = None,
              job_id: str | None = None) -> Iterator[Row]:
    cur = conn.execute(*select_rows(from_seq, to_seq, job_id))
    while batch := cur.fetchmany(4096):
        yield from batch


def iter_verified(conn: sqlite3.Connection,
                  after: tuple[int, bytes] | None = None) -> Iterator[Record]:
    """Every record from seq 1 (or after ``after``, a known good (seq, hash)), checking
    contiguity and the hash chain as it goes.

    The hot loop of every offline audit: ``chain_hash`` is inlined.
    """
    prev, expected = (GENESIS, 1) if after is None else (after[1], after[0] + 1)
    sha256, pack, types = hashlib.sha256, _SEQ_TIME.pack, ev.EVENT_TYPES
    rows = conn.execute("SELECT seq, time, principal, type, job_id, v, body, hash FROM events "
                        "WHERE seq >= ? ORDER BY seq", (expected,))
    for seq, time, principal, type_, job_id, version, body, stored in rows:
        if seq != expected:
            raise LogCorrupt(expected, f"sequence jumps to {seq}")
        fields = f"{principal}\x1f{type_}\x1f{job_id or ''}\x1f{version}".encode()
        if sha256(b"".join((prev, pack(seq, time), fields, body))).digest() != stored:
            raise LogCorrupt(seq, "hash does not match its contents and the previous hash")
        try:
            event = ev.decode(body, version)
        except msgspec.DecodeError as exc:
            raise LogCorrupt(seq, f"body does not decode: {exc}") from exc
        if type(event) is not types.get(type_):
            raise LogCorrupt(seq, f"type column {type_!r} differs from body")
        yield Record(seq, time, principal, event, stored)
        prev, expected = stored, seq + 1


def read_checkpoint(conn: sqlite3.Connection) -> tuple[int, bytes] | None:
    try:
        row = conn.execute("SELECT seq, hash FROM checkpoint").fetchone()
    except sqlite3.OperationalError:  # a log no server has opened since checkpoints came
        return None
    return None if row is None else (int(row[0]), bytes(row[1]))


def iter_for_start(conn: sqlite3.Connection) -> Iterator[Record]:
    """What a start folds: every record from seq 1, its chain verified from the checkpoint
    on (ARCHITECTURE: "verify its head"). Rows up to the checkpoint were verified when
    they were written or at an earlier start: they are checked for gaps and decoded, and
    the checkpoint's own row must carry the checkpoint's hash. ``eventq replay verify``
    checks the whole chain, whenever asked.
    """
    mark = read_checkpoint(conn)
    if mark is None:
        yield from iter_verified(conn)
        return
    upto, expected, last, decode = mark[0], 1, GENESIS, ev.decode
    rows = conn.execute("SELECT seq, time, principal, v, body, hash FROM events "
                        "WHERE seq <= ? ORDER BY seq", (upto,))
    for seq, time, principal, version, body, stored in rows:
        if seq != expected:
            raise LogCorrupt(expected, f"sequence jumps to {seq}")
        try:
            event = decode(body, version)
        except msgspec.DecodeError as exc:
            raise LogCorrupt(seq, f"body does not decode: {exc}") from exc
        yield Record(seq, time, principal, event, stored)
        expected, last = seq + 1, stored
    if expected != upto + 1 or last != mark[1]:
        raise LogCorrupt(min(expected, upto), "the checkpoint's row is missing or its hash "
                                              "differs from the checkpoint")
    yield from iter_verified(conn, after=mark)


def to_record(row: Row) -> Record:
    seq, time, principal, _type, _job, version, body, stored = row
    return Record(seq, time, principal, ev.decode(body, version), stored)


Subscriber = Callable[[Record], None]
DurableSubscriber = Callable[[Sequence[Record]], None]


class Fold(Protocol):
    """A read model: ``evolve`` folds one record of the types it ``READS``."""

    READS: ClassVar[frozenset[type]]

    def evolve(self, record: Record) -> None: ...


@dataclass
class Appended:
    records: list[Record]
    durable: asyncio.Future[None]


def _fail_stop(exc: BaseException) -> None:
    sys.stderr.write(f"eventq: FATAL: the event log could not be written ({exc!r}); stopping\n")
    sys.stderr.flush()
    os._exit(70)


@dataclass
class EventLog:
    """The log of one data directory. Build it with ``await EventLog.open(path)``."""

    path: Path
    conn: aiosqlite.Connection
    clock_now: Callable[[], float]
    on_fatal: Callable[[BaseException], None] = _fail_stop
    head_seq: int = 0
    head_hash: bytes = GENESIS
    #: Each with the event types it reads (None: every type).
    subscribers: list[tuple[Subscriber, frozenset[type] | None]] = field(default_factory=list)
    #: Event type -> the subscribers that read it, built on first use.
    _routes: dict[type, tuple[Subscriber, ...]] = field(default_factory=dict)
    #: Each with the event types it reads (None: every type).
    durable_subscribers: list[tuple[DurableSubscriber, frozenset[type] | None]] = field(
        default_factory=list)
    commits: int = 0
    committed_events: int = 0
    _pending: list[Row] = field(default_factory=list)
    _pending_records: list[Record] = field(default_factory=list)
    _batch_future: asyncio.Future[None] | None = None
    #: The batch being committed right now (flush must wait for it too).
    _inflight: asyncio.Future[None] | None = None
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _writer: asyncio.Task[None] | None = None
    _reader: aiosqlite.Connection | None = None
    _closing: bool = False
    _holds: int = 0
    #: The newest (seq, hash) known good (verified at start, or committed since), and the
    #: seq the stored checkpoint has.
    _good: tuple[int, bytes] | None = None
    _checkpointed: int = 0
    _failed: bool = False
    #: Committed rows between checkpoints while running: after a crash, a start hashes at
    #: most this many rows more than the ones appended since.
    checkpoint_every: int = 10_000

    @classmethod
    async def open(cls, path: Path, clock_now: Callable[[], float],
                   on_fatal: Callable[[BaseException], None] = _fail_stop) -> EventLog:
        conn = await aiosqlite.connect(path, isolation_level=None)
        # Rows are a few hundred bytes and only ever appended: larger pages mean fewer
        # pages to write and sync per commit (a 10,000-job import commits a fifth faster).
        # Only a new file takes it; an existing log keeps its page size.
        await conn.execute("PRAGMA page_size=16384")
        await conn.execute("PRAGMA journal_mode=WAL")
        await conn.execute("PRAGMA synchronous=FULL")
        await conn.executescript(SCHEMA)
        # From here on, the sqlite3 module opens ``BEGIN IMMEDIATE`` itself before the
        # first INSERT of a batch: one thread round trip less per commit.
        await conn.execute("SELECT 1")
        conn.isolation_level = "IMMEDIATE"
        return cls(path=path, conn=conn, clock_now=clock_now, on_fatal=on_fatal)

    def replay(self, keep: bool = False) -> int:
        """Fold every stored event into the subscribers; returns the number replayed.
        ``keep``: the folded state lives as long as the process (see ``gcpause``)."""
        with collector_paused(keeps=keep):
            record = None
            routes, route = self._routes, self._route
            with sqlite3.connect(self.path) as conn:
                mark = read_checkpoint(conn)
                for record in iter_for_start(conn):
                    folds = routes.get(type(record.event))
                    for fold in route(type(record.event)) if folds is None else folds:
                        fold(record)
            if record is not None:
                self.head_seq, self.head_hash = record.seq, record.hash
                self._good = (record.seq, record.hash)
                self._checkpointed = mark[0] if mark else 0
        return self.head_seq

    def start(self) -> None:
        self._writer = asyncio.get_running_loop().create_task(self._write_loop())

    def subscribe(self, subscriber: Subscriber,
                  reads: Collection[type] | None = None) -> None:
        """Hand ``subscriber`` every record appended from now on, in seq order; only
        those of the ``reads`` types if given (most folds read a few of the types, and
        an import appends 10,000 events at once)."""
        self.subscribers.append((subscriber, None if reads is None else frozenset(reads)))
        self._routes.clear()

    def fold_into(self, *folds: Fold) -> None:
        """Subscribe each read model to the events it reads."""
        for fold in folds:
            self.subscribe(fold.evolve, fold.READS)

    def unsubscribe(self, subscriber: Subscriber) -> None:
        self.subscribers = [(s, r) for s, r in self.subscribers if s != subscriber]
        self._routes.clear()

    def _route(self, kind: type) -> tuple[Subscriber, ...]:
        folds = tuple(s for s, reads in self.subscribers if reads is None or kind in reads)
        self._routes[kind] = folds
        return folds

    def on_durable(self, subscriber: DurableSubscriber,
                   reads: Collection[type] | None = None) -> None:
        """Hand ``subscriber`` each commit's records (only those of ``reads`` if given, and
        only commits that have some) once they are on disk."""
        self.durable_subscribers.append((subscriber, None if reads is None else frozenset(reads)))

    def off_durable(self, subscriber: DurableSubscriber) -> None:
        self.durable_subscribers = [(s, r) for s, r in self.durable_subscribers
                                    if s != subscriber]

    def append(self, principal: str, events: Sequence[ev.Event]) -> Appended:
        """Number, chain and apply ``events``; they become durable at the next commit."""
        if self._closing:
            raise RuntimeError("the event log is closed")
        if not events:  # nothing to make durable: already done
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return Appended([], done)
        bodies = _encode_all(events)
        now = self.clock_now()
        records = []
        routes, tags, job_of, version = self._routes, ev.EVENT_TAGS, ev.event_job_id, \
            ev.SCHEMA_VERSION
        for event, body in zip(events, bodies, strict=True):
            kind = type(event)
            seq, type_, job_id = self.head_seq + 1, tags[kind], job_of(event)
            digest = chain_hash(self.head_hash, seq, now, principal, type_, job_id, version, body)
            record = Record(seq, now, principal, event, digest)  # type: ignore[arg-type]
            self._pending.append((seq, now, principal, type_, job_id, version, body, digest))
            self._pending_records.append(record)
            self.head_seq, self.head_hash = seq, digest
            folds = routes.get(kind)
            for fold in self._route(kind) if folds is None else folds:
                fold(record)
            records.append(record)
        if self._batch_future is None:
            self._batch_future = asyncio.get_running_loop().create_future()
        self._wake.set()
        return Appended(records, self._batch_future)

    @contextlib.contextmanager
    def holding(self) -> Iterator[None]:
        """Commit what is appended inside in one transaction with what follows it: a
        command's events (the scheduler's and the allocator's it asks) cost one commit."""
        self._holds += 1
        try:
            yield
        finally:
            self._holds -= 1
            if not self._holds and self._pending:
                self._wake.set()

    async def _write_loop(self) -> None:
        try:
            await self._write_checkpoint()  # what this start verified need not be again
        except BaseException as exc:  # noqa: BLE001 - any failure stops the process
            self._failed = True
            self.on_fatal(exc)
            return
        yielded = False
        while True:
            if not self._pending or (self._holds and not self._closing):
                if self._closing and not self._pending:
                    return
                await self._wake.wait()
                self._wake.clear()
                continue
            if not yielded:
                # One turn of the loop first: requests already read get to append to this
                # commit, instead of each waiting for the next (bigger, fewer commits).
                yielded = True
                await asyncio.sleep(0)
                continue
            yielded = False
            rows, records, future = self._pending, self._pending_records, self._batch_future
            self._pending, self._pending_records, self._batch_future = [], [], None
            self._inflight = future
            try:
                await self._commit(rows)
                self._good = (records[-1].seq, records[-1].hash)
                if self._good[0] - self._checkpointed >= self.checkpoint_every:
                    await self._write_checkpoint()
            except BaseException as exc:  # noqa: BLE001 - any failure stops the process
                self._failed = True
                self.on_fatal(exc)
                if future is not None and not future.done():
                    future.set_exception(RuntimeError(f"event log write failed: {exc!r}"))
                return
            self.commits += 1
            self.committed_events += len(rows)
            if future is not None and not future.done():
                future.set_result(None)
            for subscriber, reads in self.durable_subscribers:
                if reads is None:
                    subscriber(records)
                elif mine := [r for r in records if type(r.event) in reads]:
                    subscriber(mine)

    async def _write_checkpoint(self) -> None:
        """Record the newest known good row, so the next start verifies the chain from
        there (a clean stop, and each start, move it)."""
        if self._good is None or self._good[0] <= self._checkpointed:
            return
        await self.conn.execute("INSERT OR REPLACE INTO checkpoint VALUES (1, ?, ?)", self._good)
        await self.conn.commit()
        self._checkpointed = self._good[0]

    async def _commit(self, rows: list[Row]) -> None:
        """``BEGIN IMMEDIATE`` (implicit, see ``open``), every row, ``COMMIT``."""
        try:
            await self.conn.executemany("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
            await self.conn.commit()
        except BaseException:
            await self.conn.rollback()
            raise

    def flush_future(self) -> asyncio.Future[None] | None:
        """The future of the latest commit still to come (None if all is durable)."""
        for future in (self._batch_future, self._inflight):
            if future is not None and not future.done():
                return future
        return None

    async def flush(self) -> None:
        """Wait until everything appended so far is durable."""
        for future in (self._inflight, self._batch_future):
            if future is not None and not future.done():
                await asyncio.shield(future)

    async def read(self, from_seq: int = 1, to_seq: int | None = None,
                   job_id: str | None = None, limit: int = 10_000) -> list[Record]:
        """Durable records by seq range and/or job, oldest first."""
        sql, args = select_rows(from_seq, to_seq, job_id)
        sql += " LIMIT ?"
        args.append(limit)
        if self._reader is None:
            # Its own connection: reads must never see the writer's open transaction.
            self._reader = await aiosqlite.connect(self.path)
        async with self._reader.execute(sql, args) as cur:
            rows = await cur.fetchall()
        return [to_record(tuple(row)) for row in rows]

    async def close(self) -> None:
        """Commit what is waiting, then close the connection."""
        self._closing = True
        self._wake.set()
        if self._writer is not None:
            await self._writer
        if not self._failed:
            await self._write_checkpoint()
        await self.conn.close()
        if self._reader is not None:
            await self._reader.close()
