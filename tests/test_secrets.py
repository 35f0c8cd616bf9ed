"""Secrets in job environments: out of the log, redacted wherever a job is shown, and a
remote worker gets only what the job declared.

A real orchestrator on a real SQLite file and its aiohttp app on loopback; the installed
``eventq`` command against it; jobs as real subprocesses.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from eventq import events as ev
from eventq import jobenv
from eventq.actors.scheduler import Submit
from eventq.cli.why import story_of
from eventq.clock import SimClock
from eventq.http.stream import public_body
from eventq.log import Record
from eventq.redact import REDACTED, redact_command, redact_env, redact_shell, secret_name
from eventq.server import Orchestrator
from tests.helpers import until
from tests.test_worker_protocol import World, connect, world  # noqa: F401 - a fixture

EVENTQ = shutil.which("eventq", path=str(Path(sys.executable).parent)) or "eventq"
HF = "hf_" + "aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY"
WANDB = "0123456789abcdef0123456789abcdef01234567"


def log_bytes(orch: Orchestrator) -> bytes:
    """Every stored event body, as the file holds them."""
    path = orch.data_dir / "events.db"
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        return b"".join(row[0] for row in db.execute("SELECT body FROM events"))


async def submit(api: TestClient[Any, Any], **body: Any) -> dict[str, Any]:
    resp = await api.post("/api/queue/submit", json={"gpus": 0, **body})
    assert resp.status == 200, await resp.text()
    reply: dict[str, Any] = await resp.json()
    return reply


async def ended(orch: Orchestrator, job_id: str) -> None:
    await until(lambda: orch.state.jobs[job_id].status in ("completed", "failed"),
                f"job {job_id} ended", seconds=30)


# --- which values are secret-looking ----------------------------------------------------


@pytest.mark.parametrize(("name", "secret"), [
    ("WANDB_API_KEY", True), ("HF_TOKEN", True), ("AWS_SECRET_ACCESS_KEY", True),
    ("DB_PASSWORD", True), ("GOOGLE_APPLICATION_CREDENTIALS", True), ("--hub_token", True),
    ("--api-key", True), ("BASIC_AUTH", True), ("PATH", False), ("HOME", False),
    ("--max_tokens", False), ("TOKENIZERS_PARALLELISM", False), ("SSH_AUTH_SOCK", False),
    ("--learning_rate", False)])
def test_secret_looking_names(name: str, secret: bool) -> None:
    assert secret_name(name) is secret


@pytest.mark.parametrize(("text", "shown"), [
    (f"python train.py --lr 3e-4 {HF}", f"python train.py --lr 3e-4 {REDACTED}"),
    ("HF_TOKEN=abc python x.py --hub_token 'a b' --max_tokens 512",
     f"HF_TOKEN={REDACTED} python x.py --hub_token {REDACTED} --max_tokens 512"),
    ("--verbose --api-key=k1 out", f"--verbose --api-key={REDACTED} out"),
    ("postgres://ml:hunter2@db:5432/runs", f"postgres://ml:{REDACTED}@db:5432/runs"),
    ("AKIAIOSFODNN7EXAMPLE", REDACTED),
    ("eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
     REDACTED),
    ("kX9mQ2vL7pR4tW8yB3nC6jH1fD5gS0aZ", REDACTED),  # generated: upper, lower, digits mixed
    # names, paths, digests and ids stay readable
    ("/data/Models/Qwen2-7B-Instruct/checkpoint-500/adapter_model.safetensors",
     "/data/Models/Qwen2-7B-Instruct/checkpoint-500/adapter_model.safetensors"),
    ("2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881",
     "2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881"),
    ("stabilityai/stable-diffusion-xl-base-1.0", "stabilityai/stable-diffusion-xl-base-1.0"),
])
def test_secret_looking_values_in_a_shell_string(text: str, shown: str) -> None:
    assert redact_shell(text) == shown


def test_a_command_list_hides_what_follows_a_secret_flag() -> None:
    assert redact_command(["python", "t.py", "--hub_token", "x", "--api-key=y", "WANDB_KEY=z",
                           "--lr", "1"]) == [
        "python", "t.py", "--hub_token", REDACTED, f"--api-key={REDACTED}",
        f"WANDB_KEY={REDACTED}", "--lr", "1"]
    assert redact_env({"WANDB_API_KEY": WANDB, "PATH": "/usr/bin", "N": "3"}) == {
        "WANDB_API_KEY": REDACTED, "PATH": "/usr/bin", "N": "3"}


# --- out of the log ---------------------------------------------------------------------


async def test_an_exported_environment_stays_out_of_the_log_and_the_job_still_gets_it(
        api: TestClient[Any, Any], orch: Orchestrator, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    exported = {**os.environ, "WANDB_API_KEY": WANDB}
    job = await submit(api, command=[
        "sh", "-c", 'echo "$WANDB_API_KEY $HF_TOKEN" > seen; pwd >> seen'],
                       env={"HF_TOKEN": HF}, exported_env=exported, exported_cwd=str(work))
    await ended(orch, job["job_id"])
    assert (work / "seen").read_text().split() == [WANDB, HF, str(work)]
    stored = log_bytes(orch)
    assert WANDB.encode() not in stored and HF.encode() not in stored
    assert os.environ["PATH"].encode() not in stored, "not even the harmless part"
    digest = orch.state.jobs[job["job_id"]].spec.env_sha256
    assert digest is not None and digest.encode() in stored
    kept = orch.data_dir / "env" / digest
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    assert stat.S_IMODE(kept.parent.stat().st_mode) == 0o700


async def cli(api: TestClient[Any, Any], orch: Orchestrator, cwd: Path, env: dict[str, str],
              *args: str) -> subprocess.CompletedProcess[str]:
    """``eventq jobs submit ARGS`` from a shell with ``env`` in ``cwd``, against ``api``."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("EVENTQ_")}
    done = await asyncio.to_thread(
        subprocess.run,
        [EVENTQ, "jobs", "submit", "--url", str(api.make_url("")).rstrip("/"), "--token",
         orch.admin_token or "", "--format", "json", *args],
        cwd=cwd, env={**clean, **env}, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done


async def test_the_submitters_whole_environment_never_enters_the_log(
        api: TestClient[Any, Any], orch: Orchestrator, tmp_path: Path) -> None:
    done = await cli(api, orch, tmp_path, {"WANDB_API_KEY": WANDB}, "--gpus", "0", "--",
                     "sh", "-c", 'echo "$WANDB_API_KEY" > seen')
    await ended(orch, json.loads(done.stdout)["job_id"])
    assert (tmp_path / "seen").read_text().strip() == WANDB, "the job still gets it"
    assert WANDB.encode() not in log_bytes(orch)


async def test_a_batch_from_one_shell_keeps_one_environment_file(
        api: TestClient[Any, Any], orch: Orchestrator) -> None:
    row = {"command": ["true"], "gpus": 0, "exported_env": {"WANDB_API_KEY": WANDB}}
    resp = await api.post("/api/queue/batch", json={"jobs": [row] * 50})
    assert resp.status == 200, await resp.text()
    ids = (await resp.json())["job_ids"]
    assert len({orch.state.jobs[j].spec.env_sha256 for j in ids}) == 1
    assert len(os.listdir(orch.data_dir / "env")) == 1
    assert WANDB.encode() not in log_bytes(orch)


async def test_a_purge_removes_the_environment_with_the_job(
        api: TestClient[Any, Any], orch: Orchestrator, clock: SimClock) -> None:
    done = await submit(api, command=["true"], exported_env={"WANDB_API_KEY": WANDB})
    kept = await submit(api, command=["sleep", "60"], exported_env={"WANDB_API_KEY": WANDB})
    await ended(orch, done["job_id"])
    files = {orch.state.jobs[j["job_id"]].spec.env_sha256 for j in (done, kept)}
    assert set(os.listdir(orch.data_dir / "env")) == files
    clock.advance(3 * 86_400)
    resp = await api.post("/api/queue/cleanup?days=1")
    assert resp.status == 200 and (await resp.json())["deleted"] == 1
    still = orch.state.jobs[kept["job_id"]].spec.env_sha256
    await until(lambda: os.listdir(orch.data_dir / "env") == [still],
                "the purged job's environment is removed, the running one's kept")


async def test_a_start_removes_environments_no_job_names(
        make_orch: Callable[..., Awaitable[Orchestrator]], tmp_path: Path) -> None:
    orch = await make_orch()
    await orch.stop()
    stray = jobenv.seal({"HF_TOKEN": HF}, {}, None)  # written, then the server died
    jobenv.write(orch.data_dir / "env", [stray])
    restarted = await make_orch()
    assert os.listdir(restarted.data_dir / "env") == []


def test_a_kill_9_right_after_the_reply_keeps_the_environment(tmp_path: Path) -> None:
    data, work = tmp_path / "data", tmp_path / "work"
    work.mkdir()
    clean = {k: v for k, v in os.environ.items() if not k.startswith("EVENTQ_")}
    server = start_server(data, clean)
    try:
        begin = time.time() + 3
        done = subprocess.run(
            [EVENTQ, "jobs", "submit", "--data-dir", str(data), "--gpus", "0", "--begin-at",
             str(begin), "--format", "json", "--", "sh", "-c", 'echo "$WANDB_API_KEY" > seen'],
            cwd=work, env={**clean, "WANDB_API_KEY": WANDB}, capture_output=True, text=True,
            timeout=30)
        assert done.returncode == 0, done.stderr
        server.kill()
        server.wait(10)
        server = start_server(data, clean)
        for _ in range(500):
            if (work / "seen").exists() and (work / "seen").read_text().strip():
                break
            time.sleep(0.02)
        assert (work / "seen").read_text().strip() == WANDB
    finally:
        stop_server(server)


def start_server(data: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    (data / "server.json").unlink(missing_ok=True)
    proc = subprocess.Popen([EVENTQ, "server", "--data-dir", str(data), "--port", "0",
                             "--gpus", "1xA100-80GB"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)
    for _ in range(500):
        if (data / "server.json").exists() or proc.poll() is not None:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the server started"
    return proc


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)


# --- shown redacted ----------------------------------------------------------------------


async def test_a_job_is_shown_with_its_secret_looking_values_redacted(
        api: TestClient[Any, Any], orch: Orchestrator) -> None:
    job = await submit(api, command=["sh", "-c", "true", "--hub_token", HF],
                       env={"HF_TOKEN": HF, "LR": "3e-4"}, metadata={"wandb_key": WANDB},
                       exported_env={"WANDB_API_KEY": WANDB, "PATH": "/usr/bin"})
    shown = await (await api.get(f"/api/jobs/{job['job_id']}")).json()
    assert shown["env"] == {"HF_TOKEN": REDACTED, "LR": "3e-4"}
    assert shown["exported_env"] == 2
    assert shown["command"][-2:] == ["--hub_token", REDACTED]
    assert shown["metadata"] == {"wandb_key": REDACTED}
    events = await (await api.get(f"/api/jobs/{job['job_id']}/events")).text()
    listing = await (await api.get("/api/queue?include_completed=true")).text()
    for text in (json.dumps(shown), events, listing):
        assert HF not in text and WANDB not in text


async def old_style_job(orch: Orchestrator, env: dict[str, str], cwd: str | None,
                        command: list[str], target: ev.Target = "local") -> str:
    """A job recorded as before environments were kept out of the log: env in the body."""
    job_id = f"{int(orch.clock.now() * 65536) + len(orch.state.jobs):012x}"
    spec = ev.JobSpec(job_id=job_id, user="admin", priority=30, command=command, gpus=0,
                      env=env, cwd=cwd, target=target)
    outcome = await orch.scheduler.ask(Submit(spec, "user:admin", False))
    assert outcome.durable is not None
    await outcome.durable
    return job_id


async def test_an_old_log_with_env_in_its_bodies_still_runs_and_is_shown_redacted(
        api: TestClient[Any, Any], orch: Orchestrator, tmp_path: Path) -> None:
    job_id = await old_style_job(orch, {"WANDB_API_KEY": WANDB, "PATH": os.environ["PATH"]},
                                 str(tmp_path), ["sh", "-c", 'echo "$WANDB_API_KEY" > seen'])
    await ended(orch, job_id)
    assert (tmp_path / "seen").read_text().strip() == WANDB
    assert WANDB.encode() in log_bytes(orch), "the old body is as it was written"
    shown = await (await api.get(f"/api/jobs/{job_id}")).json()
    assert shown["env"]["WANDB_API_KEY"] == REDACTED and shown["cwd"] == str(tmp_path)
    events = await (await api.get(f"/api/jobs/{job_id}/events")).text()
    assert WANDB not in events
    await orch.log.flush()
    streamed = [public_body(r) for r in await orch.log.read(job_id=job_id)]
    assert WANDB not in json.dumps(streamed)
    replayed = await asyncio.to_thread(
        subprocess.run, [EVENTQ, "replay", "show", "--log", str(orch.data_dir / "events.db"),
                         "--job", job_id, "--format", "json"],
        capture_output=True, text=True, timeout=30)
    assert replayed.returncode == 0, replayed.stderr
    assert job_id in replayed.stdout and WANDB not in replayed.stdout


def test_replay_why_hides_tokens_that_reasons_quote() -> None:
    submitted = ev.JobSubmitted(job=ev.JobSpec(job_id="j1", user="u", priority=10,
                                               command=["true"]))
    failed = ev.JobFailed(job_id="j1", reason=f"the worker said: bad token {HF}")
    story = story_of("j1", [Record(1, 1.0, "user:u", submitted, b""),
                            Record(2, 2.0, "system", failed, b"")])
    assert story is not None and HF not in json.dumps(story.summary(3.0))
    assert REDACTED in story.steps[-1].detail


# --- remote workers get only what the job declared ----------------------------------------


async def test_a_remote_worker_is_not_sent_the_submitters_path_or_directory(
        world: World, tmp_path: Path) -> None:  # noqa: F811 - the fixture
    agent = await connect(world, (await world.new_worker("box"))["token"])
    await cli(world.api, world.orch, tmp_path, {}, "--gpus", "1", "--", "python", "train.py")
    run = await agent.next("run")
    assert run["env"] == {} and run["cwd"] is None


async def test_a_remote_worker_gets_only_the_declared_environment(
        world: World, tmp_path: Path) -> None:  # noqa: F811 - the fixture
    agent = await connect(world, (await world.new_worker("box"))["token"])
    await cli(world.api, world.orch, tmp_path, {"HF_TOKEN": HF}, "--target", "worker",
              "--gpus", "1", "--env", "LR=3e-4", "--export-env", "HF_TOKEN", "--",
              "python", "train.py")
    run = await agent.next("run")
    assert run["env"] == {"LR": "3e-4", "HF_TOKEN": HF}
    assert run["cwd"] is None


async def test_a_worker_is_not_sent_an_old_jobs_exported_path_or_directory(
        world: World, tmp_path: Path) -> None:  # noqa: F811 - the fixture
    made = await world.new_worker("box")
    agent = await connect(world, made["token"])
    await old_style_job(world.orch, {"PATH": "/orchestrator/venv/bin", "HOME": "/home/me"},
                        str(tmp_path), ["python", "train.py"], target="worker")
    run = await agent.next("run")
    assert run["env"] == {} and run["cwd"] is None


async def test_an_unknown_exported_directory_is_refused(api: TestClient[Any, Any]) -> None:
    resp = await api.post("/api/queue/submit", json={
        "command": ["true"], "gpus": 0, "exported_cwd": "/no/such/directory"})
    body = await resp.json()
    assert resp.status == 422 and body["field"] == "exported_cwd"
    assert "--no-export-env" in body["error"]
    resp = await api.post("/api/queue/submit", json={
        "command": ["true"], "exported_env": {"A=B": "x"}})
    assert resp.status == 422 and (await resp.json())["field"] == "exported_env"


def test_export_env_of_an_unset_variable_is_a_clear_cli_error(tmp_path: Path) -> None:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("EVENTQ_") and k != "NOT_SET_HERE"}
    done = subprocess.run([EVENTQ, "jobs", "submit", "--url", "http://127.0.0.1:9",
                           "--token", "t", "--export-env", "NOT_SET_HERE", "--", "true"],
                          env=clean, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert done.stderr.strip() == "eventq: --export-env: NOT_SET_HERE is not set in this shell"


# --- an environment's file and the submission's commit ------------------------------------


@contextlib.contextmanager
def fsync_held() -> Any:
    """Every ``os.fsync`` of this process waits until the yielded event is set (SQLite's
    own flushes, in C, do not): a disk that takes its time."""
    import threading

    release, real = threading.Event(), os.fsync

    def held(fd: int) -> None:
        release.wait(30)
        real(fd)

    os.fsync = held
    try:
        yield release
    finally:
        os.fsync = real
        release.set()


async def test_a_submission_is_decided_while_its_environment_is_flushed_and_answered_after(
        api: TestClient[Any, Any], orch: Orchestrator) -> None:
    """The file's flush runs beside the log's commit, not before it: the job is recorded
    (and may start) while the flush is held, and the reply waits for the flush."""
    before = set(orch.state.jobs)
    with fsync_held() as release:
        reply = asyncio.ensure_future(api.post("/api/queue/submit", json={
            "gpus": 0, "command": ["true"], "exported_env": {"WANDB_API_KEY": WANDB},
            "exported_cwd": "/"}))
        try:
            await until(lambda: set(orch.state.jobs) - before, "the submission is recorded")
            assert not reply.done(), "no reply before the environment is on disk"
        finally:
            release.set()
        resp = await reply
    assert resp.status == 200, await resp.text()
    job_id = (await resp.json())["job_id"]
    spec = orch.state.jobs[job_id].spec
    assert jobenv.for_local(orch.data_dir, spec).env["WANDB_API_KEY"] == WANDB


async def test_an_environment_the_disk_refuses_records_nothing(
        api: TestClient[Any, Any], orch: Orchestrator) -> None:
    env_dir = orch.data_dir / jobenv.ENV_DIR
    shutil.rmtree(env_dir, ignore_errors=True)
    env_dir.write_text("not a folder")  # every file under it fails to be written
    before = set(orch.state.jobs)
    resp = await api.post("/api/queue/submit", json={
        "gpus": 0, "command": ["true"], "exported_env": {"WANDB_API_KEY": WANDB},
        "exported_cwd": "/"})
    assert resp.status == 503
    assert "nothing was recorded" in (await resp.json())["error"]
    assert set(orch.state.jobs) == before


async def test_a_flush_that_fails_once_the_submission_is_recorded_stops_the_server(
        api: TestClient[Any, Any], orch: Orchestrator) -> None:
    """As a failed commit of the log does: no reply goes out on a file the disk refused."""
    import threading

    stopped: list[BaseException] = []
    orch.env_files.on_fatal = stopped.append
    release, real = threading.Event(), os.fsync

    def refused(fd: int) -> None:
        release.wait(30)
        raise OSError(5, "Input/output error")

    before = set(orch.state.jobs)
    os.fsync = refused
    try:
        reply = asyncio.ensure_future(api.post("/api/queue/submit", json={
            "gpus": 0, "command": ["true"], "exported_env": {"WANDB_API_KEY": WANDB},
            "exported_cwd": "/"}))
        await until(lambda: set(orch.state.jobs) - before, "the submission is recorded")
        release.set()
        resp = await reply
    finally:
        os.fsync = real
        release.set()
    assert resp.status == 500
    assert len(stopped) == 1 and isinstance(stopped[0], OSError)

