"""A submission that must wait is one event: the job and its first reasons.

``tests/golden/two_event_submissions`` is the golden story (``tools/make_golden_log.py``)
as the scheduler played it when such a submission was two events, ``job_submitted`` then
``job_reasons_changed`` (written by the commit before the change). The same story played
today must end in the same state, and tell each job's reasons and its ``replay why`` the
same way; the old log must replay to the state its actors held.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

from eventq import events as ev
from eventq import replay
from eventq.actors.scheduler import CommandError, Outcome, Process, Submit
from eventq.cli.why import story_of
from eventq.http.app import make_app
from eventq.http.history import reason_history
from eventq.log import Record, iter_verified
from eventq.server import Orchestrator
from tests.conftest import AiohttpClient
from tests.test_golden_log import GOLDEN, known_state, read_only
from tools import make_golden_log

GOLDEN_LOG = GOLDEN / "events.db"
BEFORE = GOLDEN / "two_event_submissions"
BEFORE_LOG = BEFORE / "events.db"


@pytest.fixture(scope="module")
def replayed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """The golden story played by today's scheduler into a new log, and its live state."""
    path = tmp_path_factory.mktemp("story") / "events.db"
    live = asyncio.run(make_golden_log.build(path))
    return path, live


def records(path: Path) -> list[Record]:
    with read_only(path) as conn:
        out = list(iter_verified(conn))
    conn.close()
    return out


def by_job(rows: list[Record]) -> dict[str, list[Record]]:
    out: dict[str, list[Record]] = {}
    for r in rows:
        job_id = ev.event_job_id(r.event)
        if job_id is not None:
            out.setdefault(job_id, []).append(r)
    return out


def without_seqs(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A reason history as a reader sees it: reasons and times, not which row said so."""
    hidden = ("seq", "until_seq", "event", "until_event")
    return [{k: v for k, v in h.items() if k not in hidden} for h in history]


def test_a_waiting_submission_is_one_event(replayed: tuple[Path, dict[str, Any]]) -> None:
    old, new = records(BEFORE_LOG), records(replayed[0])
    waited = [r.event for r in new if isinstance(r.event, ev.JobSubmitted) and r.event.reasons]
    assert {e.job.job_id for e in waited} >= {"golden-b", "golden-d", "golden-e"}
    old_changes = sum(isinstance(r.event, ev.JobReasonsChanged) for r in old)
    new_changes = sum(isinstance(r.event, ev.JobReasonsChanged) for r in new)
    assert new_changes == old_changes - len(waited)
    assert len(new) == len(old) - len(waited)


def test_the_new_shape_replays_to_the_old_state(replayed: tuple[Path, dict[str, Any]]) -> None:
    path, live = replayed
    with read_only(BEFORE_LOG) as conn:
        old = known_state(replay.fold(conn))
    conn.close()
    assert old == json.loads((BEFORE / "expected_state.json").read_text())
    with read_only(path) as conn:
        new = known_state(replay.fold(conn))
    conn.close()
    assert new == live  # replay gives what the actors held
    assert {**new, "last_seq": 0} == {**old, "last_seq": 0}


def test_reasons_and_why_tell_the_same_story(replayed: tuple[Path, dict[str, Any]]) -> None:
    old, new = by_job(records(BEFORE_LOG)), by_job(records(replayed[0]))
    assert old.keys() == new.keys()
    for job_id in old:
        assert without_seqs(reason_history(new[job_id])) == \
            without_seqs(reason_history(old[job_id])), job_id
        old_story, new_story = story_of(job_id, old[job_id]), story_of(job_id, new[job_id])
        assert old_story is not None and new_story is not None
        now = make_golden_log.START + 10_000
        told_old, told_new = old_story.summary(now), new_story.summary(now)
        for told in (told_old, told_new):
            for step in told["steps"]:
                del step["seq"]
        assert told_new == told_old, job_id


def test_a_submission_without_reasons_is_stored_as_before() -> None:
    """Old rows decode to ``reasons`` None, and a new row without reasons has their bytes."""
    spec = ev.JobSpec(job_id="j", user="alice", priority=10, command=["true"])
    plain = ev.encode(ev.JobSubmitted(job=spec))
    assert msgspec.msgpack.decode(plain).keys() == {"type", "job"}
    with sqlite3.connect(f"file:{GOLDEN_LOG}?mode=ro", uri=True) as conn:
        body, version = conn.execute(
            "SELECT body, v FROM events WHERE type = 'job_submitted' AND v = 1").fetchone()
    conn.close()
    stored = ev.decode(body, version)
    assert isinstance(stored, ev.JobSubmitted) and stored.reasons is None
    assert ev.encode(stored) == body


async def test_a_job_that_must_wait_is_submitted_in_one_event_and_says_why(
        make_orch: Callable[..., Awaitable[Orchestrator]], aiohttp_client: AiohttpClient,
        tmp_path: Path) -> None:
    """Over HTTP, into the real log: one event per submission, whose reasons the job's
    page, its reason history and a restart all read back."""
    orch = await make_orch(data_dir=tmp_path / "data")
    api = await aiohttp_client(make_app(orch),
                               headers={"Authorization": f"Bearer {orch.admin_token}"})
    before = orch.log.head_seq
    resp = await api.post("/api/queue/submit",
                          json={"command": ["true"], "gpus": 0, "target": "worker"})
    assert resp.status == 200, await resp.text()
    job = await resp.json()
    assert job["status"] == "queued" and job["reasons"]
    assert orch.log.head_seq == before + 1
    said = [r["code"] for r in job["reasons"]]
    events = (await (await api.get(f"/api/jobs/{job['job_id']}/events")).json())["events"]
    assert [e["type"] for e in events] == ["job_submitted"]
    assert [r["code"] for r in events[0]["body"]["reasons"]] == said
    history = (await (await api.get(f"/api/jobs/{job['job_id']}/reasons")).json())["history"]
    assert [(h["codes"], h["event"], h["until"]) for h in history] == \
        [(said, "job_submitted", None)]
    await orch.stop()
    again = await make_orch(data_dir=tmp_path / "data")
    assert [r.code for r in again.state.jobs[job["job_id"]].reasons] == said


def _spec(job_id: str, target: str = "worker") -> ev.JobSpec:
    return ev.JobSpec(job_id=job_id, user="admin", priority=10, command=["true"], gpus=0,
                      target=target, name="true")


async def test_a_waiting_submission_skips_the_mailbox_only_while_the_scheduler_is_idle(
        make_orch: Callable[..., Awaitable[Orchestrator]], tmp_path: Path) -> None:
    """The HTTP route records a job that simply waits at once when the scheduler has no
    message in hand or queued: never ahead of one sent before it, never a job that may
    start, refused as the mailbox refuses, and durable once its future says so."""
    orch = await make_orch(data_dir=tmp_path / "data")
    scheduler = orch.scheduler
    await asyncio.sleep(0)
    scheduler.tell(Process())
    assert scheduler.submit_waiting(Submit(_spec("late1"), "user:admin")) is None
    assert "late1" not in orch.state.jobs, "behind a queued message: nothing recorded"
    by_mail: Outcome = await scheduler.ask(Submit(_spec("late1"), "user:admin"))
    assert scheduler.submit_waiting(Submit(_spec("may-start", "local"), "user:admin")) is None
    assert "may-start" not in orch.state.jobs, "placing a job awaits the allocator"
    at_once = scheduler.submit_waiting(Submit(_spec("late2"), "user:admin"))
    assert at_once is not None and at_once.durable is not None
    assert orch.state.jobs["late2"].status == orch.state.jobs["late1"].status == "pending"
    [inline_event], [mail_event] = at_once.events, by_mail.events
    assert isinstance(inline_event, ev.JobSubmitted) and isinstance(mail_event, ev.JobSubmitted)
    assert inline_event.reasons == mail_event.reasons and inline_event.reasons
    with pytest.raises(CommandError, match="already exists"):
        scheduler.submit_waiting(Submit(_spec("late2"), "user:admin"))
    await at_once.durable
    conn = sqlite3.connect(tmp_path / "data" / "events.db")
    try:
        stored = conn.execute("SELECT type FROM events WHERE job_id = 'late2'").fetchall()
    finally:
        conn.close()
    assert stored == [("job_submitted",)], "durable: in the file another connection reads"


async def test_concurrent_submissions_are_each_acknowledged_once_durable_and_in_order(
        make_orch: Callable[..., Awaitable[Orchestrator]], aiohttp_client: AiohttpClient,
        tmp_path: Path) -> None:
    """64 clients at once, as the benchmark drives it: every reply names a job that another
    connection finds in the file, one row each, and the queue positions are 1..64."""
    orch = await make_orch(data_dir=tmp_path / "data")
    api = await aiohttp_client(make_app(orch),
                               headers={"Authorization": f"Bearer {orch.admin_token}"})

    def stored(job_id: str) -> list[tuple[str]]:
        conn = sqlite3.connect(tmp_path / "data" / "events.db")
        try:
            return conn.execute("SELECT type FROM events WHERE job_id = ?", (job_id,)).fetchall()
        finally:
            conn.close()

    async def submit() -> dict[str, Any]:
        resp = await api.post("/api/queue/submit",
                              json={"command": ["true"], "gpus": 0, "target": "worker"})
        assert resp.status == 200, await resp.text()
        reply: dict[str, Any] = await resp.json()
        assert stored(reply["job_id"]) == [("job_submitted",)], "in the file at the reply"
        return reply

    replies = await asyncio.gather(*(submit() for _ in range(64)))
    assert len({r["job_id"] for r in replies}) == 64
    assert sorted(r["queue_position"] for r in replies) == list(range(1, 65))
