"""SimpleTuner's stock worker, unchanged, runs jobs against a real ``eventq server``.

SimpleTuner is AGPL, so none of its files live in this repository: its wheel is
downloaded at test time into a git-ignored cache (``.cache/stock-worker``), and only
``simpletuner/worker_agent.py`` is taken out of it and run as a plain script, with
``httpx`` (its only need) from a small venv in the same cache (or from the test venv
when it has httpx). Its ``python -m simpletuner.train`` runs the stand-in trainer of
``tests/stock_worker``, and a stand-in ``nvidia-smi`` on PATH shows it one A100. The
tests are skipped, saying why, when the wheel or httpx cannot be had.

The stock worker heartbeats every 30 s and retries 10 s after a broken stream; the
server's heartbeat timeout is set to 40 s so that it stays online between heartbeats.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.cluster import wait_for

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache" / "stock-worker"
WHEEL = "simpletuner==4.10.1"
SHIM = Path(__file__).resolve().parent / "stock_worker"
EVENTQ = shutil.which("eventq", path=str(Path(sys.executable).parent)) or "eventq"
HEARTBEAT_TIMEOUT = 40
FAKE_NVIDIA_SMI = "#!/bin/sh\necho 'NVIDIA A100-SXM4-80GB, 81920'\n"


# --- the stock worker, fetched at test time -------------------------------------------


def _run(argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def _wheel() -> Path:
    found = sorted(CACHE.glob("simpletuner-4.10.1-*.whl"))
    if found:
        return found[0]
    CACHE.mkdir(parents=True, exist_ok=True)
    try:
        done = _run([sys.executable, "-m", "pip", "download", "--no-deps", WHEEL,
                     "--python-version", "3.12", "--only-binary=:all:", "-d", str(CACHE)], 300)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot download SimpleTuner's wheel ({WHEEL}) to run its stock worker: "
                    f"{exc}")
    found = sorted(CACHE.glob("simpletuner-4.10.1-*.whl"))
    if done.returncode != 0 or not found:
        tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-2:])
        pytest.skip(f"cannot download SimpleTuner's wheel ({WHEEL}) to run its stock worker: "
                    f"{tail}")
    return found[0]


def _python_with_httpx() -> str:
    """The test venv's python if it has httpx, else a venv in the cache with only httpx."""
    if _run([sys.executable, "-c", "import httpx"], 60).returncode == 0:
        return sys.executable
    venv = CACHE / "venv"
    python = venv / "bin" / "python"
    if python.exists() and _run([str(python), "-c", "import httpx"], 60).returncode == 0:
        return str(python)
    try:
        steps = [[sys.executable, "-m", "venv", "--clear", str(venv)],
                 [str(python), "-m", "pip", "install", "-q", "httpx"]]
        for argv in steps:
            done = _run(argv, 300)
            if done.returncode != 0:
                tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-2:])
                pytest.skip(f"cannot install httpx for SimpleTuner's stock worker: {tail}")
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot install httpx for SimpleTuner's stock worker: {exc}")
    return str(python)


@dataclass(frozen=True)
class StockWorkerKit:
    python: str
    script: Path
    bin_dir: Path


@pytest.fixture(scope="session")
def kit(tmp_path_factory: pytest.TempPathFactory) -> StockWorkerKit:
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:  # one test run fills the cache at a time
        fcntl.flock(lock, fcntl.LOCK_EX)
        wheel = _wheel()
        python = _python_with_httpx()
    where = tmp_path_factory.mktemp("stock-worker")
    with zipfile.ZipFile(wheel) as whl:
        (where / "worker_agent.py").write_bytes(whl.read("simpletuner/worker_agent.py"))
    bin_dir = where / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text(FAKE_NVIDIA_SMI)
    (bin_dir / "nvidia-smi").chmod(0o755)
    return StockWorkerKit(python, where / "worker_agent.py", bin_dir)


# --- an eventq server, a user, and stock workers ---------------------------------------


class Server:
    """``eventq server`` in a subprocess; kill -9 and restart it on the same port."""

    def __init__(self, data: Path, log: Path) -> None:
        self.data, self.log_path = data, log
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.url = ""

    def start(self) -> None:
        (self.data / "server.json").unlink(missing_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTQ_")}
        env["EVENTQ_HEARTBEAT_TIMEOUT"] = str(HEARTBEAT_TIMEOUT)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [EVENTQ, "server", "--data-dir", str(self.data), "--port", str(self.port),
                 "--gpus", "1xA100-80GB", "--grace", "2"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                start_new_session=True)
        proc = self.proc

        def up() -> str:
            assert proc.poll() is None, f"eventq server exited: {self.log_path.read_text()}"
            try:  # written once it listens; whole only once it parses
                url: str = json.loads((self.data / "server.json").read_text())["url"]
            except (FileNotFoundError, ValueError, KeyError):
                return ""
            return url

        self.url = wait_for(up, "the server writes server.json")
        self.port = int(self.url.rsplit(":", 1)[1])

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self, timeout: float = 30.0) -> bool:
        """SIGTERM, as an operator stops it; False if it had to be killed after ``timeout``."""
        if self.proc is None or self.proc.poll() is not None:
            return True
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            return False
        return True

    def call(self, method: str, path: str, body: Any = None,
             headers: dict[str, str] | None = None) -> tuple[int, Any]:
        token = (self.data / "admin.token").read_text().strip()
        request = urllib.request.Request(
            self.url + path, method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json",
                     **(headers or {})})
        try:
            with urllib.request.urlopen(request, timeout=15) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def ok(self, method: str, path: str, body: Any = None) -> Any:
        status, reply = self.call(method, path, body)
        assert status in (200, 201), f"{method} {path} -> {status}: {reply}"
        return reply

    def job(self, job_id: str) -> dict[str, Any]:
        reply: dict[str, Any] = self.ok("GET", f"/api/jobs/{job_id}")
        return reply

    def events(self, job_id: str) -> list[dict[str, Any]]:
        reply: list[dict[str, Any]] = self.ok("GET", f"/api/jobs/{job_id}/events")["events"]
        return reply

    def worker(self, worker_id: str) -> dict[str, Any]:
        listed = self.ok("GET", "/api/admin/workers")["workers"]
        found: dict[str, Any] = next(w for w in listed if w["worker_id"] == worker_id)
        return found


@dataclass
class World:
    kit: StockWorkerKit
    tmp: Path
    server: Server
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    job_ids: list[str] = field(default_factory=list)

    def add_worker(self, name: str) -> dict[str, Any]:
        made: dict[str, Any] = self.server.ok("POST", "/api/admin/workers",
                                              {"name": name, "worker_type": "persistent"})
        return made

    def start_worker(self, made: dict[str, Any], gpu: bool = True,
                     timeout: float = 30.0) -> Path:
        """Run the stock worker as SimpleTuner ships it; returns its log file.

        With ``gpu`` it sees one A100 (the stand-in nvidia-smi); without, no GPU at all."""
        log_path = self.tmp / f"{made['name']}.log"
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("EVENTQ_", "SIMPLETUNER_"))}
        env.update(PYTHONPATH=str(SHIM), PYTHONUNBUFFERED="1")
        if gpu:
            env["PATH"] = f"{self.kit.bin_dir}:{env.get('PATH', '')}"
        with open(log_path, "ab") as log:
            self.workers.append(subprocess.Popen(
                [self.kit.python, str(self.kit.script), "--orchestrator-url", self.server.url,
                 "--worker-token", made["token"], "--name", made["name"], "--persistent"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                cwd=self.tmp, start_new_session=True))
        wait_for(lambda: self.server.worker(made["worker_id"])["connected"],
                   "the stock worker registers and opens its stream", timeout)
        return log_path

    def config(self, name: str, exit_code: int = 0, hold: bool = False) -> dict[str, Any]:
        """A SimpleTuner config for the stand-in trainer; ``hold`` waits for ``release``."""
        out: dict[str, Any] = {"--model_type": "lora", "--output_dir": str(self.tmp / name),
                               "--eventq_record": str(self.tmp / f"{name}.runs"),
                               "--eventq_exit_code": exit_code}
        if hold:
            out["--eventq_release"] = str(self.tmp / f"{name}.release")
        return out

    def release(self, name: str) -> None:
        (self.tmp / f"{name}.release").touch()

    def runs(self, name: str) -> list[dict[str, Any]]:
        path = self.tmp / f"{name}.runs"
        return [json.loads(line) for line in path.read_text().splitlines()] \
            if path.exists() else []

    def submit(self, config: dict[str, Any], gpus: int = 1) -> dict[str, Any]:
        reply: dict[str, Any] = self.server.ok("POST", "/api/queue/submit",
                                               {"config": config, "target": "worker",
                                                "gpus": gpus})
        self.job_ids.append(reply["job_id"])
        return reply

    def status_becomes(self, job_id: str, status: str, timeout: float = 30.0) -> dict[str, Any]:
        found: dict[str, Any] = wait_for(
            lambda: (job := self.server.job(job_id))["status"] == status and job,
            f"job {job_id} becomes {status} (it is {self.server.job(job_id)['status']})",
            timeout)
        return found


@pytest.fixture
def world(kit: StockWorkerKit, tmp_path: Path) -> Iterator[World]:
    server = Server(tmp_path / "data", tmp_path / "server.log")
    server.start()
    w = World(kit, tmp_path, server)
    try:
        yield w
    finally:
        for proc in w.workers:  # the worker and its trainer share a process group
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        server.kill9()  # nothing of a job runs in the server's process group
        for job_id in w.job_ids:  # where the stock worker writes each job's config
            shutil.rmtree(f"/tmp/simpletuner_job_{job_id}", ignore_errors=True)


def types(events: list[dict[str, Any]]) -> list[str]:
    return [e["type"] for e in events]


# --- stories --------------------------------------------------------------------------


def test_a_job_with_a_config_runs_on_the_stock_worker_and_completes(world: World) -> None:
    made = world.add_worker("st-box")
    world.start_worker(made)
    config = world.config("first")
    job = world.submit(config)
    assert job["status"] == "running"
    world.status_becomes(job["job_id"], "completed")
    assert [run["config"] for run in world.runs("first")] == [config], \
        "the trainer ran once, with the job's config at CONFIG_PATH"
    events = [e for e in world.server.events(job["job_id"])
              if e["type"] not in ("gpus_allocated", "gpus_released")]
    assert types(events) == ["job_submitted", "attempt_dispatched", "attempt_started",
                             "attempt_ended", "job_completed"]
    started, ended = events[2], events[3]
    assert started["principal"] == ended["principal"] == f"worker:{made['worker_id']}"
    assert ended["body"]["exit_code"] == 0
    assert world.server.worker(made["worker_id"])["status"] == "idle"


def test_a_trainer_that_exits_with_1_fails_the_job_with_the_workers_error(
        world: World) -> None:
    world.start_worker(world.add_worker("st-box"))
    job = world.submit(world.config("broken", exit_code=1))
    failed = world.status_becomes(job["job_id"], "failed")
    assert failed["attempt"] == 1, "a failed run is not retried without retry_on_failure"
    assert failed["exit_code"] == 1
    ended = next(e for e in world.server.events(job["job_id"]) if e["type"] == "attempt_ended")
    assert ended["body"]["detail"] == "Training exited with code 1"
    assert len(world.runs("broken")) == 1


def test_a_cancelled_job_is_stopped_by_the_worker_and_ends_cancelled(world: World) -> None:
    made = world.add_worker("st-box")
    world.start_worker(made)
    job = world.submit(world.config("long", hold=True))
    wait_for(lambda: world.runs("long"), "the trainer starts")
    world.status_becomes(job["job_id"], "running")
    world.server.ok("POST", f"/api/queue/{job['job_id']}/cancel")
    wait_for(lambda: world.server.worker(made["worker_id"])["status"] == "idle",
               "the worker stops the trainer and reports it")
    assert world.server.job(job["job_id"])["status"] == "cancelled"
    ended = next(e for e in world.server.events(job["job_id"]) if e["type"] == "attempt_ended")
    assert ended["body"]["outcome"] == "cancelled"
    assert ended["principal"] == f"worker:{made['worker_id']}", "the worker reported it"
    pid = world.runs("long")[0]["pid"]
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_an_orchestrator_killed_mid_job_comes_back_and_the_job_completes_once(
        world: World) -> None:
    made = world.add_worker("st-box")
    log = world.start_worker(made)
    job = world.submit(world.config("resumed", hold=True))
    wait_for(lambda: world.runs("resumed"), "the trainer starts")
    world.status_becomes(job["job_id"], "running")

    world.server.kill9()
    world.server.start()  # same data directory, same port
    # The worker notices the broken stream, waits its 10 s, and registers again with
    # current_job_id: eventq answers resume_job, and the run goes on.
    wait_for(lambda: world.server.worker(made["worker_id"])["connected"],
               "the worker registers again", timeout=HEARTBEAT_TIMEOUT)
    assert f"Resuming job: {job['job_id']}" in log.read_text()
    assert world.server.job(job["job_id"])["status"] == "running"

    world.release("resumed")
    done = world.status_becomes(job["job_id"], "completed")
    assert done["attempt"] == 1
    assert len(world.runs("resumed")) == 1, "the trainer ran once"
    events = types(world.server.events(job["job_id"]))
    assert events.count("attempt_dispatched") == 1 and events.count("job_completed") == 1
    assert events.count("attempt_ended") == 1


def test_two_concurrent_submissions_one_runs_the_other_waits_then_runs(world: World) -> None:
    made = world.add_worker("st-box")
    world.start_worker(made)
    configs = {"a": world.config("a", hold=True), "b": world.config("b", hold=True)}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        replies = dict(zip(configs, pool.map(world.submit, configs.values()), strict=True))
    assert sorted(r["status"] for r in replies.values()) == ["queued", "running"]
    first = next(k for k, r in replies.items() if r["status"] == "running")
    second = next(k for k in replies if k != first)
    waiting = world.server.job(replies[second]["job_id"])
    assert waiting["status"] == "pending" and waiting["reasons"], "it says why it waits"
    assert [r["code"] for r in waiting["reasons"]] == ["gpus"], waiting
    assert "1 of 1 jobs" in waiting["reasons"][0]["detail"], "a stock worker runs one job"

    wait_for(lambda: world.runs(first), "the first trainer starts")
    world.release(second)  # the second job finishes as soon as it starts
    world.release(first)
    world.status_becomes(replies[first]["job_id"], "completed")
    # sent only once the first has ended: the stock worker ignores a job while it has one
    world.status_becomes(replies[second]["job_id"], "completed")
    assert len(world.runs("a")) == len(world.runs("b")) == 1


def test_an_orchestrator_stopped_with_sigterm_leaves_the_run_going_and_resumes_it(
        world: World) -> None:
    made = world.add_worker("st-box")
    log = world.start_worker(made)
    job = world.submit(world.config("graceful", hold=True))
    wait_for(lambda: world.runs("graceful"), "the trainer starts")
    world.status_becomes(job["job_id"], "running")

    assert world.server.stop(timeout=15), \
        "the server stops on SIGTERM though a worker's stream is open"
    trainer = world.runs("graceful")[0]["pid"]
    os.kill(trainer, 0)  # an orchestrator restart never kills a healthy run
    assert world.workers[0].poll() is None, "the stock worker keeps running"

    world.server.start()
    wait_for(lambda: world.server.worker(made["worker_id"])["connected"],
               "the worker registers again", timeout=HEARTBEAT_TIMEOUT)
    assert f"Resuming job: {job['job_id']}" in log.read_text()
    world.release("graceful")
    assert world.status_becomes(job["job_id"], "completed")["attempt"] == 1
    assert len(world.runs("graceful")) == 1


def test_a_stock_worker_without_a_gpu_registers_and_runs_a_cpu_job(world: World) -> None:
    # Without torch and nvidia-smi the stock worker reports {"vram_gb": null, "count": 0}
    # (and on Apple Silicon {"vram_gb": null, "count": 1}).
    made = world.add_worker("cpu-box")
    world.start_worker(made, gpu=False, timeout=15)  # it registers at once, or 10 s later
    assert world.server.worker(made["worker_id"])["gpus"] == []
    job = world.submit(world.config("cpu"), gpus=0)
    world.status_becomes(job["job_id"], "completed")
    assert len(world.runs("cpu")) == 1


def test_chained_jobs_each_start_as_soon_as_the_previous_one_is_reported(
        world: World) -> None:
    """Defect 8: the stock worker clears its job only after its report's reply; a job sent
    before that is ignored ("Already running a job") and waited for its idle heartbeat."""
    made = world.add_worker("st-box")
    log = world.start_worker(made)
    names = [f"chain{n}" for n in range(5)]
    jobs = [world.submit(world.config(name))["job_id"] for name in names]
    for job in jobs:  # well inside the 30 s heartbeat that would resend an ignored job
        world.status_becomes(job, "completed", timeout=HEARTBEAT_TIMEOUT / 4)
    assert "Already running a job" not in log.read_text()
    assert [len(world.runs(name)) for name in names] == [1] * len(names)
