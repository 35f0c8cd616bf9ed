"""The event log: group commit, hash chain, anchored head, reads, subscribers, fail-stop."""

from __future__ import annotations

import asyncio
import sqlite3
import stat
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import closing, contextmanager
from pathlib import Path

import msgspec
import pytest

import eventq.log
from eventq import events as ev
from eventq.clock import SimClock
from eventq.log import (
    UNHASHED,
    EventLog,
    HeadTrust,
    LogCorrupt,
    ReaderFailed,
    Record,
    anchor_mac,
    chain_hash,
    iter_verified,
    key_path,
    read_anchor,
    read_key,
)
from tests.helpers import until

OpenLog = Callable[..., Awaitable[EventLog]]


def limits_event(n: int) -> ev.LimitsChanged:
    return ev.LimitsChanged(limits=ev.Limits(max_concurrent=n))


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "events.db"


@pytest.fixture
async def open_log(path: Path, clock: SimClock) -> AsyncIterator[OpenLog]:
    """``await open_log()``: a log replayed and started; every one is closed at the end."""
    opened: list[EventLog] = []

    async def open_(replay: bool = True, start: bool = True, aside: bool = False,
                    **kw: object) -> EventLog:
        log = await EventLog.open(path, clock.now, **kw)  # type: ignore[arg-type]
        opened.append(log)
        if aside:  # the chain hashed by a second process, as for a large log
            log.aside_from_rows = 1
        if replay:
            log.replay()
        if start:
            log.start()
        return log

    try:
        yield open_
    finally:
        for log in opened:
            await log.close()


@contextmanager
def sql(path: Path) -> Iterator[sqlite3.Connection]:
    """A plain connection that commits on success and is always closed."""
    with closing(sqlite3.connect(path)) as conn, conn:
        yield conn


def verified_seqs(path: Path) -> list[int]:
    with sql(path) as conn:
        return [r.seq for r in iter_verified(conn)]


async def appended_and_stopped(open_log: OpenLog, first: int, last: int) -> None:
    log = await open_log()
    for n in range(first, last + 1):
        log.append("system", [limits_event(n)])
    await log.close()


async def test_concurrent_appends_share_commits_and_all_become_durable(
        open_log: OpenLog, path: Path) -> None:
    log = await open_log()

    async def submitter(i: int) -> None:
        for j in range(10):
            await log.append(f"user:{i}", [limits_event(1 + j)]).durable

    await asyncio.gather(*(submitter(i) for i in range(32)))
    await log.close()
    assert log.committed_events == 320
    assert log.commits < 320, "concurrent appends must be grouped into fewer commits"
    assert verified_seqs(path) == list(range(1, 321))


async def test_a_commit_of_any_size_stores_every_row_in_seq_order(
        open_log: OpenLog, path: Path) -> None:
    """A commit writes its rows a few hundred per statement: sizes on either side of each
    statement's size all land whole, in order, with the chain intact."""
    log = await open_log()
    sizes = [1, 3, 4, 5, 63, 64, 65, 255, 256, 257, 341]
    for size in sizes:
        await log.append("system", [limits_event(1 + n) for n in range(size)]).durable
    await log.close()
    assert log.commits == len(sizes)
    with sql(path) as conn:
        stored = [(r.seq, r.event) for r in iter_verified(conn)]
    assert stored == [(seq, limits_event(1 + n)) for seq, n in
                      enumerate((n for size in sizes for n in range(size)), start=1)]


async def test_replies_gathered_during_a_commit_go_in_the_next_one_at_once(
        open_log: OpenLog) -> None:
    """What is appended while a commit is on disk is the next commit, started as soon as
    that one ends: the replies of the first are not written before the second begins."""
    log = await open_log()
    await log.append("system", [limits_event(1)]).durable  # the writer is past its start
    disk = threading.Event()  # the writer's thread is busy until this is set
    log.thread.submit(disk.wait)
    try:
        first = log.append("system", [limits_event(1)]).durable
        await until(lambda: log._inflight is first, "the writer took the first batch")
        second = log.append("system", [limits_event(2)]).durable
    finally:
        disk.set()
    order: list[str] = []
    first.add_done_callback(lambda _: order.append("first durable"))
    second.add_done_callback(lambda _: order.append("second durable"))
    await first
    assert log._inflight is second, "the second commit is under way when the first's waiters run"
    await second
    assert order == ["first durable", "second durable"]
    await log.close()


async def test_subscribers_see_events_in_seq_order_at_append(open_log: OpenLog) -> None:
    log = await open_log()
    seen: list[int] = []
    log.subscribe(lambda r: seen.append(r.seq))
    log.append("system", [limits_event(1), limits_event(2)])
    assert seen == [1, 2], "folds run before append returns (read-your-writes)"


async def test_reads_by_job_and_by_range_return_durable_records(open_log: OpenLog) -> None:
    log = await open_log()
    spec = ev.JobSpec(job_id="j1", user="alice", priority=10, command=["true"])
    log.append("user:alice", [ev.JobSubmitted(job=spec), limits_event(3),
                              ev.JobCancelled(job_id="j1")])
    await log.flush()
    assert [r.type for r in await log.read(job_id="j1")] == ["job_submitted", "job_cancelled"]
    assert [r.seq for r in await log.read(from_seq=2, to_seq=3)] == [2, 3]


async def test_reopened_log_continues_the_chain(open_log: OpenLog, path: Path) -> None:
    await appended_and_stopped(open_log, 1, 1)
    again = await open_log(replay=False, start=False)
    replayed: list[Record] = []
    again.subscribe(replayed.append)
    assert again.replay() == 1 and replayed[0].event == limits_event(1)
    assert again.trust is HeadTrust.KEYED
    again.start()
    await again.append("system", [limits_event(2)]).durable
    await again.close()
    assert verified_seqs(path) == [1, 2]


async def test_a_changed_byte_is_caught_at_its_seq(open_log: OpenLog, path: Path) -> None:
    await appended_and_stopped(open_log, 1, 5)
    with sql(path) as conn:
        conn.execute("UPDATE events SET principal = 'user:mallory' WHERE seq = 3")
    with sql(path) as conn, pytest.raises(LogCorrupt) as caught:
        list(iter_verified(conn))
    assert caught.value.seq == 3


async def test_every_commit_anchors_its_head_with_the_key(open_log: OpenLog,
                                                          path: Path) -> None:
    log = await open_log()
    for n in range(1, 4):
        await log.append("system", [limits_event(n)]).durable
        # The process could die here: what is on disk must already vouch for the head.
        with sql(path) as conn:
            anchor = read_anchor(conn)
            head = conn.execute("SELECT seq, hash FROM events ORDER BY seq DESC").fetchone()
        key = read_key(path)
        assert key is not None and not key.pending
        assert anchor is not None and (anchor.seq, anchor.hash) == head
        assert anchor.mac == anchor_mac(key.secret, *head)
    assert stat.S_IMODE(key_path(path).stat().st_mode) == 0o600


async def test_a_start_refuses_an_edit_below_the_head_a_clean_stop_anchored(
        open_log: OpenLog, path: Path) -> None:
    """The rows below the head are hashed again at every start, not taken on trust."""
    await appended_and_stopped(open_log, 1, 5)
    await appended_and_stopped(open_log, 6, 7)
    with sql(path) as conn:
        conn.execute("UPDATE events SET principal = 'user:mallory' WHERE seq = 2")
    log = await open_log(replay=False, start=False)
    folded: list[int] = []
    log.subscribe(lambda r: folded.append(r.seq))
    with pytest.raises(LogCorrupt) as caught:
        log.replay()
    assert caught.value.seq == 2
    assert folded == [1], "nothing past the last row the chain vouches for is folded"


HASHED = pytest.mark.parametrize("aside", [False, True], ids=["hashed-here", "hashed-aside"])


@HASHED
@pytest.mark.parametrize(("tamper", "seq", "first"), [
    ("UPDATE events SET principal = 'user:mallory' WHERE seq = 6", 6, True),
    ("DELETE FROM events WHERE seq = 4", 4, True),
    ("DELETE FROM events WHERE seq >= 3", 3, True),  # the tail, the anchored head with it
    # The last row's hash: the one a large start reads after folding the rows unhashed
    ("UPDATE events SET hash = zeroblob(32) WHERE seq = 7", 7, True),
    ("UPDATE checkpoint SET hash = zeroblob(32)", 7, False),
    ("UPDATE checkpoint SET mac = NULL", 7, False),  # the log has a key: it must be used
    ("DELETE FROM checkpoint", 7, False),
])
async def test_a_start_refuses_a_log_whose_chain_or_head_does_not_verify(
        open_log: OpenLog, path: Path, tamper: str, seq: int, first: bool,
        aside: bool) -> None:
    await appended_and_stopped(open_log, 1, 7)
    with sql(path) as conn:
        conn.execute(tamper)
    log = await open_log(replay=False, start=False, aside=aside)
    with pytest.raises(LogCorrupt) as caught:
        log.replay()
    assert (caught.value.seq, caught.value.first) == (seq, first)


def rechain(conn: sqlite3.Connection, from_seq: int) -> None:
    """Every hash from ``from_seq`` on recomputed, and the anchor moved to the new head."""
    prev = conn.execute("SELECT hash FROM events WHERE seq = ?", (from_seq - 1,)).fetchone()[0]
    rows = conn.execute("SELECT seq, time, principal, type, job_id, v, body FROM events "
                        "WHERE seq >= ? ORDER BY seq", (from_seq,)).fetchall()
    for seq, *fields in rows:
        prev = chain_hash(prev, seq, *fields)
        conn.execute("UPDATE events SET hash = ? WHERE seq = ?", (prev, seq))
    conn.execute("UPDATE checkpoint SET seq = ?, hash = ?", (rows[-1][0], prev))


@HASHED
async def test_a_recomputed_chain_fails_the_anchor_even_where_a_fold_trips_on_it(
        open_log: OpenLog, path: Path, aside: bool) -> None:
    await appended_and_stopped(open_log, 1, 5)
    with sql(path) as conn:
        conn.execute("UPDATE events SET body = ? WHERE seq = 2", (ev.encode(limits_event(99)),))
        rechain(conn, 2)
    with sql(path) as conn:
        assert [r.seq for r in iter_verified(conn)] == [1, 2, 3, 4, 5], "the chain holds"

    def trips(record: Record) -> None:
        if record.event == limits_event(99):
            raise KeyError("a fold that meets an impossible history")

    log = await open_log(replay=False, start=False, aside=aside)
    log.subscribe(trips)
    with pytest.raises(LogCorrupt) as caught:
        log.replay()
    assert caught.value.seq == 5 and not caught.value.first
    assert "MAC" in caught.value.why


@HASHED
async def test_a_type_column_that_differs_from_its_body_is_refused_before_anything_folds_it(
        open_log: OpenLog, path: Path, aside: bool) -> None:
    """Its chain recomputed to match: the row itself says it is not what the server wrote."""
    await appended_and_stopped(open_log, 1, 5)
    with sql(path) as conn:
        conn.execute("UPDATE events SET type = 'server_started' WHERE seq = 3")
        rechain(conn, 3)
    folded: list[int] = []
    log = await open_log(replay=False, start=False, aside=aside)
    log.subscribe(lambda record: folded.append(record.seq))
    with pytest.raises(LogCorrupt) as caught:
        log.replay()
    assert (caught.value.seq, caught.value.first) == (3, True)
    assert "type column 'server_started' differs from body" in caught.value.why
    assert folded == [1, 2]


@HASHED
async def test_a_fold_that_fails_on_an_intact_log_is_not_blamed_on_the_log(
        open_log: OpenLog, aside: bool) -> None:
    await appended_and_stopped(open_log, 1, 3)

    def fails(record: Record) -> None:
        raise KeyError("a bug in a fold")

    log = await open_log(replay=False, start=False, aside=aside)
    log.subscribe(fails)
    with pytest.raises(KeyError, match="a bug in a fold"):
        log.replay()


async def test_a_large_log_is_hashed_aside_and_folds_the_same(open_log: OpenLog) -> None:
    await appended_and_stopped(open_log, 1, 5)
    here, aside = await open_log(replay=False, start=False), \
        await open_log(replay=False, start=False, aside=True)
    seen: dict[str, list[Record]] = {"here": [], "aside": []}
    here.subscribe(seen["here"].append)
    aside.subscribe(seen["aside"].append)
    assert here.replay() == aside.replay() == 5
    # Records folded aside carry no hash (no fold reads one); all else is the same.
    assert [msgspec.structs.replace(r, hash=UNHASHED) for r in seen["here"]] == seen["aside"]
    assert here.head_hash == aside.head_hash and aside.trust is HeadTrust.KEYED


async def test_a_chain_check_process_that_cannot_answer_is_done_here(
        open_log: OpenLog, path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    await appended_and_stopped(open_log, 1, 5)
    with sql(path) as conn:
        conn.execute("UPDATE events SET principal = 'user:mallory' WHERE seq = 3")
    monkeypatch.setattr("sys.executable", "false")  # the second process exits 1 at once
    log = await open_log(replay=False, start=False, aside=True)
    with pytest.raises(LogCorrupt) as caught:
        log.replay()
    assert caught.value.seq == 3


async def test_a_write_by_another_process_during_the_start_is_refused(
        open_log: OpenLog, path: Path) -> None:
    """Both processes must read the same rows: no commit may come between them (this one
    changes nothing the chain covers, so only the commit itself can tell)."""
    await appended_and_stopped(open_log, 1, 5)

    def meddles(record: Record) -> None:
        if record.seq == 2:
            with sql(path) as conn:
                conn.execute("CREATE TABLE notes (text TEXT)")

    log = await open_log(replay=False, start=False, aside=True)
    log.subscribe(meddles)
    with pytest.raises(LogCorrupt, match="another process wrote the log"):
        log.replay()


async def test_a_log_whose_key_is_gone_refuses_to_start(open_log: OpenLog,
                                                        path: Path) -> None:
    await appended_and_stopped(open_log, 1, 3)
    key_path(path).unlink()
    log = await open_log(replay=False, start=False)
    with pytest.raises(LogCorrupt, match="no key") as caught:
        log.replay()
    assert caught.value.seq == 3


def strip_anchoring(path: Path, checkpoint: int | None) -> None:
    """Make the log look as the server before anchors left it: no key, and a checkpoint
    (seq, hash) in the old three-column table, or none at all."""
    key_path(path).unlink()
    with sql(path) as conn:
        conn.execute("DROP TABLE checkpoint")
        if checkpoint is not None:
            conn.execute("CREATE TABLE checkpoint (id INTEGER PRIMARY KEY CHECK (id = 1), "
                         "seq INTEGER NOT NULL, hash BLOB NOT NULL)")
            conn.execute("INSERT INTO checkpoint SELECT 1, seq, hash FROM events WHERE seq = ?",
                         (checkpoint,))


@pytest.mark.parametrize("checkpoint", [None, 4])
async def test_an_old_log_starts_verified_whole_and_is_anchored_from_then_on(
        open_log: OpenLog, path: Path, checkpoint: int | None) -> None:
    """Rows after an old checkpoint are what a crash left (it was written every 10,000)."""
    await appended_and_stopped(open_log, 1, 6)
    strip_anchoring(path, checkpoint)
    log = await open_log()
    assert log.head_seq == 6 and log.trust is HeadTrust.UNKEYED
    await log.append("system", [limits_event(7)]).durable
    await log.close()
    again = await open_log(replay=False, start=False)
    again.replay()
    assert again.trust is HeadTrust.KEYED
    assert stat.S_IMODE(key_path(path).stat().st_mode) == 0o600


async def test_an_old_log_whose_checkpoint_row_was_cut_refuses_to_start(
        open_log: OpenLog, path: Path) -> None:
    await appended_and_stopped(open_log, 1, 6)
    strip_anchoring(path, checkpoint=5)
    with sql(path) as conn:
        conn.execute("DELETE FROM events WHERE seq >= 4")
    log = await open_log(replay=False, start=False)
    with pytest.raises(LogCorrupt) as caught:
        log.replay()
    assert caught.value.seq == 4


async def test_a_start_interrupted_while_keying_an_old_log_starts_again(
        open_log: OpenLog, path: Path) -> None:
    """The new key is written before the first keyed anchor is committed; a crash in
    between leaves a key still pending beside an unkeyed log."""
    await appended_and_stopped(open_log, 1, 3)
    strip_anchoring(path, checkpoint=None)
    pending = path.with_suffix(".key.new")
    pending.write_text("ab" * 32 + "\n")
    log = await open_log()
    assert log.trust is HeadTrust.UNKEYED
    await log.close()
    key = read_key(path)
    assert key is not None and not key.pending and key.secret == bytes.fromhex("ab" * 32)
    assert not pending.exists()


async def test_a_failed_commit_stops_the_process(open_log: OpenLog, path: Path) -> None:
    stopped: list[BaseException] = []
    log = await open_log(on_fatal=stopped.append)
    await log.append("system", [limits_event(1)]).durable
    # Another writer takes the seq the log will write next: the commit must fail.
    with sql(path) as conn:
        conn.execute("INSERT INTO events VALUES (2, 0, 'x', 'x', NULL, 1, x'00', x'00')")
    appended = log.append("system", [limits_event(2)])
    with pytest.raises(RuntimeError, match="event log write failed"):
        await appended.durable
    assert len(stopped) == 1 and isinstance(stopped[0], sqlite3.IntegrityError)


async def test_a_reader_that_fails_on_a_commit_stops_the_process(
        open_log: OpenLog) -> None:
    """A durable subscriber that raised (the action log's stderr gone: its reader closed
    the pipe) ended the commit loop silently: the server took submissions and answered
    none, and would not stop. The process stops as for a failed commit, saying who failed."""
    stopped: list[BaseException] = []
    log = await open_log(on_fatal=stopped.append)
    told: list[int] = []

    def lines_gone(records: Sequence[Record]) -> None:
        raise BrokenPipeError(32, "Broken pipe")

    log.on_durable(lines_gone)
    log.on_durable(lambda records: told.extend(r.seq for r in records))
    await log.append("system", [limits_event(1)]).durable
    await log.close()  # the commit loop has ended; it raised the pipe's error before
    assert len(stopped) == 1 and isinstance(stopped[0], ReaderFailed)
    assert "lines_gone" in str(stopped[0]) and "Broken pipe" in str(stopped[0])
    assert told == []  # no reader after the failed one acts on the commit


def test_old_schema_versions_are_upcast_on_read() -> None:
    import msgspec

    old = {"type": "job_submitted", "job": {"job_id": "j", "user": "u", "priority": 10,
                                            "command": ["true"], "num_processes": 4}}
    event = ev.decode(msgspec.msgpack.encode(old), version=0)
    assert isinstance(event, ev.JobSubmitted) and event.job.gpus == 4


async def test_only_a_commit_of_events_told_again_after_a_power_cut_goes_unsynced(
        open_log: OpenLog, path: Path) -> None:
    """An attempt's start (the worker repeats it) and a job's reasons (every pass recomputes
    them) may wait for the next synced commit; anything else is synced as it commits."""
    log = await open_log()

    def synchronous() -> int:
        return int(log.conn.execute("PRAGMA synchronous").fetchone()[0])

    started = ev.AttemptStarted(job_id="j1", attempt=1, pid=42)
    reasons = ev.JobReasonsChanged(job_id="j1", reasons=[ev.Reason("gpus", "all busy")])
    await log.append("system", [started, reasons]).durable
    assert (log.unsynced_commits, synchronous()) == (1, 1)  # NORMAL
    await log.append("system", [started, limits_event(2)]).durable
    assert (log.unsynced_commits, synchronous()) == (1, 2)  # FULL
    await log.append("system", [limits_event(3)]).durable
    assert (log.unsynced_commits, synchronous()) == (1, 2)
    await log.close()
    assert verified_seqs(path) == [1, 2, 3, 4, 5]


async def test_an_attempts_start_waits_to_share_its_end_s_commit(
        open_log: OpenLog, path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A short job's start and end arrive a moment apart: they go in one commit, so the end
    (which the next ``run`` waits for) never queues behind a commit of the start alone. A
    start with nothing after it is still committed."""
    log = await open_log()
    before = log.commits
    with monkeypatch.context() as patched:  # however slow this machine is right now
        patched.setattr(eventq.log, "UNSYNCED_WAIT", 600.0)
        started = log.append("system", [ev.AttemptStarted(job_id="j1", attempt=1, pid=42)])
        for _ in range(5):  # the writer wakes, gathers, and waits
            await asyncio.sleep(0)
        ended = log.append("system", [ev.AttemptEnded(job_id="j1", attempt=1,
                                                      outcome="exited",
                                                      exit_code=0)])
        await asyncio.gather(started.durable, ended.durable)
    assert log.commits - before == 1
    await log.append("system", [ev.AttemptStarted(job_id="j2", attempt=1, pid=43)]).durable
    assert log.commits - before == 2
    await log.close()
    assert verified_seqs(path) == [1, 2, 3]


def test_no_event_the_log_decodes_is_tracked_by_the_cyclic_collector() -> None:
    """A start decodes every event in the log: none may cost the collector a scan (events
    are frozen data and hold no cycle, as their specs and reasons already are)."""
    import gc

    for name, kind in ev.EVENT_TYPES.items():
        assert kind.__struct_config__.gc is False, name
    body = ev.encode(limits_event(3))
    assert not gc.is_tracked(ev.DECODER.decode(body))
