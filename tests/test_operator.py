"""An operator's view of a real ``eventq server``: a line per action, metrics for Prometheus,
and a stop as systemd makes it.

Each story runs the server as a process, reads what it wrote (``--log-format json``: every
line a JSON object), and looks for the fields an operator greps for: what happened, to
which job, whose, where, how it ended, and who was refused, never with the token itself.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from eventq.runner import is_ours
from tests.cluster import Cluster, Server, gone, wait_for
from tests.serverproc import refused_start

pytestmark = pytest.mark.slow
JSON_LOGS = ("--log-format", "json")
#: What Prometheus 2 and 3 send when they scrape.
PROMETHEUS_ACCEPT = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
                     "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1")


def lines(server: Server) -> list[dict[str, Any]]:
    """Every line the server wrote (stdout and stderr), each parsed as JSON."""
    return [json.loads(line) for line in server.output().splitlines()]


def actions(server: Server, event: str, **match: Any) -> list[dict[str, Any]]:
    return [line for line in lines(server) if line["event"] == event
            and all(line.get(k) == v for k, v in match.items())]


def seen(server: Server, event: str, **match: Any) -> dict[str, Any]:
    """Wait for the one line of ``event`` with these fields."""
    return wait_for(lambda: (found := actions(server, event, **match)) and found[0],
                    f"a {event} line with {match}")


def fetch(url: str, token: str | None = None,
          accept: str | None = None) -> tuple[int, str, str]:
    """(status, content type, body), refusals included."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if accept:
        headers["Accept"] = accept
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                    timeout=10) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.headers["Content-Type"], exc.read().decode()


def add_user(server: Server, name: str, level: str) -> str:
    reply = server.call("POST", "/api/admin/users", {"name": name, "level": level})
    return str(reply["token"])


def submit_as(server: Server, token: str, command: str, **more: Any) -> str:
    request = urllib.request.Request(
        server.url + "/api/queue/submit", method="POST",
        data=json.dumps({"command": command, "gpus": 0, "target": "local", **more}).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as resp:
        return str(json.loads(resp.read())["job_id"])


def test_each_action_is_one_json_line_with_what_an_operator_greps_for(
        cluster: Cluster, tmp_path: Path) -> None:
    server = cluster.server(args=JSON_LOGS)
    listening = seen(server, "listening")
    assert listening["url"] == server.url
    assert listening["gpus"] == 1 and listening["simulated"] is True
    alice = add_user(server, "alice", "researcher")

    done = submit_as(server, alice, "true")
    failing = submit_as(server, alice, "exit 3", retry_on_failure=True, max_attempts=2)
    seen(server, "job_completed", job_id=done)
    seen(server, "job_failed", job_id=failing)
    stuck = submit_as(server, alice, f"touch {tmp_path}/started; sleep 60")
    wait_for(lambda: (tmp_path / "started").exists(), "the long job to start")
    server.call("POST", f"/api/queue/{stuck}/cancel")
    seen(server, "attempt_ended", job_id=stuck)

    by_kind = Counter((line["event"], line.get("job_id"), line.get("attempt"))
                      for line in lines(server) if line.get("job_id"))
    assert by_kind[("job_submitted", done, None)] == 1
    for kind in ("attempt_dispatched", "attempt_started", "attempt_ended"):
        assert by_kind[(kind, done, 1)] == 1
        assert by_kind[(kind, failing, 1)] == by_kind[(kind, failing, 2)] == 1
    assert by_kind[("job_completed", done, None)] == 1
    assert by_kind[("job_requeued", failing, None)] == 1
    assert by_kind[("job_cancelled", stuck, None)] == 1

    exit_line = actions(server, "attempt_ended", job_id=failing, attempt=2)[0]
    assert exit_line["level"] == "info" and exit_line["user"] == "alice"
    assert (exit_line["node"], exit_line["gpus"], exit_line["outcome"],
            exit_line["exit_code"]) == ("local", [], "exited", 3)
    assert actions(server, "job_failed", job_id=failing)[0]["level"] == "warning"
    assert actions(server, "job_requeued", job_id=failing)[0]["next_attempt"] == 2
    cancel = actions(server, "job_cancelled", job_id=stuck)[0]
    assert cancel["by"] == "user:admin" and cancel["user"] == "alice"
    assert actions(server, "attempt_ended", job_id=stuck)[0]["outcome"] == "cancelled"
    for line in lines(server):
        assert {"timestamp", "level", "event"} <= line.keys()


def test_a_set_of_jobs_is_one_line_not_one_per_job(cluster: Cluster) -> None:
    server = cluster.server(args=JSON_LOGS)
    reply = server.call("POST", "/api/queue/batch", {"jobs": [
        {"command": f"echo {i}", "gpus": 0, "target": "worker"} for i in range(100)]})
    submitted = actions(server, "job_submitted")
    assert len(submitted) == 1
    assert (submitted[0]["count"], submitted[0]["first_job_id"],
            submitted[0]["last_job_id"], submitted[0]["by"]) == (
        100, reply["job_ids"][0], reply["job_ids"][-1], "user:admin")
    one = server.submit("true")
    assert len(actions(server, "job_submitted", job_id=one)) == 1


def test_a_refused_token_is_logged_with_its_route_and_peer_but_never_its_value(
        cluster: Cluster) -> None:
    server = cluster.server(args=JSON_LOGS)
    viewer = add_user(server, "vic", "viewer")
    forged = "eq_" + "forged-token-value-" * 2

    assert fetch(server.url + "/api/queue", forged)[0] == 401
    assert fetch(server.url + "/api/admin/users", viewer)[0] == 403
    assert fetch(server.url + "/api/workers/queue?worker_id=w_1", None)[0] == 401

    unknown = seen(server, "request_refused", path="/api/queue")
    assert (unknown["status"], unknown["level"], unknown["method"], unknown["route"],
            unknown["peer"], unknown["user"]) == (401, "warning", "GET", "/api/queue",
                                                  "127.0.0.1", None)
    assert unknown["reason"] == "invalid or revoked token"
    role = seen(server, "request_refused", path="/api/admin/users")
    assert (role["status"], role["user"]) == (403, "vic")
    assert seen(server, "request_refused", path="/api/workers/queue")["status"] == 401
    written = server.output()
    assert forged not in written and viewer not in written and server.token not in written


def test_a_worker_connected_lost_and_removed_is_a_line_each(cluster: Cluster) -> None:
    server = cluster.server(args=JSON_LOGS)
    worker = cluster.worker(server, "gpu-box-1")
    connected = seen(server, "worker_connected", worker_id=worker.worker_id)
    assert (connected["worker"], connected["transport"]) == ("gpu-box-1", "ws")
    job = server.submit("sleep 60")
    seen(server, "attempt_started", job_id=job)

    worker.kill9()
    lost = seen(server, "worker_lost", worker_id=worker.worker_id)
    assert lost["level"] == "warning" and lost["reason"].startswith("no heartbeat")
    ended = seen(server, "attempt_ended", job_id=job)
    assert (ended["outcome"], ended["node"], ended["worker"], ended["gpus"]) == (
        "lost", worker.worker_id, "gpu-box-1", [0])
    seen(server, "job_requeued", job_id=job)
    server.call("DELETE", f"/api/admin/workers/{worker.worker_id}")
    removed = seen(server, "worker_removed", worker_id=worker.worker_id)
    assert removed["worker"] == "gpu-box-1" and removed["by"] == "user:admin"
    assert len(actions(server, "worker_lost", worker_id=worker.worker_id)) == 1


def test_prometheus_scrapes_the_metrics_listener_without_a_token(cluster: Cluster) -> None:
    server = cluster.server(args=(*JSON_LOGS, "--metrics-listen", "127.0.0.1:0"))
    metrics_url = json.loads((server.data / "server.json").read_text())["metrics_url"]
    assert seen(server, "listening")["metrics_url"] == metrics_url
    server.call("POST", "/api/queue/submit", {"command": "true", "gpus": 0, "target": "local"})

    status, kind, body = fetch(metrics_url)
    assert status == 200 and kind.startswith("text/plain; version=0.0.4")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(body) for s in family.samples}
    assert samples[("eventq_gpus", (("node", "local"),))] == 1
    assert samples[("eventq_jobs", (("status", "waiting"),))] == 0

    status, kind, body = fetch(metrics_url, accept=PROMETHEUS_ACCEPT)
    assert status == 200 and kind.startswith("application/openmetrics-text; version=1.0.0")
    names = {family.name for family in openmetrics_families(body)}
    assert {"eventq_jobs", "eventq_gpus", "eventq_dispatch_latency_seconds"} <= names

    status, kind, body = fetch(metrics_url.removesuffix("/metrics") + "/api/queue",
                               server.token)
    assert status == 404 and json.loads(body)["error"] == "this address serves only GET /metrics"
    assert fetch(server.url + "/metrics")[0] == 401
    scraper = add_user(server, "prometheus", "viewer")
    assert fetch(server.url + "/metrics", scraper)[0] == 200


def test_metrics_public_opens_metrics_and_nothing_else(cluster: Cluster) -> None:
    server = cluster.server(args=("--metrics-public",))
    status, _, body = fetch(server.url + "/metrics")
    assert status == 200 and "eventq_queue_depth" in body
    assert fetch(server.url + "/api/queue")[0] == 401
    assert fetch(server.url + "/api/openapi.json")[0] == 200


def test_a_metrics_address_that_is_not_host_and_port_is_refused(tmp_path: Path) -> None:
    refusal = refused_start(tmp_path / "data", tmp_path / "err", "--metrics-listen", "9101")
    assert refusal.code == 2
    assert "'9101' is not HOST:PORT" in refusal.stderr[-1]
    assert not (tmp_path / "data").exists()


def test_a_metrics_address_taken_stops_the_start_in_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        refusal = refused_start(tmp_path / "data", tmp_path / "err",
                                "--metrics-listen", f"127.0.0.1:{port}")
    assert refusal.code == 2
    assert refusal.stderr[-1].startswith(f"eventq: cannot listen on 127.0.0.1:{port} (")
    assert "address already in use" in refusal.stderr[-1].lower()
    assert not any("Traceback" in line for line in refusal.stderr)
    assert not (tmp_path / "data" / "server.json").exists()


def test_sigterm_to_the_main_process_only_leaves_jobs_running_for_the_next_start(
        cluster: Cluster, tmp_path: Path) -> None:
    """What systemd does with KillMode=process (docs/operations.md): the job outlives the
    stop, the next start adopts it, and it runs once."""
    server = cluster.server()
    release = tmp_path / "release"
    job = server.call("POST", "/api/queue/submit", {
        "command": f"while [ ! -e {release} ]; do sleep 0.05; done", "gpus": 1,
        "target": "local"})["job_id"]
    server.wait_job(job, "running")
    directory = server.data / "jobs" / job / "1"
    pid = int((directory / "pid").read_text())

    assert server.proc is not None
    server.proc.send_signal(signal.SIGTERM)  # the main process only, as systemd would
    assert server.proc.wait(timeout=30) == 0
    assert not gone(pid) and is_ours(pid, directory)
    server.start()
    recovered = [line for line in server.output().splitlines() if "] recovered " in line]
    assert len(recovered) == 2 and "adopted=1 " in recovered[-1]
    release.touch()
    finished = server.wait_job(job, "completed")
    assert finished["attempt"] == 1
    started = [e["body"] for e in server.call("GET", f"/api/jobs/{job}/events")["events"]
               if e["type"] == "attempt_started"]
    assert started == [{"job_id": job, "attempt": 1, "pid": pid, "adopted": False},
                       {"job_id": job, "attempt": 1, "pid": pid, "adopted": True}]
    wait_for(lambda: gone(pid), "the job's process to end")
    assert os.path.exists(directory / "exit")
