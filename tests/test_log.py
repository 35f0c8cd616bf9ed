"""The event log: group commit, hash chain, reads, subscribers, fail-stop."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from eventq import events as ev
from eventq.clock import SimClock
from eventq.log import EventLog, LogCorrupt, Record, iter_verified, read_checkpoint


def limits_event(n: int) -> ev.LimitsChanged:
    return ev.LimitsChanged(limits=ev.Limits(max_concurrent=n))


async def open_log(path: Path, clock: SimClock) -> EventLog:
    log = await EventLog.open(path, clock.now)
    log.replay()
    log.start()
    return log


async def test_concurrent_appends_share_commits_and_all_become_durable(tmp_path: Path,
                                                                       clock: SimClock) -> None:
    log = await open_log(tmp_path / "events.db", clock)

    async def submitter(i: int) -> None:
        for j in range(10):
            await log.append(f"user:{i}", [limits_event(1 + j)]).durable

    await asyncio.gather(*(submitter(i) for i in range(32)))
    await log.close()
    assert log.committed_events == 320
    assert log.commits < 320, "concurrent appends must be grouped into fewer commits"
    with sqlite3.connect(tmp_path / "events.db") as conn:
        records = list(iter_verified(conn))
    assert [r.seq for r in records] == list(range(1, 321))


async def test_subscribers_see_events_in_seq_order_at_append(tmp_path: Path,
                                                             clock: SimClock) -> None:
    log = await open_log(tmp_path / "events.db", clock)
    seen: list[int] = []
    log.subscribe(lambda r: seen.append(r.seq))
    log.append("system", [limits_event(1), limits_event(2)])
    assert seen == [1, 2], "folds run before append returns (read-your-writes)"
    await log.close()


async def test_reads_by_job_and_by_range_return_durable_records(tmp_path: Path,
                                                                clock: SimClock) -> None:
    log = await open_log(tmp_path / "events.db", clock)
    spec = ev.JobSpec(job_id="j1", user="alice", priority=10, command=["true"])
    log.append("user:alice", [ev.JobSubmitted(job=spec), limits_event(3),
                              ev.JobCancelled(job_id="j1")])
    await log.flush()
    assert [r.type for r in await log.read(job_id="j1")] == ["job_submitted", "job_cancelled"]
    assert [r.seq for r in await log.read(from_seq=2, to_seq=3)] == [2, 3]
    await log.close()


async def test_reopened_log_continues_the_chain(tmp_path: Path, clock: SimClock) -> None:
    log = await open_log(tmp_path / "events.db", clock)
    log.append("system", [limits_event(1)])
    await log.close()
    replayed: list[Record] = []
    again = await EventLog.open(tmp_path / "events.db", clock.now)
    again.subscribe(replayed.append)
    assert again.replay() == 1 and replayed[0].event == limits_event(1)
    again.start()
    await again.append("system", [limits_event(2)]).durable
    await again.close()
    with sqlite3.connect(tmp_path / "events.db") as conn:
        assert [r.seq for r in iter_verified(conn)] == [1, 2]


async def test_a_changed_byte_is_caught_at_its_seq(tmp_path: Path, clock: SimClock) -> None:
    log = await open_log(tmp_path / "events.db", clock)
    for n in range(1, 6):
        log.append("system", [limits_event(n)])
    await log.close()
    with sqlite3.connect(tmp_path / "events.db") as conn:
        conn.execute("UPDATE events SET principal = 'user:mallory' WHERE seq = 3")
    with sqlite3.connect(tmp_path / "events.db") as conn, pytest.raises(LogCorrupt) as caught:
        list(iter_verified(conn))
    assert caught.value.seq == 3


async def appended_and_stopped(path: Path, clock: SimClock, first: int, last: int) -> None:
    log = await open_log(path, clock)
    for n in range(first, last + 1):
        log.append("system", [limits_event(n)])
    await log.close()


async def test_a_start_verifies_the_chain_from_the_checkpoint_a_clean_stop_left(
        tmp_path: Path, clock: SimClock) -> None:
    path = tmp_path / "events.db"
    await appended_and_stopped(path, clock, 1, 5)
    await appended_and_stopped(path, clock, 6, 7)
    with sqlite3.connect(path) as conn:
        assert read_checkpoint(conn) == (7, conn.execute(
            "SELECT hash FROM events WHERE seq = 7").fetchone()[0])
        conn.execute("UPDATE events SET principal = 'user:mallory' WHERE seq = 2")
    again = await EventLog.open(path, clock.now)
    folded: list[Record] = []
    again.subscribe(folded.append)
    assert again.replay() == 7, "a start does not hash again the rows its checkpoint vouches for"
    assert [r.event for r in folded] == [limits_event(n) for n in range(1, 8)]
    await again.close()
    with sqlite3.connect(path) as conn, pytest.raises(LogCorrupt) as caught:
        list(iter_verified(conn))
    assert caught.value.seq == 2, "eventq replay verify still checks the whole chain"


async def test_a_running_log_moves_its_checkpoint_so_a_crash_leaves_little_to_hash(
        tmp_path: Path, clock: SimClock) -> None:
    path = tmp_path / "events.db"
    log = await open_log(path, clock)
    log.checkpoint_every = 3
    for n in range(1, 8):
        await log.append("system", [limits_event(n)]).durable
    with sqlite3.connect(path) as conn:  # the process dies here: no clean stop
        mark = read_checkpoint(conn)
        assert mark is not None and mark[0] == 6, "every 3 committed rows"
        assert mark[1] == conn.execute("SELECT hash FROM events WHERE seq = ?",
                                       (mark[0],)).fetchone()[0]
    await log.close()


@pytest.mark.parametrize(("tamper", "seq"), [
    ("UPDATE events SET principal = 'user:mallory' WHERE seq = 6", 6),  # past the checkpoint
    ("UPDATE checkpoint SET hash = zeroblob(32)", 5),  # the checkpoint disagrees with its row
    ("DELETE FROM events WHERE seq >= 3", 3),  # rows the checkpoint vouches for are gone
])
async def test_a_start_refuses_a_log_whose_head_does_not_verify(
        tmp_path: Path, clock: SimClock, tamper: str, seq: int) -> None:
    path = tmp_path / "events.db"
    await appended_and_stopped(path, clock, 1, 5)
    await appended_and_stopped(path, clock, 6, 7)
    with sqlite3.connect(path) as conn:  # as if the server had stopped without a clean stop
        conn.execute("UPDATE checkpoint SET seq = 5, hash = (SELECT hash FROM events "
                     "WHERE seq = 5)")
        conn.execute(tamper)
    log = await EventLog.open(path, clock.now)
    with pytest.raises(LogCorrupt) as caught:
        log.replay()
    assert caught.value.seq == seq
    await log.close()


async def test_a_failed_commit_stops_the_process(tmp_path: Path, clock: SimClock) -> None:
    stopped: list[BaseException] = []
    log = await EventLog.open(tmp_path / "events.db", clock.now, on_fatal=stopped.append)
    log.replay()
    log.start()
    await log.append("system", [limits_event(1)]).durable
    # Another writer takes the seq the log will write next: the commit must fail.
    with sqlite3.connect(tmp_path / "events.db") as conn:
        conn.execute("INSERT INTO events VALUES (2, 0, 'x', 'x', NULL, 1, x'00', x'00')")
    appended = log.append("system", [limits_event(2)])
    with pytest.raises(RuntimeError, match="event log write failed"):
        await appended.durable
    assert len(stopped) == 1 and isinstance(stopped[0], sqlite3.IntegrityError)
    await log.conn.close()


def test_old_schema_versions_are_upcast_on_read() -> None:
    import msgspec

    old = {"type": "job_submitted", "job": {"job_id": "j", "user": "u", "priority": 10,
                                            "command": ["true"], "num_processes": 4}}
    event = ev.decode(msgspec.msgpack.encode(old), version=0)
    assert isinstance(event, ev.JobSubmitted) and event.job.gpus == 4
