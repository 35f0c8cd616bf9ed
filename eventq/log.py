"""The event log: one SQLite table, append-only, hash-chained, anchored, group-committed.

``append`` is synchronous: it numbers and chains the events, hands them to every
subscriber in seq order (actors and projections evolve at once, so a reply can
read its own write), and queues them for the writer. The writer task owns the
write connection and commits everything waiting in one ``BEGIN IMMEDIATE …
COMMIT``. Effects (replies, process starts) wait for ``Appended.durable``. If a
commit fails the process stops: memory must never run ahead of a disk that
refused it.

What it promises about the stored log: nothing a start acts on, and nothing ``eventq replay
verify`` passes, differs from what the server wrote. Every row from seq 1 is hashed
(``eventq.chain``; for a large log, by a second process while this one folds) before
``replay`` returns, and the head must be the one the server anchored (``check_head``): each
commit records the head's seq and hash, with an HMAC under a key kept beside the log, in
the same transaction as its rows. An edit, a deletion or a reordering anywhere raises
``LogCorrupt`` naming the seq; a chain recomputed after an edit fails the HMAC.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hmac
import json
import os
import secrets
import sqlite3
import struct
import subprocess
import sys
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import MethodType
from typing import Any, ClassVar, NamedTuple, Protocol

import aiosqlite
import msgspec

from eventq import events as ev
from eventq.chain import GENESIS as GENESIS
from eventq.chain import LogCorrupt as LogCorrupt
from eventq.chain import Row as Row
from eventq.chain import chain_hash as chain_hash
from eventq.chain import check_rows, hashed_rows
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
-- The anchored head: the last committed row and the HMAC of (seq, hash) under the log's
-- key, written in the same transaction as the rows (``mac`` is NULL in logs from before it).
CREATE TABLE IF NOT EXISTS checkpoint (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    seq INTEGER NOT NULL,
    hash BLOB NOT NULL,
    mac BLOB
);
"""
ANCHOR = "INSERT OR REPLACE INTO checkpoint (id, seq, hash, mac) VALUES (1, ?, ?, ?)"

#: Events whose loss in a power cut (never in a crash of the process: the page cache keeps
#: what was written) costs nothing, so a commit of these alone is not synced
#: (``synchronous=NORMAL``); the next commit that is synced makes them durable with it,
#: the WAL being written in order. A lost ``AttemptStarted`` is told again: the worker
#: repeats it after each welcome for every attempt it still runs, and a local attempt is
#: found in its directory at start; ``JobReasonsChanged`` is what every pass recomputes.
#: Every other event is synced before anyone acts on it (a ``run`` waits for its
#: ``AttemptDispatched``, a worker forgets an attempt once its end is surely recorded).
UNSYNCED = frozenset({ev.AttemptStarted, ev.JobReasonsChanged})

#: Seconds a batch of ``UNSYNCED`` events alone waits for more before its commit. An
#: attempt's start is usually followed within a millisecond by more: for a short job its
#: end (the worker sends both back to back), for any job the pass's reasons. Committed at
#: once, the start's own commit held the log's thread while the end arrived, and the end's
#: commit (the one the next ``run`` waits for) came after it: a third of the jobs of a
#: two-worker drain of `true` jobs paid a commit more on that path. Nothing waits for these
#: events to be durable, so waiting costs no one.
UNSYNCED_WAIT = 0.005

#: From this many rows on, a start hashes the chain in a second process while it folds
#: (``ChainCheckAside``); below it, starting that process costs more than it saves, and
#: with one CPU there is nothing to gain.
ASIDE_FROM_ROWS = 50_000 if len(os.sched_getaffinity(0)) > 1 else 2**63


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


class KeyFileInvalid(Exception):
    """The anchor's key file exists but does not hold a key."""


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


_UNDECODABLE = (msgspec.DecodeError, KeyError, TypeError, ValueError)
#: The hash of the records a large start folds (``_fold_contiguous``), which reads no
#: hashes: the process beside it checks the chain.
UNHASHED = b""
#: Beyond any seq: every row.
_ALL = 2**63 - 1


def iter_verified(conn: sqlite3.Connection) -> Iterator[Record]:
    """Every record from seq 1, each yielded once it is in sequence, its hash holds and
    it decodes. Deleted tail rows and a recomputed chain show only against the anchor:
    ``check_head`` once this is exhausted."""
    return _records(hashed_rows(conn, _ALL))


def _fold_contiguous(conn: sqlite3.Connection, upto: int, routes: dict[type, tuple[Step, ...]],
                     folds_of: Callable[[type], tuple[Step, ...]]) -> tuple[int, bytes]:
    """Fold rows 1 to ``upto`` in sequence and decoded, not hashed: the half of a large
    start whose chain another process hashes; returns the last row's (seq, hash). Reading,
    the gap check, decoding and folding in one loop, without the job and hash columns: the
    hot loop of every large start, where each generator or call a row passes through costs
    a tenth of the scan, and the hash column alone ~0.1 s a million rows. Its records carry
    ``UNHASHED``: no fold reads a record's hash (the chain is the log's own business)."""
    decode, current, tags = ev.decode, ev.SCHEMA_VERSION, ev.EVENT_TAGS
    decode_current, expected = ev.DECODER.decode, 1
    for seq, time, principal, type_, version, body in conn.execute(
            "SELECT seq, time, principal, type, v, body FROM events "
            "WHERE seq <= ? ORDER BY seq", (upto,)):
        if seq != expected:
            raise LogCorrupt(expected, f"sequence jumps to {seq}")
        try:  # only the decoding: what a fold raises is the fold's
            event = decode_current(body) if version == current else decode(body, version)
        except _UNDECODABLE as exc:
            raise LogCorrupt(seq, f"body does not decode: {exc}") from exc
        kind = type(event)
        if tags.get(kind) != type_:  # by the event's type: the column's text is not hashed
            raise LogCorrupt(seq, f"type column {type_!r} differs from body")
        record = Record(seq, time, principal, event, UNHASHED)
        folds = routes.get(kind)
        for fold in folds_of(kind) if folds is None else folds:  # folds_of fills routes
            fold(event, record)
        expected = seq + 1
    last = expected - 1
    if not last:
        return 0, GENESIS
    stored: bytes = conn.execute("SELECT hash FROM events WHERE seq = ?", (last,)).fetchone()[0]
    return last, stored


def _records(rows: Iterator[Row]) -> Iterator[Record]:
    """The rows decoded; a body that does not decode, or whose type differs from its
    type column, is corrupt."""
    decode, types, seq = ev.decode, ev.EVENT_TYPES, 1
    try:
        for seq, time, principal, type_, _job_id, version, body, stored in rows:
            event = decode(body, version)
            if type(event) is not types.get(type_):
                raise LogCorrupt(seq, f"type column {type_!r} differs from body")
            yield Record(seq, time, principal, event, stored)
    except _UNDECODABLE as exc:
        raise LogCorrupt(seq, f"body does not decode: {exc}") from exc


# --- the anchored head -------------------------------------------------------------------


class HeadTrust(enum.StrEnum):
    """What vouches for the end of a log whose chain verified."""

    #: The anchor's HMAC matches the head: nothing was cut, added or recomputed.
    KEYED = "keyed"
    #: No keyed anchor yet (a log from before anchors, or one never committed to): the
    #: chain holds from seq 1, but a cut tail or a recomputed chain would not show.
    UNKEYED = "unkeyed"


class Anchor(NamedTuple):
    seq: int
    hash: bytes
    mac: bytes | None


@dataclass(frozen=True)
class AnchorKey:
    """The secret that signs the head, read from (or written to) ``path`` (mode 0600)."""

    secret: bytes
    path: Path
    #: Written, but no anchor made with it is known to be committed yet (``events.key.new``):
    #: a start that finds it beside an unkeyed log was interrupted while keying the log.
    pending: bool = False


def key_path(log_path: Path) -> Path:
    """Where a log's key lives: beside it, ``events.db`` → ``events.key``."""
    return log_path.with_suffix(".key")


def _pending_path(log_path: Path) -> Path:
    return log_path.with_suffix(".key.new")


def read_key(log_path: Path, path: Path | None = None) -> AnchorKey | None:
    """The log's key (``path`` if given, else beside the log), or None if there is none."""
    candidates = [(path, False)] if path is not None else \
        [(key_path(log_path), False), (_pending_path(log_path), True)]
    for candidate, pending in candidates:
        try:
            text = candidate.read_text()
        except FileNotFoundError:
            continue
        try:
            secret = bytes.fromhex(text.strip())
        except ValueError:
            secret = b""
        if len(secret) != 32:
            raise KeyFileInvalid(f"{candidate} does not hold a log key (64 hex digits)")
        return AnchorKey(secret, candidate, pending)
    return None


def _write_private(path: Path, text: str) -> None:
    """Atomically and durably, readable only by its owner."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _sync_dir(path.parent)


def _sync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def create_key(log_path: Path) -> AnchorKey:
    """A new key, pending until an anchor made with it is committed (``promote_key``)."""
    secret = secrets.token_bytes(32)
    path = _pending_path(log_path)
    _write_private(path, secret.hex() + "\n")
    return AnchorKey(secret, path, pending=True)


def promote_key(log_path: Path, key: AnchorKey) -> AnchorKey:
    """An anchor made with ``key`` is committed: from now on the log must carry one."""
    final = key_path(log_path)
    os.replace(key.path, final)
    _sync_dir(final.parent)
    return AnchorKey(key.secret, final)


def anchor_mac(secret: bytes, seq: int, digest: bytes) -> bytes:
    return hmac.digest(secret, b"eventq anchor\x00" + struct.pack(">q", seq) + digest, "sha256")


def read_anchor(conn: sqlite3.Connection) -> Anchor | None:
    try:
        row = conn.execute("SELECT * FROM checkpoint WHERE id = 1").fetchone()
    except sqlite3.OperationalError:  # a log from before checkpoints
        return None
    if row is None:
        return None
    try:
        mac = row[3] if len(row) > 3 else None
        return Anchor(int(row[1]), bytes(row[2]), None if mac is None else bytes(mac))
    except (TypeError, ValueError) as exc:
        raise LogCorrupt(1, f"the anchor row cannot be read: {exc}", first=False) from exc


def check_head(conn: sqlite3.Connection, head: tuple[int, bytes],
               key: AnchorKey | None) -> HeadTrust:
    """Once ``iter_verified`` has read every row up to ``head`` (seq, hash): is that the
    head the server anchored? Raises ``LogCorrupt`` naming the seq where it differs."""
    last, last_hash = head
    anchor = read_anchor(conn)
    if anchor is None or anchor.mac is None:
        return _check_unkeyed(conn, anchor, last, key)
    if key is None:
        raise LogCorrupt(anchor.seq, "the head is anchored with a key, and there is no key "
                                     "beside the log (events.key)", first=False)
    if not hmac.compare_digest(anchor.mac, anchor_mac(key.secret, anchor.seq, anchor.hash)):
        raise LogCorrupt(anchor.seq, "the anchor's MAC does not match: the anchor or the chain "
                                     "was rewritten without the key", first=False)
    if anchor.seq > last:
        raise LogCorrupt(last + 1, f"rows {last + 1} to {anchor.seq} are missing (the "
                                   f"anchored head is seq {anchor.seq})")
    if anchor.seq < last:
        raise LogCorrupt(anchor.seq + 1, f"rows after the anchored head (seq {anchor.seq}) "
                                         "were not written by eventq")
    if anchor.hash != last_hash:
        raise LogCorrupt(last, "its hash differs from the anchored head's: the chain was "
                               "recomputed", first=False)
    return HeadTrust.KEYED


def _check_unkeyed(conn: sqlite3.Connection, anchor: Anchor | None, last: int,
                   key: AnchorKey | None) -> HeadTrust:
    """A log with no keyed anchor: acceptable only if it was never keyed; an old
    checkpoint (from before anchors were keyed) must still find its row."""
    if key is not None and not key.pending:
        raise LogCorrupt(max(last, 1), "the log has a key but its anchor is gone: rows may "
                                       "have been cut or rewritten", first=False)
    if anchor is None:
        return HeadTrust.UNKEYED
    if anchor.seq > last:
        raise LogCorrupt(last + 1, f"rows {last + 1} to {anchor.seq} are missing (the "
                                   f"checkpoint is at seq {anchor.seq})")
    stored = conn.execute("SELECT hash FROM events WHERE seq = ?", (anchor.seq,)).fetchone()
    if stored is None or stored[0] != anchor.hash:
        raise LogCorrupt(anchor.seq, "its hash differs from the checkpoint's")
    return HeadTrust.UNKEYED


def settle_failed_fold(conn: sqlite3.Connection, rest: Iterator[Record],
                       last: Record | None, key: AnchorKey | None) -> None:
    """A fold raised on a row the chain vouches for. If the log was changed (the rest of
    the chain, or the anchor, says so), raise that instead: it is the cause to report."""
    for last in rest:  # noqa: B007 - the last one is the head
        pass
    check_head(conn, (0, GENESIS) if last is None else (last.seq, last.hash), key)

class ChainCheckAside:
    """The chain of rows 1 to ``upto`` hashed by ``python -m eventq.chain`` in a second
    process, while this one decodes and folds the same rows unhashed.

    Its answer must be in, and agree, before anything acts on the fold (``result``). Both
    processes read the file through SQLite; ``PRAGMA data_version`` of this process's
    connection, the same before the second process starts and after it answered, shows
    that no other connection committed in between, so both read the same rows.
    """

    def __init__(self, path: Path, upto: int, conn: sqlite3.Connection) -> None:
        self.upto, self.conn = upto, conn
        self.version = self._data_version()
        self.answer: dict[str, Any] | None = None
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "eventq.chain", str(path), str(upto)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def _data_version(self) -> int:
        version: int = self.conn.execute("PRAGMA data_version").fetchone()[0]
        return version

    def result(self) -> tuple[int, bytes]:
        """The head the other process verified; ``LogCorrupt`` where it broke. If that
        process could not answer, this one hashes the chain itself."""
        if self.answer is None:
            out, _ = self.proc.communicate()
            try:
                self.answer = json.loads(out) if self.proc.returncode == 0 else None
            except ValueError:
                self.answer = None
            if self.answer is None:
                self.answer = check_rows(hashed_rows(self.conn, self.upto))
        if "corrupt" in self.answer:
            raise LogCorrupt(self.answer["corrupt"], self.answer["why"], self.answer["first"])
        if self._data_version() != self.version:
            raise LogCorrupt(1, "another process wrote the log while the start read it",
                             first=False)
        return int(self.answer["seq"]), bytes.fromhex(self.answer["hash"])

    def close(self) -> None:
        """Stop it if it still runs (the fold failed first); always reaped."""
        if self.proc.returncode is None:
            self.proc.kill()
            self.proc.communicate()


def to_record(row: Row) -> Record:
    seq, time, principal, _type, _job, version, body, stored = row
    return Record(seq, time, principal, ev.decode(body, version), stored)


Subscriber = Callable[[Record], None]
DurableSubscriber = Callable[[Sequence[Record]], None]
#: What the log calls for one event and one subscriber: (the event, its record).
Step = Callable[[Any, Record], None]


class Fold(Protocol):
    """A read model: ``evolve`` folds one record of the types it ``READS``.

    One may also have ``STEPS``, a table by event type of its functions (read model, event,
    record): the log then calls the event's function straight, without ``evolve``'s lookup
    in the same table (a start passes a million events, each to several read models). A
    type it reads and has no step for goes through ``evolve``."""

    READS: ClassVar[frozenset[type]]

    def evolve(self, record: Record) -> None: ...


def _by_record(subscriber: Subscriber) -> Step:
    def step(event: Any, record: Record) -> None:
        subscriber(record)
    return step


@dataclass
class Appended:
    records: list[Record]
    durable: asyncio.Future[None]


def _connect(path: Path) -> sqlite3.Connection:
    """The write connection (on the writer's thread)."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        # Rows are a few hundred bytes and only ever appended: larger pages mean fewer
        # pages to write and sync per commit (a 10,000-job import commits a fifth
        # faster). Only a new file takes it; an existing log keeps its page size.
        conn.execute("PRAGMA page_size=16384")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        # A commit's multi-row INSERTs keep a statement journal (the pages to restore if
        # a row failed), and past 64 KiB (four pages) SQLite spills it to a file in its
        # temporary directory ($SQLITE_TMPDIR, $TMPDIR, /var/tmp), created and deleted at
        # each commit: a full /tmp, where training jobs spill, stopped the log with
        # "disk is full" while the data disk had room. In memory, the log needs one disk.
        conn.execute("PRAGMA temp_store=MEMORY")
        conn.executescript(SCHEMA)
    except BaseException:
        conn.close()
        raise
    # From here on, the sqlite3 module opens ``BEGIN IMMEDIATE`` itself before the first
    # INSERT of a transaction.
    conn.isolation_level = "IMMEDIATE"
    return conn


def _in_transaction(conn: sqlite3.Connection, write: Callable[[], object]) -> None:
    """``write`` and ``COMMIT``, or nothing at all."""
    try:
        write()
        conn.commit()
    except BaseException:
        conn.rollback()
        raise


#: Rows per INSERT: each statement is one step of SQLite, and each step gives the
#: interpreter lock back and takes it again. Row by row (``executemany``), a commit of 32
#: submissions waited for the event loop's thread 33 times; a commit is now a few
#: statements whatever its size (sizes are powers of two, so a few statements are cached).
#: 256 rows of 8 columns stay far below SQLite's limit of 32,766 parameters.
_ROWS_PER_INSERT = (256, 64, 16, 4, 1)
_INSERT = {n: "INSERT INTO events VALUES " + ", ".join(["(?, ?, ?, ?, ?, ?, ?, ?)"] * n)
           for n in _ROWS_PER_INSERT}


def insert_statements(rows: Sequence[Row]) -> Iterator[tuple[str, list[object]]]:
    """``rows`` as a few multi-row INSERTs, in seq order: each its SQL and its values."""
    at = 0
    for size in _ROWS_PER_INSERT:
        while len(rows) - at >= size:
            yield _INSERT[size], [value for row in rows[at:at + size] for value in row]
            at += size


class ReaderFailed(Exception):
    """A durable subscriber raised on a commit's records: what it keeps (processes started,
    workers told, lines written) may lack them, so the process stops as for a failed commit."""


def _fail_stop(exc: BaseException) -> None:
    """One line, then exit at once: no further reply, dispatch or process start can go out
    on memory the disk did not take, or on a reader that missed a commit; the next start
    folds what the log holds. The line is lost, never the exit, if stderr is gone."""
    if isinstance(exc, ReaderFailed):
        line = f"eventq: FATAL: {exc}; stopping now: every acknowledged event is in the log. " \
               "Restart: the log is the truth\n"
    else:
        line = f"eventq: FATAL: the event log could not be written ({exc or repr(exc)}); " \
               "stopping now: nothing unwritten was acknowledged. Restart once the disk " \
               "is writable and has room: the log is the truth\n"
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.write(line)
        sys.stderr.flush()
    os._exit(70)


@dataclass
class EventLog:
    """The log of one data directory. Build it with ``await EventLog.open(path)``."""

    path: Path
    #: The write connection, used only on ``thread``'s one thread.
    conn: sqlite3.Connection
    #: Runs each write step whole (a commit's rows, its anchored head and the ``COMMIT``):
    #: one hop from the event loop per commit, where a hop per statement cost a serial
    #: submitter a fifth of its commits.
    thread: ThreadPoolExecutor
    clock_now: Callable[[], float]
    on_fatal: Callable[[BaseException], None] = _fail_stop
    head_seq: int = 0
    head_hash: bytes = GENESIS
    #: Each with the event types it reads (None: every type).
    subscribers: list[tuple[Subscriber, frozenset[type] | None]] = field(default_factory=list)
    #: Event type -> the steps of the subscribers that read it, built on first use.
    _routes: dict[type, tuple[Step, ...]] = field(default_factory=dict)
    #: A read model's ``evolve`` -> the model and its ``STEPS`` (``Fold``).
    _steps: dict[Subscriber, tuple[object, Mapping[type, Callable[..., None]]]] = field(
        default_factory=dict)
    #: Each with the event types it reads (None: every type).
    durable_subscribers: list[tuple[DurableSubscriber, frozenset[type] | None]] = field(
        default_factory=list)
    commits: int = 0
    committed_events: int = 0
    #: Commits left unsynced (``UNSYNCED``).
    unsynced_commits: int = 0
    _synced: bool = True
    _pending: list[Row] = field(default_factory=list)
    _pending_records: list[Record] = field(default_factory=list)
    _batch_future: asyncio.Future[None] | None = None
    #: The batch being committed right now (flush must wait for it too).
    _inflight: asyncio.Future[None] | None = None
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _writer: asyncio.Task[None] | None = None
    _reader: aiosqlite.Connection | None = None
    _closing: bool = False
    _closed: bool = False
    _holds: int = 0
    #: The newest (seq, hash) known good: verified at start, or committed since.
    _good: tuple[int, bytes] | None = None
    #: Signs the head at every commit; read at open, created by the first start of a log
    #: that has none.
    key: AnchorKey | None = None
    #: What vouched for the head at start (``replay``).
    trust: HeadTrust | None = None
    #: From this many rows on, a start hashes the chain in a second process.
    aside_from_rows: int = ASIDE_FROM_ROWS

    @classmethod
    async def open(cls, path: Path, clock_now: Callable[[], float],
                   on_fatal: Callable[[BaseException], None] = _fail_stop) -> EventLog:
        key = read_key(path)
        thread = ThreadPoolExecutor(1, thread_name_prefix="eventq-log-writer")
        try:
            conn = await asyncio.get_running_loop().run_in_executor(thread, _connect, path)
        except BaseException:
            thread.shutdown()
            raise
        return cls(path=path, conn=conn, thread=thread, clock_now=clock_now,
                   on_fatal=on_fatal, key=key)

    def replay(self, keep: bool = False) -> int:
        """Fold every stored event into the subscribers, verify the whole chain and the
        anchored head; returns the number replayed. ``keep``: the folded state lives as
        long as the process (see ``gcpause``).

        Raises ``LogCorrupt`` if the log is not as its server wrote it: the caller must
        act on nothing folded (SPEC 8: the whole chain, before anything is executed). A
        small log is hashed row by row before each fold; a large one by a second process
        meanwhile, whose answer ``replay`` waits for.
        """
        with collector_paused(keeps=keep), contextlib.closing(sqlite3.connect(self.path)) as conn:
            upto: int = conn.execute("SELECT ifnull(max(seq), 0) FROM events").fetchone()[0]
            aside = ChainCheckAside(self.path, upto, conn) if upto >= self.aside_from_rows \
                else None
            try:
                head = self._fold_verified(conn, upto, aside)
            finally:
                if aside is not None:
                    aside.close()
            self.trust = check_head(conn, head, self.key)
        self.head_seq, self.head_hash = head
        self._good = head if head[0] else None
        return self.head_seq

    def _fold_verified(self, conn: sqlite3.Connection, upto: int,
                       aside: ChainCheckAside | None) -> tuple[int, bytes]:
        """Fold rows 1 to ``upto`` (hashed here, or by ``aside``); the verified head."""
        if aside is None:
            return self._fold_hashed(conn, upto)
        try:
            head = _fold_contiguous(conn, upto, self._routes, self._route)
        except Exception as exc:
            # A change the other process found, or the anchor shows, is the cause to report.
            verified = aside.result()
            if not isinstance(exc, LogCorrupt):
                check_head(conn, verified, self.key)
            raise
        if aside.result() != head:
            raise LogCorrupt(head[0], "the rows differ from those the chain check read",
                             first=False)
        return head

    def _fold_hashed(self, conn: sqlite3.Connection, upto: int) -> tuple[int, bytes]:
        """Fold rows 1 to ``upto``, each hashed here first; the verified head."""
        record = None
        routes, route = self._routes, self._route
        records = _records(hashed_rows(conn, upto))
        try:
            for record in records:
                folds = routes.get(type(record.event))
                for fold in route(type(record.event)) if folds is None else folds:
                    fold(record.event, record)
        except Exception as exc:
            if not isinstance(exc, LogCorrupt):
                settle_failed_fold(conn, records, record, self.key)
            raise
        return (0, GENESIS) if record is None else (record.seq, record.hash)

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
            steps = getattr(fold, "STEPS", None)
            if steps is not None:
                self._steps[fold.evolve] = (fold, steps)
            self.subscribe(fold.evolve, fold.READS)

    def unsubscribe(self, subscriber: Subscriber) -> None:
        self.subscribers = [(s, r) for s, r in self.subscribers if s != subscriber]
        self._steps.pop(subscriber, None)
        self._routes.clear()

    def _route(self, kind: type) -> tuple[Step, ...]:
        folds = tuple(self._step(s, kind) for s, reads in self.subscribers
                      if reads is None or kind in reads)
        self._routes[kind] = folds
        return folds

    def _step(self, subscriber: Subscriber, kind: type) -> Step:
        """The read model's own step for ``kind`` if it has one, else its ``evolve``."""
        fold, steps = self._steps.get(subscriber, (None, {}))
        step = steps.get(kind)
        return _by_record(subscriber) if step is None else MethodType(step, fold)

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
                fold(event, record)
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
            await self._anchor_at_start()
        except BaseException as exc:  # noqa: BLE001 - any failure stops the process
            self.on_fatal(exc)
            return
        fresh = True  # the batch began while the writer waited
        while True:
            if not self._pending or (self._holds and not self._closing):
                if self._closing and not self._pending:
                    return
                await self._wake.wait()
                self._wake.clear()
                fresh = True
                continue
            if fresh:
                # One turn of the loop first: requests already read get to append to this
                # commit, instead of each waiting for the next (bigger, fewer commits).
                fresh = False
                await asyncio.sleep(0)
                await self._unsynced_wait()
                continue
            # A batch that gathered while the last commit was on disk goes at once: its
            # rows are written while the last commit's replies go out, not after them
            # (under 64 clients that turn of the loop held each commit back ~2 ms).
            if not await self._commit_pending():
                return

    async def _unsynced_wait(self) -> None:
        """Wait up to ``UNSYNCED_WAIT`` for another append when all that is pending is
        ``UNSYNCED``, so that what follows shares its commit."""
        if self._closing or any(type(r.event) not in UNSYNCED for r in self._pending_records):
            return
        self._wake.clear()
        timer = asyncio.get_running_loop().call_later(UNSYNCED_WAIT, self._wake.set)
        try:
            await self._wake.wait()
        finally:
            timer.cancel()

    async def _commit_pending(self) -> bool:
        """Commit everything appended so far as one transaction, then tell its waiters and
        the durable subscribers; False once a failed commit has stopped the log."""
        rows, records, future = self._pending, self._pending_records, self._batch_future
        self._pending, self._pending_records, self._batch_future = [], [], None
        self._inflight = future
        try:
            await self._commit(rows, synced=any(type(r.event) not in UNSYNCED
                                                for r in records))
            self._good = (records[-1].seq, records[-1].hash)
            if self.key is not None and self.key.pending:
                self.key = promote_key(self.path, self.key)
        except BaseException as exc:  # noqa: BLE001 - any failure stops the process
            self.on_fatal(exc)
            if future is not None and not future.done():
                future.set_exception(RuntimeError(f"event log write failed: {exc!r}"))
            return False
        self.commits += 1
        self.committed_events += len(rows)
        if future is not None and not future.done():
            future.set_result(None)
        return self._tell_durable(records)

    def _tell_durable(self, records: list[Record]) -> bool:
        """Hand a commit's records to the durable subscribers; False once one has failed
        and stopped the log (a failure ended this task before, and every later commit
        with it, while the server went on taking submissions it never answered)."""
        for subscriber, reads in self.durable_subscribers:
            try:
                if reads is None:
                    subscriber(records)
                elif mine := [r for r in records if type(r.event) in reads]:
                    subscriber(mine)
            except Exception as exc:  # noqa: BLE001 - any failure stops the process
                self.on_fatal(ReaderFailed(
                    f"{getattr(subscriber, '__qualname__', subscriber)} failed on the commit "
                    f"up to seq {records[-1].seq}: {exc!r}"))
                return False
        return True

    async def _on_writer(self, step: Callable[[], None]) -> None:
        await asyncio.get_running_loop().run_in_executor(self.thread, step)

    async def _anchor_at_start(self) -> None:
        """Key a log that has no key yet, and anchor the head this start verified. A new
        key stays pending (``events.key.new``) until an anchor made with it is committed,
        so a crash in between leaves a log that still starts."""
        if self.key is None:
            self.key = create_key(self.path)
        good, conn = self._good, self.conn
        mac = None if good is None else anchor_mac(self.key.secret, *good)

        def step() -> None:
            columns = conn.execute("PRAGMA table_info(checkpoint)").fetchall()
            if "mac" not in {column[1] for column in columns}:  # a log from before anchors
                conn.execute("ALTER TABLE checkpoint ADD COLUMN mac BLOB")
            if good is not None:  # else an empty log: the first commit anchors it
                _in_transaction(conn, lambda: conn.execute(ANCHOR, (*good, mac)))

        await self._on_writer(step)
        if good is not None and self.key.pending:
            self.key = promote_key(self.path, self.key)

    async def _commit(self, rows: list[Row], synced: bool = True) -> None:
        """``BEGIN IMMEDIATE`` (implicit, see ``open``), every row and the anchored head,
        ``COMMIT``: the head moves with its rows or not at all, at no extra sync. Synced
        unless every row is ``UNSYNCED``."""
        assert self.key is not None  # set by _anchor_at_start
        seq, digest, conn = rows[-1][0], rows[-1][7], self.conn
        head = (seq, digest, anchor_mac(self.key.secret, seq, digest))
        switch = synced != self._synced
        self._synced = synced
        self.unsynced_commits += not synced

        def write() -> None:
            for sql, values in insert_statements(rows):
                conn.execute(sql, values)
            conn.execute(ANCHOR, head)

        def step() -> None:
            if switch:  # outside a transaction, where SQLite takes it
                conn.execute(f"PRAGMA synchronous={'FULL' if synced else 'NORMAL'}")
            _in_transaction(conn, write)

        await self._on_writer(step)

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
        """Commit what is waiting, then close the connection (a log that was never
        started writes nothing)."""
        self._closing = True
        self._wake.set()
        if self._writer is not None:
            await self._writer
        if not self._closed:
            self._closed = True
            await self._on_writer(self.conn.close)
            self.thread.shutdown()
        if self._reader is not None:
            await self._reader.close()
