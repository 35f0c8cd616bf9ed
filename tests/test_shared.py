"""What many waiting jobs hold alike is held once (``eventq/shared.py``), and sharing
never loses or mixes what a job needs to start.

A real orchestrator on a real SQLite file with its aiohttp app on loopback; the restart
test runs real ``eventq server`` processes and the installed ``eventq`` command.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient

from eventq import shared
from eventq.http.app import make_app
from eventq.server import Orchestrator
from tests.helpers import until
from tests.serverproc import EVENTQ, clean_env, running, wait_until

AiohttpClient = Callable[..., Awaitable[TestClient[Any, Any]]]
LATER = time.time() + 365 * 86_400


async def submit(api: TestClient[Any, Any], **body: Any) -> str:
    resp = await api.post("/api/queue/submit", json=body)
    assert resp.status == 200, await resp.text()
    job_id: str = (await resp.json())["job_id"]
    return job_id


def sweep_job(seed: int) -> dict[str, Any]:
    """A job of a sweep, as a script sends it: only its seed differs from the others'."""
    return {"command": ["python", "train.py", "--config", "sweep.yaml", "--seed", str(seed)],
            "gpus": 0, "begin_at": LATER, "exported_env": {"SWEEP_SEED": str(seed)}}


def auth(orch: Orchestrator) -> dict[str, str]:
    return {"Authorization": f"Bearer {orch.admin_token}"}


def assert_shared(orch: Orchestrator, first: str, second: str) -> None:
    a, b = orch.state.jobs[first].spec, orch.state.jobs[second].spec
    assert a.command == [*b.command[:-1], "7"]
    assert all(x is y for x, y in zip(a.command[:-1], b.command[:-1], strict=True)), \
        "the words both commands hold are one string each"
    assert a.user is b.user and a.name is b.name
    for field in ("metadata", "worker_labels", "env", "depends_on"):
        assert getattr(a, field) is getattr(b, field), f"one empty {field}"
    assert a.env_sha256 != b.env_sha256, "each keeps its own environment"


async def test_jobs_of_one_sweep_hold_their_repeated_words_and_empties_once(
        make_orch: Callable[..., Awaitable[Orchestrator]],
        aiohttp_client: AiohttpClient) -> None:
    orch = await make_orch()
    api = await aiohttp_client(make_app(orch), headers=auth(orch))
    first, second = await submit(api, **sweep_job(7)), await submit(api, **sweep_job(8))
    assert_shared(orch, first, second)
    await api.close()
    await orch.stop()
    restarted = await make_orch()
    assert_shared(restarted, first, second)  # folded from the log: decoded anew, shared


async def test_jobs_waiting_for_the_same_thing_hold_one_tuple_of_reasons(
        make_orch: Callable[..., Awaitable[Orchestrator]],
        aiohttp_client: AiohttpClient) -> None:
    orch = await make_orch()
    api = await aiohttp_client(make_app(orch), headers=auth(orch))
    body = {"command": ["true"], "gpus": 1, "target": "worker"}  # no worker: both wait
    first, second = await submit(api, **body), await submit(api, **body)
    await until(lambda: bool(orch.state.jobs[second].reasons), "the second job's reasons")
    a, b = orch.state.jobs[first], orch.state.jobs[second]
    assert a.reasons == b.reasons and a.reasons is b.reasons
    await api.close()
    await orch.stop()
    restarted = await make_orch()
    assert restarted.state.jobs[first].reasons is restarted.state.jobs[second].reasons


async def test_the_shared_empties_stay_empty_through_a_jobs_whole_life(
        api: TestClient[Any, Any], orch: Orchestrator) -> None:
    job_id = await submit(api, command=["true"], gpus=0)
    await until(lambda: orch.state.jobs[job_id].status == "completed", "the job completed")
    details = await api.get(f"/api/jobs/{job_id}")
    assert details.status == 200
    assert shared.EMPTY_DICT == {} and shared.EMPTY_LIST == []


def test_a_job_queued_at_a_kill_9_starts_after_the_restart_with_its_environment(
        tmp_path: Path) -> None:
    """Two jobs from one shell, their seeds apart; the second waits for the GPUs the first
    holds when the server is killed; after the restart each sees its own environment."""
    data, work = tmp_path / "data", tmp_path / "work"
    work.mkdir()
    dump = ("import json, os, sys; "
            "json.dump({**os.environ, 'SEEN_CWD': os.getcwd()}, open(sys.argv[1], 'w'))")
    shell = {**clean_env(), "WANDB_PROJECT": "sweeps", "HF_HOME": "/data/cache/hf",
             "LS_COLORS": ":".join(f"*.x{i}=01;3{i % 8}" for i in range(100))}
    with running(data, tmp_path / "first.err") as server:
        for seed, hold in ((1, "4"), (2, "0")):
            cli = [EVENTQ, "jobs", "submit", "--url", server.url, "--token", server.token,
                   "--gpus", "2", "--", "sh", "-c", f'"$0" -c "$1" "$2"; sleep {hold}',
                   "python3", dump, f"env-{seed}.json"]
            done = subprocess.run(cli, cwd=work, env={**shell, "SWEEP_SEED": str(seed)},
                                  capture_output=True, text=True, timeout=60, check=False)
            assert done.returncode == 0, done.stderr
        server.proc.kill()
        server.proc.wait(10)
    assert not (work / "env-2.json").exists(), "the second job was waiting at the kill"
    with running(data, tmp_path / "second.err"):
        wait_until(lambda: (work / "env-2.json").exists() and
                   (work / "env-2.json").read_text().endswith("}"),
                   "the waiting job started after the restart", seconds=60)
    for seed in (1, 2):
        seen = json.loads((work / f"env-{seed}.json").read_text())
        assert seen["SWEEP_SEED"] == str(seed)
        assert {k: seen[k] for k in ("WANDB_PROJECT", "HF_HOME", "LS_COLORS")} == \
            {k: shell[k] for k in ("WANDB_PROJECT", "HF_HOME", "LS_COLORS")}
        assert os.path.samefile(seen["SEEN_CWD"], work), "and its directory"


async def test_a_waiting_jobs_own_strings_stay_out_of_the_interpreters_intern_table(
        api: TestClient[Any, Any], orch: Orchestrator, tmp_path: Path) -> None:
    """An interned string costs a slot of the interpreter's table for as long as it lives:
    a string only one job holds (its id, its environment's digest) gains nothing there."""
    job_id = await submit(api, **sweep_job(7), exported_cwd=str(tmp_path))
    spec = orch.state.jobs[job_id].spec
    for own in (spec.job_id, spec.env_sha256):
        assert own is not None
        assert sys.intern("".join(list(own))) is not own, f"{own} is interned"
