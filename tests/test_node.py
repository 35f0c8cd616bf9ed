"""The local node: processes, cancel, max_runtime, recovery after a restart, the lock."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from eventq import events as ev
from eventq.actors.scheduler import Cancel, Submit
from eventq.clock import SimClock
from eventq.server import AlreadyRunning, Orchestrator
from tests.helpers import until

MakeOrch = Callable[..., Awaitable[Orchestrator]]
ROOMY = ev.Limits(max_concurrent=10, user_max_concurrent=10, local_job_max_concurrent=10)


def spec(job_id: str, command: list[str] | str, gpus: int = 1, **kw: object) -> ev.JobSpec:
    return ev.JobSpec(job_id=job_id, user="admin", priority=30, command=command, gpus=gpus,
                      **kw)  # type: ignore[arg-type]


async def submit(orch: Orchestrator, job: ev.JobSpec) -> None:
    outcome = await orch.scheduler.ask(Submit(job, "user:admin"))
    assert outcome.durable is not None
    await outcome.durable




def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def waiter(tmp_path: Path, name: str) -> str:
    """A job that runs until the test creates its release file, then writes a line."""
    return (f"while [ ! -e {tmp_path}/{name}.go ]; do sleep 0.02; done; "
            f"echo \"$EVENTQ_JOB_ID $EVENTQ_ATTEMPT\" >> {tmp_path}/ledger")


async def test_cancel_stops_the_whole_process_group_and_frees_gpus(
        make_orch: MakeOrch, tmp_path: Path) -> None:
    orch = await make_orch(limits=ROOMY)
    child = tmp_path / "child"
    # written aside and renamed, so that the file exists only once it holds the pid
    command = f"sleep 300 & echo $! > {child}.tmp; mv {child}.tmp {child}; wait"
    await submit(orch, spec("j1", command, gpus=2))
    await until(child.exists, "grandchild started")
    grandchild = int(child.read_text())
    await orch.scheduler.ask(Cancel("j1", "user:admin"))
    await until(lambda: not orch.state.jobs["j1"].active, "attempt ended")
    assert orch.state.jobs["j1"].status == "cancelled"
    await until(lambda: not alive(grandchild), "grandchild killed")
    assert orch.gpu_table.free("local") == {0, 1, 2, 3}
    await orch.stop()


async def test_max_runtime_kills_the_attempt_and_fails_the_job(
        make_orch: MakeOrch, clock: SimClock) -> None:
    orch = await make_orch(limits=ROOMY)
    await submit(orch, spec("slow", ["sleep", "300"], max_runtime=60.0))
    await until(lambda: orch.state.jobs["slow"].status == "running", "running")
    clock.advance(61)
    await until(lambda: orch.state.jobs["slow"].status == "failed", "failed")
    assert orch.state.jobs["slow"].error == "max_runtime of 60.0s exceeded"
    types = [r.type for r in await orch.log.read(job_id="slow")]
    assert types.index("attempt_stop_requested") < types.index("attempt_ended")
    assert "job_failed" in types and "gpus_released" in types
    await orch.stop()


async def test_without_nvml_cpu_jobs_still_run(make_orch: MakeOrch) -> None:
    orch = await make_orch(gpu_spec="", limits=ROOMY)
    node = orch.gpu_table.nodes["local"]
    assert node.gpus == {} and node.nvml_error is not None and "NVML" in node.nvml_error
    await submit(orch, spec("cpu", ["true"], gpus=0))
    await until(lambda: orch.state.jobs["cpu"].status == "completed", "completed")
    await orch.stop()


async def test_a_restarted_server_adopts_a_running_attempt_and_records_its_exit(
        make_orch: MakeOrch, tmp_path: Path) -> None:
    first = await make_orch(limits=ROOMY)
    await submit(first, spec("long", waiter(tmp_path, "long")))
    await until(lambda: first.state.jobs["long"].status == "running", "running")
    pid = first.node.pids[("long", 1)]
    await first.stop()
    assert alive(pid), "stopping the server leaves the job running"
    second = await make_orch(limits=ROOMY)
    await until(lambda: ("long", 1) in second.node.pids, "adopted")
    (tmp_path / "long.go").touch()
    await until(lambda: second.state.jobs["long"].status == "completed", "completed")
    assert (tmp_path / "ledger").read_text().split("\n") == ["long 1", ""]
    events = await second.log.read(job_id="long")
    assert [e.event.adopted for e in events if isinstance(e.event, ev.AttemptStarted)] == \
        [False, True]
    await second.stop()


async def test_an_exit_while_the_server_was_down_is_recorded(
        make_orch: MakeOrch, tmp_path: Path) -> None:
    first = await make_orch(limits=ROOMY)
    await submit(first, spec("quick", waiter(tmp_path, "quick")))
    await until(lambda: first.state.jobs["quick"].status == "running", "running")
    await first.stop()
    (tmp_path / "quick.go").touch()
    attempt_dir = first.data_dir / "jobs" / "quick" / "1"
    await until(lambda: (attempt_dir / "exit").exists(), "exited while down")
    second = await make_orch(limits=ROOMY)
    await until(lambda: second.state.jobs["quick"].status == "completed", "completed")
    assert second.gpu_table.free("local") == {0, 1, 2, 3}
    await second.stop()


async def test_a_dispatch_that_never_started_is_requeued_and_runs_once(
        make_orch: MakeOrch, tmp_path: Path) -> None:
    first = await make_orch(limits=ROOMY)
    first.log.durable_subscribers.clear()  # the server dies after the commit, before spawning
    await submit(first, spec("lost", waiter(tmp_path, "lost")))
    assert first.state.jobs["lost"].status == "dispatched"
    await first.stop()
    (tmp_path / "lost.go").touch()
    second = await make_orch(limits=ROOMY)
    await until(lambda: second.state.jobs["lost"].status == "completed", "completed")
    assert second.state.jobs["lost"].attempt == 2
    assert (tmp_path / "ledger").read_text().split("\n") == ["lost 2", ""]
    ended = [e.event for e in await second.log.read(job_id="lost")
             if isinstance(e.event, ev.AttemptEnded)]
    assert [(e.attempt, e.outcome) for e in ended] == [(1, "lost"), (2, "exited")]
    await second.stop()


async def test_a_second_server_on_the_same_data_directory_refuses_to_start(
        make_orch: MakeOrch) -> None:
    first = await make_orch()
    with pytest.raises(AlreadyRunning, match=r"another eventq server .* is running"):
        await make_orch()
    await first.stop()
