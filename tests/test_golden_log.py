"""A checked-in history replays to its known state, and tampering with it is caught.

``tests/golden/events.db`` is written by ``tools/make_golden_log.py`` (its docstring tells
the story); ``expected_state.json`` is what the live actors held when it was written.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest

from eventq import events as ev
from eventq import gpus, replay
from eventq.log import EventLog
from eventq.server import Orchestrator

GOLDEN = Path(__file__).parent / "golden"
LOG = GOLDEN / "events.db"
EVENTQ = Path(sys.executable).with_name("eventq")


def known_state(folded: replay.Folded) -> dict[str, Any]:
    """Jobs, GPU holdings, limits and queue order, in the shape of expected_state.json."""
    state = folded.scheduler
    return {
        "last_seq": folded.last_seq,
        "jobs": {job_id: {"status": j.status, "attempt": j.attempt, "gpus": j.spec.gpus,
                          "allocated_gpus": list(j.gpus) if j.active else [],
                          "exit_code": j.exit_code, "error": j.error,
                          "reasons": [r.code for r in j.reasons]}
                 for job_id, j in sorted(state.jobs.items())},
        "gpus": {node: {str(g): f"{h[0]}#{h[1]}" for g, h in sorted(n.held.items())}
                 for node, n in sorted(folded.gpus.nodes.items())},
        "limits": msgspec.to_builtins(state.limits),
        "queue": [j.spec.job_id for j in state.iter_waiting(folded.last_time)],
        "running": state.counts.total,
    }


def read_only(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True)


def verify(path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(EVENTQ), "replay", "verify", "--log", str(path), *extra],
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture
def tampered(tmp_path: Path) -> tuple[Path, int]:
    """A copy in which one byte of one job_submitted body is changed (bob becomes cob)."""
    copy = tmp_path / "events.db"
    shutil.copyfile(LOG, copy)
    with sqlite3.connect(copy) as conn:
        seq, body = conn.execute("SELECT seq, body FROM events WHERE type = 'job_submitted' "
                                 "AND job_id = 'golden-d'").fetchone()
        changed = body.replace(b"bob", b"cob", 1)
        assert sum(a != b for a, b in zip(body, changed, strict=True)) == 1
        conn.execute("UPDATE events SET body = ? WHERE seq = ?", (changed, seq))
    conn.close()
    return copy, seq


def test_replaying_the_golden_log_gives_the_known_state() -> None:
    expected = json.loads((GOLDEN / "expected_state.json").read_text())
    with read_only(LOG) as conn:
        folded = replay.fold(conn)
    conn.close()
    assert known_state(folded) == expected
    assert folded.invariants.problems == []


def test_the_version_0_row_decodes_with_its_gpus() -> None:
    with read_only(LOG) as conn:
        rows = conn.execute("SELECT seq, type, job_id, body FROM events WHERE v = 0").fetchall()
        (seq, type_, job_id, body), = rows
        folded = replay.fold(conn)
    conn.close()
    assert type_ == "job_submitted"
    stored = msgspec.msgpack.decode(body)
    assert stored["job"]["num_processes"] == 2 and "gpus" not in stored["job"]
    event = ev.decode(body, 0)
    assert isinstance(event, ev.JobSubmitted)
    assert event.job.job_id == job_id and event.job.gpus == 2
    # And the job it describes ran on two GPUs.
    assert folded.scheduler.jobs[job_id].spec.gpus == 2
    assert folded.scheduler.jobs[job_id].gpus == (0, 1)
    assert seq < folded.last_seq


def test_verify_passes_on_the_golden_log() -> None:
    text = verify(LOG)
    assert text.returncode == 0, text.stdout + text.stderr
    assert "OK: 62 events" in text.stdout
    as_json = verify(LOG, "--format", "json")
    assert as_json.returncode == 0
    # Written before heads were anchored: no key, no checkpoint, so the chain is verified
    # whole from seq 1 and nothing vouches for its end.
    assert json.loads(as_json.stdout) == {"ok": True, "events": 62, "problems": [],
                                          "anchor": "unkeyed"}


def test_verify_names_the_first_row_that_was_changed(tampered: tuple[Path, int]) -> None:
    path, seq = tampered
    text = verify(path)
    assert text.returncode != 0
    assert f"first bad seq {seq}" in text.stdout
    as_json = verify(path, "--format", "json")
    assert as_json.returncode != 0
    report = json.loads(as_json.stdout)
    assert report["ok"] is False and report["first_bad_seq"] == seq


#: Written by ``eventq server --gpus 4xA100-80GB`` before a new log recorded its server's
#: limits: three ``eventq jobs submit --gpus 2 --no-export-env`` (``first`` ran, ``second``
#: and ``third`` waited for the local job limit, 1 then), the server stopped with SIGTERM.
UNRECORDED = GOLDEN / "unrecorded_limits"


def test_a_log_that_never_recorded_limits_replays_under_the_limits_it_ran_with() -> None:
    with read_only(UNRECORDED / "events.db") as conn:
        folded = replay.fold(conn)
    conn.close()
    state = folded.scheduler
    assert state.limits == ev.UNRECORDED_LIMITS
    assert msgspec.to_builtins(state.limits) == {
        "max_concurrent": 5, "user_max_concurrent": 2, "team_max_concurrent": 10,
        "enable_fair_share": False, "local_job_max_concurrent": 1,
        "local_gpu_max_concurrent": None, "starvation_threshold_minutes": 60.0,
        "aging_boost": 10, "gpu_busy_memory_percent": 20.0}
    assert [(j.spec.name, j.status, [r.code for r in j.reasons])
            for j in state.jobs.values()] == [("first", "running", []),
                                               ("second", "pending", ["local_limit"]),
                                               ("third", "pending", ["local_limit"])]
    assert folded.invariants.problems == []


def test_every_stored_limits_event_says_its_local_job_limit() -> None:
    """Limits are encoded whole, defaults too: what a stored LimitsChanged means does not
    depend on the defaults of the code that reads it."""
    with read_only(LOG) as conn:
        bodies = [body for (body,) in conn.execute(
            "SELECT body FROM events WHERE type = 'limits_changed'")]
    conn.close()
    assert bodies
    for body in bodies:
        assert msgspec.msgpack.decode(body)["limits"]["local_job_max_concurrent"] == 10
    written = msgspec.msgpack.decode(ev.encode(ev.LimitsChanged(limits=ev.Limits())))
    assert set(written["limits"]) == set(ev.Limits.__struct_fields__)
    assert written["limits"]["local_job_max_concurrent"] is None


async def test_a_start_folds_the_same_read_models_with_the_chain_hashed_here_or_aside(
        tmp_path: Path) -> None:
    """A large start folds its records without their hashes (``eventq.log.UNHASHED``), while
    a second process checks the chain: every read model the server keeps must come out the
    same as from records that carry them, or a large start would rebuild another state."""
    folded = []
    for aside in (False, True):
        data = tmp_path / ("aside" if aside else "here")
        data.mkdir()
        shutil.copyfile(LOG, data / "events.db")
        orch = Orchestrator(data, gpus.simulated("4xA100-80GB"))
        orch.log = await EventLog.open(data / "events.db", orch.clock.now)
        orch.log.aside_from_rows = 1 if aside else 2**63
        orch._assemble()  # the server's read models, subscribed as a start subscribes them
        with orch.state.replaying():
            assert orch.log.replay() == 62
        folded.append((orch.state.snapshot(), orch.gpu_table, orch.users, orch.workers,
                       orch.sessions, orch.history.snapshots, orch.history.finished,
                       orch.history.bars, orch.history.now(), orch.notifications.owed,
                       orch.queue.waits, orch.requests))
        await orch.log.close()
    assert folded[0] == folded[1]
