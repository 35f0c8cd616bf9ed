"""The lines an operator reads, from the records of one commit: many requests grouped in a
commit keep a line each; one request that records a thousand jobs is one line."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest

from eventq import events as ev
from eventq import serverlog
from eventq.actionlog import BULK, ActionLog
from eventq.actors.scheduler_state import SchedulerState
from eventq.actors.workers_state import Workers
from eventq.log import Record

COUNT = 3 * BULK


@pytest.fixture(autouse=True)
def json_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    """As ``--log-format json`` sets them, without reconfiguring structlog for the tests
    that follow."""
    monkeypatch.setattr(serverlog, "_format", "json")


def submitted(seq: int, time: float, principal: str) -> Record:
    job = ev.JobSpec(job_id=f"{seq:012x}", user=principal.removeprefix("user:"), priority=10,
                     command=["true"])
    return Record(seq, time, principal, ev.JobSubmitted(job=job), b"")


def written(records: list[Record]) -> list[dict[str, Any]]:
    out = io.StringIO()
    ActionLog(SchedulerState(), Workers(), out).on_durable(records)
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_requests_grouped_in_one_commit_keep_a_line_each() -> None:
    lines = written([submitted(seq, 1000.0 + seq / 1e4, f"user:u{seq % 3}")
                     for seq in range(1, COUNT + 1)])
    assert [line["job_id"] for line in lines] == [f"{seq:012x}" for seq in range(1, COUNT + 1)]
    assert lines[0]["timestamp"] == "1970-01-01T00:16:40.000100Z"
    assert lines[0]["user"] == "u1" and lines[0]["by"] == "user:u1"


def test_one_request_of_many_jobs_is_one_line_and_its_neighbours_keep_theirs() -> None:
    alone = submitted(1, 999.0, "user:bob")
    batch = [submitted(seq, 1000.0, "user:alice") for seq in range(2, COUNT + 2)]
    lines = written([alone, *batch, submitted(COUNT + 2, 1001.0, "user:alice")])
    assert [(line["event"], line.get("job_id"), line.get("count")) for line in lines] == [
        ("job_submitted", f"{1:012x}", None),
        ("job_submitted", None, COUNT),
        ("job_submitted", f"{COUNT + 2:012x}", None)]
    assert (lines[1]["first_job_id"], lines[1]["last_job_id"]) == (
        f"{2:012x}", f"{COUNT + 1:012x}")
