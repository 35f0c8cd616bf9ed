"""Bad requests get a 4xx that names the field at fault, and nothing is recorded.

Every case is sent to a real server on loopback (4 simulated GPUs). Whatever the
input, the answer is a JSON error, never a 500, and the log's head does not move.
"""

from __future__ import annotations

import io
import json as jsonlib
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eventq.events import Level
from eventq.server import Orchestrator

OK = {"command": ["true"], "gpus": 0}


def job(**fields: Any) -> dict[str, Any]:
    return {**OK, **fields}


def sendable(json: Any, data: bytes | None) -> io.BytesIO | None:
    """A body of any size (aiohttp warns of large ``bytes``, and fails the test)."""
    if json is not None:
        data = jsonlib.dumps(json).encode()
    return io.BytesIO(data) if data is not None else None


async def assert_refused(api: TestClient[Any, Any], orch: Orchestrator, method: str, path: str,
                         status: int, field: str | None, *, json: Any = None,
                         data: bytes | None = None,
                         headers: dict[str, str] | None = None) -> dict[str, Any]:
    """Send one bad request; it is refused with ``status`` naming ``field``; nothing recorded."""
    await orch.log.flush()
    seq, jobs = orch.log.head_seq, len(orch.state.jobs)
    resp = await api.request(method, path, data=sendable(json, data), headers=headers)
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert isinstance(body["error"], str) and body["error"]
    assert body.get("field") == field, body
    assert orch.log.head_seq == seq and len(orch.state.jobs) == jobs
    return body  # type: ignore[no-any-return]


SUBMIT_CASES = [
    pytest.param(job(gpus="two"), "gpus", id="gpus-not-a-number"),
    pytest.param(job(gpus=1.5), "gpus", id="gpus-fraction"),
    pytest.param(job(gpus=-1), "gpus", id="negative-gpus"),
    pytest.param(job(gpus=5), "gpus", id="more-gpus-than-the-node"),
    pytest.param(job(gpus=10**30), "gpus", id="absurd-gpus"),
    pytest.param(job(gpus=10**30, target="worker"), "gpus", id="absurd-gpus-for-a-worker"),
    pytest.param(job(num_processes=-2), "num_processes", id="negative-num-processes"),
    pytest.param(job(gpus=2, num_processes=1), "gpus", id="gpus-and-num-processes-disagree"),
    pytest.param(job(colour="blue"), "colour", id="unknown-field"),
    pytest.param(job(gpus=1, device_ids=[7]), "device_ids", id="device-id-out-of-range"),
    pytest.param(job(gpus=1, device_ids=[-1]), "device_ids", id="negative-device-id"),
    pytest.param(job(gpus=1, device_ids=[0, 1]), "device_ids", id="device-ids-count"),
    pytest.param(job(command=""), "command", id="empty-command-string"),
    pytest.param(job(command=[]), "command", id="empty-command-list"),
    pytest.param(job(command=["", "train.py"]), "command", id="empty-program"),
    pytest.param(job(command=5), "command", id="command-not-text"),
    pytest.param({"gpus": 0}, "command", id="no-command"),
    pytest.param(job(target="mars"), "target", id="unknown-target"),
    pytest.param(job(max_attempts=0), "max_attempts", id="zero-attempts"),
    pytest.param(job(max_runtime=-5), "max_runtime", id="negative-runtime"),
    pytest.param(job(env={"A": 1}), "env", id="env-value-not-text"),
    pytest.param(job(metadata=[1, 2]), "metadata", id="metadata-not-an-object"),
    pytest.param(job(metadata={"steps": 10**30}), "metadata", id="metadata-number-too-big"),
    pytest.param(job(config={"steps": 10**30}), "config", id="config-number-too-big"),
    pytest.param(job(metadata={"steps": 10**30}, dry_run=True), "metadata",
                 id="metadata-number-too-big-in-a-dry-run"),
    pytest.param(job(name="x" * 201), "name", id="name-too-long"),
    pytest.param(job(cwd="/no/such/directory"), "cwd", id="missing-cwd"),
    pytest.param(job(priority_override="high"), "priority_override", id="override-not-a-number"),
    pytest.param(job(command=["echo", "a\x00b"]), "command", id="nul-in-command"),
    pytest.param(job(command="echo a\x00b"), "command", id="nul-in-command-string"),
    pytest.param(job(env={"A": "a\x00b"}), "env", id="nul-in-env"),
    pytest.param(job(env={"A=B": "x"}), "env", id="equals-sign-in-env-name"),
    pytest.param(job(name="a\x00b"), "name", id="nul-in-name"),
    pytest.param(job(name="red \x1b[31m"), "name", id="escape-sequence-in-name"),
    pytest.param(job(metadata={"blob": "x" * 10_000_000}), "metadata", id="ten-mb-metadata"),
    pytest.param(job(metadata={"blob": "x" * 65_537}), "metadata", id="metadata-past-64-kib"),
    pytest.param(job(config={"blob": "x" * 262_145}), "config", id="config-past-256-kib"),
    pytest.param(job(command=["echo", "x" * 131_073]), "command", id="word-past-128-kib"),
    pytest.param(job(command="x" * 131_073), "command", id="shell-line-past-128-kib"),
    pytest.param(job(command=["echo"] * 4097), "command", id="more-than-4096-words"),
    pytest.param(job(command=["x" * 100_000] * 3), "command", id="words-past-256-ki-in-all"),
    pytest.param(job(env={f"V{i}": "" for i in range(4097)}), "env", id="more-than-4096-vars"),
    pytest.param(job(env={"A": "x" * 131_073}), "env", id="env-value-past-128-kib"),
    pytest.param(job(env={"V" * 1025: "x"}), "env", id="env-name-past-1024"),
    pytest.param(job(env={f"V{i}": "x" * 100_000 for i in range(21)}), "env",
                 id="env-past-2-mib-in-all"),
    pytest.param(job(cwd="/" + "d" * 4096), "cwd", id="cwd-past-path-max"),
    pytest.param(job(team="t" * 65), "team", id="team-too-long"),
    pytest.param(job(team="a\nb"), "team", id="newline-in-team"),
    pytest.param(job(config_name="c" * 256), "config_name", id="config-name-too-long"),
    pytest.param(job(worker_labels={f"k{i}": "*" for i in range(65)}), "worker_labels",
                 id="more-than-64-labels"),
    pytest.param(job(worker_labels={"gpu": "a" * 257}), "worker_labels", id="label-too-long"),
    pytest.param(job(depends_on=["n" * 201]), "depends_on", id="dependency-name-too-long"),
    pytest.param(job(begin_at=1e15), "begin_at", id="begin-after-year-9999"),
    pytest.param(job(begin_at=-1.0), "begin_at", id="begin-before-1970"),
    pytest.param(job(begin_at="2026-01-01" + " " * 100), "begin_at", id="begin-text-too-long"),
    pytest.param(job(max_runtime=1e300), "max_runtime", id="runtime-past-a-year"),
    pytest.param(job(estimated_runtime=1e300), "estimated_runtime", id="estimate-past-a-year"),
    pytest.param(job(estimated_cost=1e300), "estimated_cost", id="absurd-cost"),
    pytest.param(job(gpus=1, any_gpu=True, device_ids=list(range(4097))), "device_ids",
                 id="more-device-ids-than-gpus-exist"),
]


@pytest.mark.parametrize(("body", "field"), SUBMIT_CASES)
async def test_a_bad_submission_names_its_field(api: TestClient[Any, Any], orch: Orchestrator,
                                                body: dict[str, Any], field: str) -> None:
    await assert_refused(api, orch, "POST", "/api/queue/submit", 422, field, json=body)


def nested(depth: int) -> bytes:
    """A JSON object ``depth`` levels deep, written as text (an encoder would recurse)."""
    return b'{"a":' * depth + b"1" + b"}" * depth


def raw_job(field: str, value: bytes) -> bytes:
    """A job for workers (none is connected): once accepted, nothing more is recorded."""
    return (b'{"command": ["true"], "gpus": 0, "target": "worker", "' + field.encode() + b'": '
            + value + b"}")


@pytest.mark.parametrize(("path", "raw"), [
    pytest.param("/api/queue/submit", raw_job("metadata", nested(1_000)), id="metadata"),
    pytest.param("/api/queue/submit", raw_job("config", nested(1_000)), id="config"),
    pytest.param("/api/queue/submit", raw_job("metadata", nested(100_000)), id="100000-deep"),
    pytest.param("/api/queue/submit",
                 raw_job("metadata", b"{\"a\": " + b"[" * 5_000 + b"]" * 5_000 + b"}"),
                 id="arrays"),
    pytest.param("/api/queue/batch",
                 b'{"jobs": [' + raw_job("metadata", nested(1_000)) + b"]}", id="batch"),
])
async def test_json_nested_a_thousand_deep_is_refused_not_a_server_error(
        api: TestClient[Any, Any], orch: Orchestrator, path: str, raw: bytes) -> None:
    body = await assert_refused(api, orch, "POST", path, 422, None, data=raw)
    assert "nested too deeply" in body["error"]


@pytest.mark.parametrize("field", ["metadata", "config"])
async def test_free_json_nests_at_most_32_levels(api: TestClient[Any, Any], orch: Orchestrator,
                                                 field: str) -> None:
    """Deep enough for any real use, and far from what the decoders can read back."""
    ok = await api.post("/api/queue/submit", data=sendable(None, raw_job(field, nested(32))))
    assert ok.status == 200, await ok.text()
    body = await assert_refused(api, orch, "POST", "/api/queue/submit", 422, field,
                                data=raw_job(field, nested(33)))
    assert "32 levels" in body["error"]


@pytest.mark.parametrize(("body", "limit"), [
    (job(metadata={"blob": "x" * 70_000}), "65536"),
    (job(command=["echo", "x" * 131_073]), "131072"),
    (job(env={f"V{i}": "x" * 100_000 for i in range(21)}), "2097152"),
    (job(name="n" * 201), "200"),
])
async def test_a_refusal_says_the_limit(api: TestClient[Any, Any], orch: Orchestrator,
                                        body: dict[str, Any], limit: str) -> None:
    refused = await api.post("/api/queue/submit", data=sendable(body, None))
    assert refused.status == 422 and limit in (await refused.json())["error"]


async def test_a_submission_at_every_limit_is_accepted(api: TestClient[Any, Any],
                                                       orch: Orchestrator) -> None:
    """The limits refuse only what no real job needs: one at each of them is taken whole."""
    deep: Any = {"k": "v"}
    for _ in range(30):  # 31 levels, and metadata itself the 32nd
        deep = {"k": deep}
    biggest = job(
        name="é" * 200, command=["w" * 64] * 4096, team="t" * 64, config_name=None,
        env={f"V{i:04}": "x" * 500 for i in range(4096)},
        metadata={"deep": deep, "blob": "m" * 65_000}, config={"blob": "c" * 262_000},
        worker_labels={f"k{i}": "g" * 256 for i in range(64)}, target="worker",
        begin_at="9999-12-31T23:59:59", max_runtime=31_622_400, estimated_cost=1e12)
    resp = await api.post("/api/queue/submit", data=sendable(biggest, None))
    assert resp.status == 200, (await resp.text())[:500]
    shown = await (await api.get(f"/api/jobs/{(await resp.json())['job_id']}")).json()
    assert shown["metadata"]["deep"] == deep and shown["name"] == "é" * 200


async def test_a_batch_names_the_row_whose_name_has_a_control_character(
        api: TestClient[Any, Any], orch: Orchestrator) -> None:
    body = await assert_refused(api, orch, "POST", "/api/queue/batch", 422, "jobs", json={
        "jobs": [job(name="fine"), job(name="bell\x07"), job(name="also fine")]})
    assert body["detail"] == ["row 2: name must not contain control characters"], body


@pytest.mark.parametrize("raw", [b"{not json", b"\xff\xfe", b'{"command": ["true"]'])
async def test_a_body_that_is_not_json_is_refused(api: TestClient[Any, Any], orch: Orchestrator,
                                                  raw: bytes) -> None:
    body = await assert_refused(api, orch, "POST", "/api/queue/submit", 422, None, data=raw)
    assert "JSON" in body["error"]


@pytest.mark.parametrize("raw", [b"[1, 2]", b"null", b'"true"'])
async def test_a_body_that_is_not_an_object_is_refused(api: TestClient[Any, Any],
                                                       orch: Orchestrator, raw: bytes) -> None:
    body = await assert_refused(api, orch, "POST", "/api/queue/submit", 422, None, data=raw)
    assert "object" in str(body.get("detail")) + body["error"]


LIMIT_CASES = [
    pytest.param({"max_concurrent": 0}, "max_concurrent", id="zero"),
    pytest.param({"user_max_concurrent": -1}, "user_max_concurrent", id="negative"),
    pytest.param({"local_gpu_max_concurrent": 0}, "local_gpu_max_concurrent", id="zero-gpus"),
    pytest.param({"max_concurrent": "6"}, "max_concurrent", id="text"),
    pytest.param({"enable_fair_share": "yes"}, "enable_fair_share", id="not-a-bool"),
    pytest.param({"starvation_threshold_minutes": 0}, "starvation_threshold_minutes",
                 id="zero-threshold"),
    pytest.param({"max_concurent": 3}, "max_concurent", id="unknown-field"),
    # Aging divides by the threshold: 5e-324 minutes made every later pass overflow.
    pytest.param({"starvation_threshold_minutes": 5e-324}, "starvation_threshold_minutes",
                 id="threshold-so-small-that-aging-overflows"),
]


@pytest.mark.parametrize(("body", "field"), LIMIT_CASES)
async def test_bad_limits_name_their_field(api: TestClient[Any, Any], orch: Orchestrator,
                                           body: dict[str, Any], field: str) -> None:
    before = await (await api.get("/api/queue/concurrency")).json()
    await assert_refused(api, orch, "POST", "/api/queue/concurrency", 422, field, json=body)
    assert await (await api.get("/api/queue/concurrency")).json() == before


async def test_a_limit_beyond_any_number_names_its_field(api: TestClient[Any, Any],
                                                        orch: Orchestrator) -> None:
    await assert_refused(api, orch, "POST", "/api/queue/concurrency", 422, "max_concurrent",
                         data=b'{"max_concurrent": 1e400}')


@pytest.mark.parametrize(("query", "field"), [
    ("/api/queue?limit=abc", "limit"), ("/api/queue?limit=0", "limit"),
    ("/api/queue?limit=-3", "limit"), ("/api/queue?limit=99999999999999999999999", "limit"),
    ("/api/queue?limit=1.5", "limit"),
    ("/api/queue?include_completed=2", "include_completed"),
    ("/api/system/status?include_allocation=", "include_allocation"),
    ("/api/system/status?include_allocation=please", "include_allocation"),
    # Python's int() takes these; the document's integer does not.
    ("/api/queue?limit=+5", "limit"), ("/api/queue?limit=1_0", "limit"),
    ("/api/queue?limit=%D9%A3", "limit"),
    # Past what the log can hold: the stream used to open, then break.
    ("/api/events/stream?after=24494757180470421207646208", "after"),
    ("/api/events/stream?after=1_000", "after"),
])
async def test_bad_query_parameters_name_their_field(api: TestClient[Any, Any],
                                                     orch: Orchestrator, query: str,
                                                     field: str) -> None:
    await assert_refused(api, orch, "GET", query, 422, field)


@pytest.mark.parametrize("seq", ["+5", "5.0", "1" * 19, "-1"])
async def test_a_bad_last_event_id_is_refused_before_the_stream_opens(
        api: TestClient[Any, Any], orch: Orchestrator, seq: str) -> None:
    await assert_refused(api, orch, "GET", "/api/events/stream", 422, "Last-Event-ID",
                         headers={"Last-Event-ID": seq})


async def test_a_flag_is_true_or_false_and_nothing_else(api: TestClient[Any, Any],
                                                        orch: Orchestrator) -> None:
    """What the document says a boolean is: a worker is not removed by ``force=-5``."""
    worker = await (await api.post("/api/admin/workers", json={"name": "w"})).json()
    await assert_refused(api, orch, "DELETE", f"/api/admin/workers/{worker['worker_id']}"
                                              "?force=-5", 422, "force")
    for spelled in ("true", "True", "false"):
        resp = await api.get(f"/api/system/status?include_allocation={spelled}")
        assert resp.status == 200
        assert ("gpu_allocation" in await resp.json()) == (spelled.lower() == "true")


async def test_who_may_do_what_is_answered_with_the_right_status(
        api: TestClient[Any, Any], orch: Orchestrator) -> None:
    researcher = {"Authorization": f"Bearer {orch.add_user('rae', Level.RESEARCHER)}"}
    await assert_refused(api, orch, "POST", "/api/queue/submit", 401, None, json=OK,
                         headers={"Authorization": "Bearer not-a-token"})
    await assert_refused(api, orch, "POST", "/api/queue/concurrency", 403, None,
                         json={"max_concurrent": 3}, headers=researcher)
    await assert_refused(api, orch, "POST", "/api/queue/submit", 403, "priority_override",
                         json=job(priority_override=50), headers=researcher)
    await assert_refused(api, orch, "GET", "/api/jobs/nope", 404, None)
    await assert_refused(api, orch, "POST", "/api/queue/nope/cancel", 404, None)


SUBMIT_FIELDS = ["command", "config", "config_name", "name", "gpus", "num_processes",
                 "device_ids", "any_gpu", "no_wait", "worker_labels", "priority_override",
                 "max_attempts", "max_runtime", "estimated_runtime", "retry_on_failure", "env",
                 "cwd", "metadata", "team", "bogus"]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                max_size=3),
    max_leaves=6)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fields=st.dictionaries(st.sampled_from(SUBMIT_FIELDS), json_values, max_size=5))
async def test_no_submission_is_answered_with_a_server_error(
        api: TestClient[Any, Any], orch: Orchestrator, fields: dict[str, Any]) -> None:
    # target "worker": with no worker connected, nothing that is accepted runs here.
    body = {"command": ["true"], **fields, "target": "worker"}
    await orch.log.flush()
    seq = orch.log.head_seq
    resp = await api.post("/api/queue/submit", json=body)
    assert resp.status in (200, 403, 409, 422), await resp.text()
    reply = await resp.json()
    if resp.status != 200:
        assert orch.log.head_seq == seq
        assert isinstance(reply.get("field"), str), reply
