"""What the CLI's cheap commands load: a submission is most of what a user types, and each
module it imports is CPU of every one (rich, urllib.request with ssl and email, the other
commands' modules were most of it). The figures are tools/bench_dispatch.py's; this holds
which modules, against a real server, with no timing."""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest

from tests.serverproc import Server, clean_env, running

pytestmark = pytest.mark.slow

#: Loaded only where a command needs them: a table or a progress bar (rich), an https
#: server, a proxy or a stream (urllib, http.client, ssl, email), a path option (pathlib),
#: another command.
HEAVY = ("rich", "urllib", "pathlib", "http.client", "ssl", "email", "eventq.cli.bulk",
         "eventq.cli.serve", "eventq.cli.views", "eventq.cli.actions", "eventq.cli.logs",
         "eventq.jobscheduler", "eventq.server")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path]]:
    data = tmp_path_factory.mktemp("imports") / "data"
    with running(data, data.parent / "server.err") as found:
        yield found, data


#: The ``eventq`` script's two lines, and the modules loaded by its end, as one line.
SCRIPT = ("import atexit, sys\n"
          "atexit.register(lambda: print('modules:', *sorted(sys.modules), file=sys.stderr))\n"
          "from eventq.cli.main import main\n"
          "sys.exit(main())")


def imported(data: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """Run ``eventq args`` in a process of its own, its server found by $EVENTQ_HOME, and
    the modules it had loaded at exit (what ``-X importtime`` lists misses what
    importlib.import_module loads)."""
    done = subprocess.run([sys.executable, "-c", SCRIPT, *args], capture_output=True,
                          text=True, timeout=60, env={**clean_env(), "EVENTQ_HOME": str(data)},
                          check=False)
    listed = [line for line in done.stderr.splitlines() if line.startswith("modules: ")]
    assert listed, done.stderr[-2000:]
    return done, set(listed[-1].split()[1:])


def heavy(names: set[str]) -> list[str]:
    return sorted(n for n in names if any(n == h or n.startswith(h + ".") for h in HEAVY))


@pytest.mark.parametrize("output", ["table", "json"])
def test_a_submission_loads_no_rich_no_urllib_no_ssl_and_no_other_command(
        server: tuple[Server, Path], output: str) -> None:
    api, data = server
    done, names = imported(data, "jobs", "submit", "--format", output,
                           "--gpus", "0", "--", "true")
    assert done.returncode == 0, done.stderr[-2000:]
    job_id = done.stdout.split()[0] if output == "table" else done.stdout.split('"job_id": "')[
        1].split('"')[0]
    status, job = api.call("GET", f"/api/jobs/{job_id}")
    assert status == 200 and job["command"] == ["true"]
    assert "eventq.cli.jobs" in names  # the list is real: the command's own module is in it
    assert heavy(names) == []


def test_a_refusal_and_the_version_load_none_of_them_either(
        server: tuple[Server, Path]) -> None:
    _, data = server
    done, names = imported(data, "jobs", "submit", "--depends-on", "nosuchjob", "--", "true")
    assert done.returncode == 2
    assert "no job or name 'nosuchjob' (HTTP 422) [field: depends_on]" in done.stderr
    assert heavy(names) == []
    done, names = imported(data, "--version")
    assert done.stdout.startswith("eventq ") and heavy(names) == []


class Proxy(http.server.BaseHTTPRequestHandler):
    """An HTTP proxy that answers every submission itself, and remembers what it was asked."""

    asked: ClassVar[list[str]] = []

    def do_POST(self) -> None:
        self.asked.append(f"{self.command} {self.path}")
        self.rfile.read(int(self.headers["Content-Length"]))
        body = json.dumps({"job_id": "viaproxy", "status": "running", "allocated_gpus": [],
                           "queue_position": None}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # quiet in the test's output
        pass


def test_a_user_behind_an_http_proxy_still_goes_through_it() -> None:
    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
    serving = threading.Thread(target=proxy.serve_forever)
    serving.start()
    try:
        env = {**clean_env(), "http_proxy": f"http://127.0.0.1:{proxy.server_address[1]}"}
        # Nothing listens on port 9: only the proxy can answer.
        done = subprocess.run([sys.executable, "-c", SCRIPT, "jobs", "submit", "--url",
                               "http://127.0.0.1:9", "--token", "t", "--", "true"],
                              capture_output=True, text=True, timeout=60, env=env, check=False)
    finally:
        proxy.shutdown()
        proxy.server_close()
        serving.join()
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("viaproxy running")
    assert Proxy.asked == ["POST http://127.0.0.1:9/api/queue/submit"]


def test_a_response_in_chunks_or_cut_short_is_read_as_http_says() -> None:
    from eventq.cli.client import parse_response

    chunked = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"4\r\n{\"a\"\r\n3;x=1\r\n: 1\r\n1\r\n}\r\n0\r\n\r\n")
    assert parse_response(chunked) == (200, b'{"a": 1}')
    sized = b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\n{}"
    assert parse_response(sized) == (404, b"{}")
    for broken in (b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n{}",
                   b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n9\r\n{}",
                   b"SSH-2.0-OpenSSH_9.2\r\n"):
        with pytest.raises(ValueError):
            parse_response(broken)


def test_a_server_url_is_split_as_urllib_splits_it() -> None:
    import urllib.parse

    from eventq.cli.client import CliError, split_http_url

    for url in ("http://127.0.0.1:41279/api/queue/submit", "http://[::1]:8080/base/api/x?n=5",
                "http://user:secret@gpu-box.example/api/jobs/a%2Fb", "http://h:80?x=1",
                "http://h/api/q#part"):
        netloc, host, port, target = split_http_url(url)
        want = urllib.parse.urlsplit(url)
        assert (host, port) == (want.hostname, want.port or 80)
        assert netloc == want.netloc.rpartition("@")[2]  # the password is never sent
        assert target == (want.path or "/") + (f"?{want.query}" if want.query else "")
    with pytest.raises(CliError, match="its port is 'x1'"):
        split_http_url("http://127.0.0.1:x1/api/queue/submit")


def test_a_worker_loads_structlog_without_rich_and_leaves_rich_importable(
        server: tuple[Server, Path], tmp_path: Path) -> None:
    """A worker's start is on the path of every job that waits for a new one (Slurm's): rich
    is structlog's, for tracebacks a worker never renders. Refused by the server (a token
    it does not know), the worker has loaded the agent by then."""
    api, data = server
    done, names = imported(data, "worker", "--url", api.url, "--token", "wt_unknown",
                           "--gpus", "1xA100-80GB", "--data-dir", str(tmp_path / "worker"))
    assert done.returncode == 2 and "refused this worker's token" in done.stderr
    assert {"eventq.agent.agent", "structlog", "aiohttp"} <= names
    assert not [n for n in names if n == "rich" or n.startswith("rich.")]
    # Blocked while structlog loads only: rich loads as ever afterwards in the same process.
    probe = subprocess.run([sys.executable, "-c", "from eventq.cli.worker import _without_rich\n"
                            "_without_rich()\nimport rich.console\nprint(rich.console.Console)"],
                           capture_output=True, text=True, timeout=60, env=clean_env(),
                           check=False)
    assert probe.returncode == 0 and "Console" in probe.stdout, probe.stderr[-2000:]
