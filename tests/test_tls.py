"""Transport security between machines: real TLS on loopback, certificates made here.

``eventq server --tls-cert/--tls-key`` in a real process; the CLI and ``eventq worker``
connect with ``--ca`` and fail with one clear line without it; a server refuses to
listen beyond loopback in clear text unless ``--insecure``; ``workers add`` answers with
the advertised URL and a command for eventq's agent and SimpleTuner's stock worker.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import ssl
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiohttp.test_utils import TestClient

from eventq import tls
from eventq.server import Orchestrator
from tests.cluster import EVENTQ, clean_env, wait_for
from tests.test_stock_worker import SHIM, StockWorkerKit, kit  # noqa: F401 - a fixture

pytestmark = pytest.mark.slow


class Certs:
    """A CA made for the test and a certificate it signed for loopback."""

    def __init__(self, where: Path) -> None:
        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1", "localhost")
        self.ca, self.cert, self.key = where / "ca.pem", where / "cert.pem", where / "key.pem"
        ca.cert_pem.write_to_path(str(self.ca))
        cert.private_key_pem.write_to_path(str(self.key))
        for i, blob in enumerate(cert.cert_chain_pems):
            blob.write_to_path(str(self.cert), append=i > 0)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return Certs(tmp_path_factory.mktemp("tls"))


class TlsServer:
    """``eventq server`` in a process of its own."""

    def __init__(self, data: Path, *args: str) -> None:
        self.data = data
        self.out = data.with_suffix(".out")
        with open(self.out, "wb") as out:
            self.proc = subprocess.Popen(
                [EVENTQ, "server", "--data-dir", str(data), "--port", "0",
                 "--gpus", "1xA100-80GB", "--grace", "1", *args],
                stdout=out, stderr=out, env=clean_env(EVENTQ_HEARTBEAT_TIMEOUT="5"))
        wait_for(lambda: (data / "server.json").exists() or self.proc.poll() is not None,
                 "the server to start")
        assert self.proc.poll() is None, self.out.read_text()
        self.info: dict[str, Any] = json.loads((data / "server.json").read_text())
        self.url: str = self.info["url"]
        self.token = (data / "admin.token").read_text().strip()

    def cli(self, *args: str, env: dict[str, str] | None = None,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([EVENTQ, *args], capture_output=True, text=True, timeout=30,
                              env=clean_env(**(env or {})))
        if check:
            assert done.returncode == 0, done.stderr
        return done

    def call(self, method: str, path: str, ca: Path, body: Any = None) -> Any:
        req = urllib.request.Request(
            self.url + path, method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {self.token}",
                     "Content-Type": "application/json"})
        context = ssl.create_default_context(cafile=str(ca))
        with urllib.request.urlopen(req, timeout=10, context=context) as resp:
            return json.loads(resp.read())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[list[TlsServer]]:
    started: list[TlsServer] = []
    try:
        yield started
    finally:
        for server in started:
            server.stop()


@pytest.fixture
def server(certs: Certs, tmp_path: Path, servers: list[TlsServer]) -> TlsServer:
    made = TlsServer(tmp_path / "data", "--tls-cert", str(certs.cert),
                     "--tls-key", str(certs.key))
    servers.append(made)
    return made


def one_line(done: subprocess.CompletedProcess[str]) -> str:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    return lines[0]


def test_the_cli_verifies_the_server_with_the_ca_and_says_so_in_one_line_without_it(
        server: TlsServer, certs: Certs) -> None:
    assert server.url.startswith("https://127.0.0.1:")
    where = ["--url", server.url, "--token", server.token]
    listed = server.cli("jobs", "list", *where, "--ca", str(certs.ca), "--format", "json")
    assert json.loads(listed.stdout) == []
    server.cli("jobs", "list", *where, env={"EVENTQ_CA": str(certs.ca)})
    # On the server's machine the CLI finds the server, its token and its certificate.
    server.cli("jobs", "list", "--data-dir", str(server.data))
    line = one_line(server.cli("jobs", "list", *where, check=False))
    assert line.startswith(f"eventq: the server at {server.url} presented a certificate that "
                           "cannot be verified") and "--ca FILE or EVENTQ_CA" in line


def test_the_agent_connects_with_the_ca_and_runs_a_job_and_says_so_without_it(
        server: TlsServer, certs: Certs, tmp_path: Path) -> None:
    made = json.loads(server.cli("workers", "add", "box", "--data-dir", str(server.data),
                                 "--format", "json").stdout)
    assert made["connection_command"].startswith(f"eventq worker --url {server.url} ")
    argv = shlex.split(made["connection_command"])
    refused = subprocess.run([EVENTQ, *argv[1:], "--data-dir", str(tmp_path / "w0")],
                             capture_output=True, text=True, timeout=30, env=clean_env())
    assert "cannot be verified" in one_line(refused) and "--ca" in one_line(refused)
    with open(tmp_path / "worker.out", "wb") as out:
        agent = subprocess.Popen(
            [EVENTQ, *argv[1:], "--ca", str(certs.ca), "--gpus", "1xA100-80GB",
             "--data-dir", str(tmp_path / "w1"), "--grace", "1"],
            stdout=out, stderr=out, env=clean_env())
    try:
        wait_for(lambda: server.call("GET", "/api/admin/workers", certs.ca)["workers"][0][
            "connected"], "the worker connects over TLS")
        job = server.call("POST", "/api/queue/submit", certs.ca, {
            "command": ["sh", "-c", "echo over tls"], "target": "worker", "gpus": 1})
        wait_for(lambda: server.call("GET", f"/api/jobs/{job['job_id']}", certs.ca)[
            "status"] == "completed", "the job runs on the worker")
        assert server.cli("jobs", "logs", job["job_id"], "--data-dir",
                          str(server.data)).stdout == "over tls\n"
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(15)


def test_a_non_loopback_address_without_tls_is_refused_before_listening(
        tmp_path: Path) -> None:
    data = tmp_path / "data"
    done = subprocess.run([EVENTQ, "server", "--data-dir", str(data), "--host", "0.0.0.0",
                           "--port", "0", "--gpus", "1xA100-80GB"], capture_output=True,
                          text=True, timeout=30, env=clean_env())
    line = one_line(done)
    assert line.startswith("eventq: refusing to listen on 0.0.0.0 without TLS")
    assert "--tls-cert" in line and "--insecure" in line
    assert not data.exists(), "nothing was written"


def test_tls_flags_that_cannot_work_are_refused_in_one_line(
        certs: Certs, tmp_path: Path) -> None:
    for args, words in ((["--tls-cert", str(certs.cert)], "go together"),
                        (["--tls-cert", str(certs.key), "--tls-key", str(certs.key)],
                         "cannot use --tls-cert"),
                        (["--advertise-url", "orchestrator:8001"], "must be http(s)://")):
        done = subprocess.run([EVENTQ, "server", "--data-dir", str(tmp_path / "d"),
                               "--port", "0", *args], capture_output=True, text=True,
                              timeout=30, env=clean_env())
        assert words in one_line(done)


def test_with_insecure_it_listens_everywhere_and_workers_get_its_host_name(
        tmp_path: Path, servers: list[TlsServer]) -> None:
    server = TlsServer(tmp_path / "data", "--host", "0.0.0.0", "--insecure")
    servers.append(server)
    port = server.url.rsplit(":", 1)[1]
    assert server.url == f"http://127.0.0.1:{port}"
    advertised = f"http://{tls.host_name()}:{port}"
    assert server.info["advertise_url"] == advertised
    assert "tokens cross the network in clear text" in server.out.read_text()
    shown = server.cli("workers", "add", "gpu-box", "--data-dir", str(server.data)).stdout
    assert f"eventq worker --url {advertised} --token wt_" in shown
    assert f"SIMPLETUNER_ORCHESTRATOR_URL={advertised} SIMPLETUNER_WORKER_TOKEN=wt_" in shown
    assert "127.0.0.1" not in shown


async def test_the_connection_commands_use_the_advertised_url(
        api: TestClient[Any, Any], orch: Orchestrator) -> None:
    resp = await api.post("/api/admin/workers", json={"name": "lo"})
    loopback = await resp.json()
    assert loopback["url"] == str(api.make_url("")).rstrip("/")
    assert "loopback only" in loopback["note"]
    orch.advertise_url = "https://gpu-orch.example.com:8443"
    made = await (await api.post("/api/admin/workers", json={
        "name": "gpu-box", "worker_type": "ephemeral"})).json()
    token = made["token"]
    assert made["connection_command"] == (
        f"eventq worker --url https://gpu-orch.example.com:8443 --token {token} "
        "--name gpu-box")
    assert made["stock_worker_command"] == (
        "SIMPLETUNER_ORCHESTRATOR_URL=https://gpu-orch.example.com:8443 "
        f"SIMPLETUNER_WORKER_TOKEN={token} SIMPLETUNER_WORKER_NAME=gpu-box simpletuner worker")
    assert "note" not in made
    rotated = await (await api.post(f"/api/admin/workers/{made['worker_id']}/token")).json()
    assert rotated["connection_command"].startswith(
        f"eventq worker --url https://gpu-orch.example.com:8443 --token {rotated['token']} ")


def test_the_stock_worker_connects_over_tls_with_the_command_it_is_given(
        server: TlsServer, certs: Certs, kit: StockWorkerKit,  # noqa: F811 - the fixture
        tmp_path: Path) -> None:
    made = server.call("POST", "/api/admin/workers", certs.ca,
                       {"name": "st-box", "worker_type": "persistent"})
    words = shlex.split(made["stock_worker_command"])
    assigned = dict(w.split("=", 1) for w in words if "=" in w and not w.startswith("-"))
    assert words[len(assigned):] == ["simpletuner", "worker"]
    env = {k: v for k, v in clean_env().items() if not k.startswith("SIMPLETUNER_")}
    env.update(assigned, SSL_CERT_FILE=str(certs.ca), PYTHONPATH=str(SHIM),
               PATH=f"{kit.bin_dir}:{env.get('PATH', '')}")
    with open(tmp_path / "stock.out", "wb") as out:
        worker = subprocess.Popen([kit.python, str(kit.script)], stdout=out, stderr=out,
                                  env=env, cwd=tmp_path, start_new_session=True)
    try:
        wait_for(lambda: server.call("GET", "/api/admin/workers", certs.ca)["workers"][0][
            "connected"], "SimpleTuner's worker registers over TLS", timeout=30)
        listed = server.call("GET", "/api/admin/workers", certs.ca)["workers"][0]
        assert listed["name"] == "st-box" and listed["transport"] == "sse"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(10)
