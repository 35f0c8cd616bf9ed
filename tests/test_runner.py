"""The attempt's own record: how it ended, read back right, and its lease's watchdog."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from eventq import events as ev
from eventq import procgroup, runner
from eventq.actors.scheduler import Submit
from eventq.agent.watchdog import FENCED_FILE, Watchdog, now
from eventq.server import Orchestrator
from tests.cluster import gone
from tests.helpers import until

MakeOrch = Callable[..., Awaitable[Orchestrator]]
ROOMY = ev.Limits(max_concurrent=10, user_max_concurrent=10, local_job_max_concurrent=10)


def spec(job_id: str, command: str) -> ev.JobSpec:
    return ev.JobSpec(job_id=job_id, user="admin", priority=30, command=command, gpus=1)


async def submit(orch: Orchestrator, job: ev.JobSpec) -> None:
    outcome = await orch.scheduler.ask(Submit(job, "user:admin"))
    assert outcome.durable is not None
    await outcome.durable


@pytest.fixture
def watchdog(tmp_path: Path) -> Iterator[Watchdog]:
    """A worker's watchdog on ``tmp_path/lease``; gone at the end of the test."""
    dog = Watchdog(tmp_path / "lease")
    try:
        yield dog
    finally:
        pid = dog.pid
        dog.close()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)


@pytest.fixture
def spawned() -> Iterator[list[int]]:
    """Process groups a test starts; none outlives it."""
    groups: list[int] = []
    try:
        yield groups
    finally:
        for pgid in groups:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pgid, 0)


async def test_an_attempt_that_ends_between_recoverys_two_looks_is_exited_not_vanished(
        tmp_path: Path, spawned: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    """The wrapper writes its exit code and ends just as recovery looks at it: recovery must
    read that code, not judge the attempt vanished (which runs it a second time)."""
    directory = tmp_path / "jobs" / "j" / "1"
    # The job stops its own wrapper, so the wrapper is alive with no exit file yet.
    pid = runner.spawn(spec("j", "kill -STOP $PPID; exit 3"), 1, [0], directory)
    spawned.append(pid)
    await until(lambda: Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] == "T",
                "the wrapper to be stopped")
    looked = runner.is_ours

    def wrapper_ends_now(found: int, where: Path) -> bool:
        os.kill(pid, signal.SIGCONT)  # the wrapper writes "exit" and ends at this moment
        os.waitpid(pid, 0)
        return looked(found, where)

    monkeypatch.setattr(runner, "is_ours", wrapper_ends_now)
    seen = await runner.inspect(directory)
    assert (seen.state, seen.exit_code) == ("exited", 3)


async def test_a_job_that_fails_while_the_server_is_down_is_recorded_failed_with_its_code(
        make_orch: MakeOrch, tmp_path: Path) -> None:
    first = await make_orch(limits=ROOMY)
    await submit(first, spec("bad", f"while [ ! -e {tmp_path}/go ]; do sleep 0.02; done; exit 3"))
    await until(lambda: first.state.jobs["bad"].status == "running", "running")
    await first.stop()
    (tmp_path / "go").touch()
    await until(lambda: (first.data_dir / "jobs/bad/1/exit").exists(), "exited while down")
    second = await make_orch(limits=ROOMY)
    await until(lambda: second.state.jobs["bad"].status == "failed", "failed")
    assert second.state.jobs["bad"].exit_code == 3
    await second.stop()


async def test_an_attempt_killed_by_a_signal_is_failed_not_completed(
        make_orch: MakeOrch) -> None:
    """Its whole group SIGKILLed (as the OOM killer or an admin's kill -9 -PGID does)."""
    orch = await make_orch(limits=ROOMY)
    await submit(orch, spec("oom", "kill -KILL 0"))
    await until(lambda: orch.state.jobs["oom"].status == "failed", "failed")
    assert orch.state.jobs["oom"].exit_code == -signal.SIGKILL
    await orch.stop()


def write_lease(path: Path, seconds: float, grace: float) -> None:
    path.write_text(f"{now() + seconds:.3f} {grace}\n")


async def test_a_lapsed_lease_stops_the_attempt_with_term_then_kill_and_says_so(
        tmp_path: Path, spawned: list[int], watchdog: Watchdog) -> None:
    lease = tmp_path / "lease"
    write_lease(lease, 0.5, 0.3)
    directory = tmp_path / "jobs" / "j" / "1"
    child = tmp_path / "child"
    # The job ignores SIGTERM and leaves a child: only the group's SIGKILL ends both. The
    # pid is written aside and renamed, so that the file exists only once it holds it.
    command = f"trap '' TERM; sleep 300 & echo $! > {child}.tmp; mv {child}.tmp {child}; wait"
    pid = runner.spawn(spec("j", command), 1, [0], directory, watch=watchdog.feed())
    spawned.append(pid)
    await until(child.exists, "the job's child to start")
    grandchild = int(child.read_text())
    await until(lambda: gone(pid) and gone(grandchild), "the group to be stopped")
    assert (directory / FENCED_FILE).exists()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == -signal.SIGKILL


async def test_a_renewed_lease_lets_the_attempt_finish_and_the_watchdog_leaves_after_the_agent(
        tmp_path: Path, spawned: list[int], watchdog: Watchdog) -> None:
    lease = tmp_path / "lease"
    write_lease(lease, 0.6, 0.3)
    directory = tmp_path / "jobs" / "j" / "1"
    pid = runner.spawn(spec("j", "sleep 1.5"), 1, [0], directory, watch=watchdog.feed())
    spawned.append(pid)
    end = time.monotonic() + 10
    while not (directory / "exit").exists() and time.monotonic() < end:
        write_lease(lease, 0.6, 0.3)  # the agent's renewals, on each answered heartbeat
        time.sleep(0.1)
    assert runner.read_exit(directory) == 0
    assert not (directory / FENCED_FILE).exists()
    dog = watchdog.pid
    assert dog is not None
    watchdog.close()  # the agent leaves; nothing of its attempts is left
    os.waitpid(pid, 0)
    await until(lambda: reaped(dog), "the watchdog to leave")


def reaped(child: int) -> bool:
    try:
        return os.waitpid(child, os.WNOHANG)[0] == child
    except ChildProcessError:  # reaped already
        return True


async def test_the_watchdog_outlives_its_agent_and_stops_what_the_job_left_when_the_lease_lapses(
        tmp_path: Path, spawned: list[int], watchdog: Watchdog) -> None:
    """The agent is gone (its end of the pipe closed) and the job's own process has ended:
    the child it left still runs on the worker's GPUs, so it is still fenced, and only
    then does the watchdog leave."""
    lease = tmp_path / "lease"
    write_lease(lease, 1.0, 0.3)
    directory = tmp_path / "jobs" / "j" / "1"
    child = tmp_path / "child"
    pid = runner.spawn(spec("j", f"sh -c 'trap \"\" TERM; exec sleep 300' & echo $! > {child}"),
                       1, [0], directory, watch=watchdog.feed())
    spawned.append(pid)
    dog = watchdog.pid
    assert dog is not None
    watchdog.close()
    await until(lambda: runner.read_exit(directory) == 0, "the job's own process to end")
    os.waitpid(pid, 0)
    straggler = int(child.read_text())
    assert not gone(straggler) and not (directory / FENCED_FILE).exists()
    await until(lambda: gone(straggler), "the straggler to be stopped")
    assert (directory / FENCED_FILE).exists()
    await until(lambda: reaped(dog), "the watchdog to leave after it")


async def test_an_attempt_started_after_the_lease_lapsed_is_stopped_at_once(
        tmp_path: Path, spawned: list[int], watchdog: Watchdog) -> None:
    """An agent frozen between its look at the lease and the start runs late: the wrapper
    has told the watchdog before its job runs, so the job is fenced all the same."""
    write_lease(tmp_path / "lease", 30.0, 0.3)
    feed = watchdog.feed()
    write_lease(tmp_path / "lease", -1.0, 0.3)
    directory = tmp_path / "jobs" / "j" / "1"
    pid = runner.spawn(spec("j", "sleep 300"), 1, [0], directory, watch=feed)
    spawned.append(pid)
    _, status = await asyncio.to_thread(os.waitpid, pid, 0)
    assert os.waitstatus_to_exitcode(status) in (128 + signal.SIGTERM, -signal.SIGKILL)
    assert (directory / FENCED_FILE).exists()


async def test_without_a_watchdog_to_tell_the_wrapper_runs_nothing(
        tmp_path: Path, spawned: list[int], watchdog: Watchdog) -> None:
    write_lease(tmp_path / "lease", 30.0, 0.3)
    feed = watchdog.feed()
    dog = watchdog.pid
    assert dog is not None
    os.kill(dog, signal.SIGKILL)
    os.waitpid(dog, 0)
    directory = tmp_path / "jobs" / "j" / "1"
    ran = tmp_path / "ran"
    pid = runner.spawn(spec("j", f"touch {ran}"), 1, [0], directory, watch=feed)
    spawned.append(pid)
    _, status = await asyncio.to_thread(os.waitpid, pid, 0)
    assert os.waitstatus_to_exitcode(status) in (runner.UNWATCHED, -signal.SIGPIPE)
    assert not ran.exists() and runner.read_exit(directory) is None


def lingering(ledger: Path, launch: str = "", pid_file: Path | None = None) -> str:
    """A job that leaves a child behind (started with ``launch``, e.g. ``setsid``; its pid
    written to ``pid_file``), which takes 0.5 s to leave after SIGTERM and notes when."""
    note = f"echo $$ > {pid_file}; " if pid_file is not None else ""
    return (f"{launch}sh -c '{note}"
            f"trap \"sleep 0.5; echo left $(date +%s%N) >> {ledger}; exit\" TERM; "
            f"echo up >> {ledger}; while :; do sleep 0.05; done' & "
            f"until grep -q up {ledger} 2>/dev/null; do sleep 0.01; done")


async def assert_the_next_starts_once_it_left(orch: Orchestrator, ledger: Path) -> None:
    """A second job on the same GPU writes only after the first one's child has left."""
    await submit(orch, spec("second", f"echo next $(date +%s%N) >> {ledger}"))
    await until(lambda: orch.state.jobs["second"].status == "completed", "the second job")
    lines = [line.split() for line in ledger.read_text().splitlines()]
    assert [line[0] for line in lines] == ["up", "left", "next"]
    assert int(lines[1][1]) < int(lines[2][1])


async def test_an_attempt_ends_only_when_what_it_left_in_its_group_is_gone(
        make_orch: MakeOrch, tmp_path: Path) -> None:
    """``sh -c`` exits at once and leaves a child that takes a while to leave after
    SIGTERM: the GPU is not free, and the next job does not start, until it has left."""
    orch = await make_orch("1xA100-80GB", limits=ROOMY)
    ledger = tmp_path / "ledger"
    await submit(orch, spec("first", lingering(ledger)))
    pid_file = runner.attempt_dir(orch.data_dir, "first", 1) / "pid"
    try:
        await assert_the_next_starts_once_it_left(orch, ledger)
        assert orch.state.jobs["first"].status == "completed"
    finally:  # a straggler that was not stopped must not outlive the test
        with contextlib.suppress(ProcessLookupError, ValueError, FileNotFoundError):
            os.killpg(int(pid_file.read_text()), signal.SIGKILL)


def test_an_attempts_processes_are_found_by_its_variables_wherever_the_pids_stand() -> None:
    env = {**os.environ, "EVENTQ_JOB_ID": "stray-job", "EVENTQ_ATTEMPT": "3"}
    stray = subprocess.Popen(["sleep", "30"], env=env, start_new_session=True)
    later = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        assert procgroup.strays("stray-job", 3) == [stray.pid]
        assert procgroup.strays("stray-job", 3, since=stray.pid) == [stray.pid]
        # started before the attempt's first pid: not the attempt's, and not read
        assert procgroup.strays("stray-job", 3, since=later.pid) == []
        # the pids have wrapped around since (the last one is below it): all are read
        assert procgroup.strays("stray-job", 3, since=10**9) == [stray.pid]
        assert procgroup.strays("stray-job", 30) == procgroup.strays("stray-jo", 3) == []
    finally:
        for proc in (stray, later):
            proc.kill()
            proc.wait()


async def test_an_attempt_ends_only_when_a_daemon_it_forked_out_of_its_group_is_gone(
        make_orch: MakeOrch, tmp_path: Path) -> None:
    """A daemon the job forked leaves its process group (``setsid``): the group's SIGTERM
    missed it, the attempt ended at once, and the next job started on its GPU beside it.
    It keeps the attempt's variables, by which it is found, stopped and waited for."""
    orch = await make_orch("1xA100-80GB", limits=ROOMY)
    ledger, stray = tmp_path / "ledger", tmp_path / "stray"
    await submit(orch, spec("first", lingering(ledger, launch="setsid ", pid_file=stray)))
    try:
        await assert_the_next_starts_once_it_left(orch, ledger)
        assert gone(int(stray.read_text()))
    finally:  # a daemon that was not stopped must not outlive the test
        with contextlib.suppress(ProcessLookupError, ValueError, FileNotFoundError):
            os.kill(int(stray.read_text()), signal.SIGKILL)


async def test_a_daemon_of_an_attempt_that_vanished_while_the_server_was_down_is_stopped(
        make_orch: MakeOrch, tmp_path: Path) -> None:
    """While the server was down the attempt's group was killed (no exit code: it
    vanished), and a daemon it forked out of the group lived on. Recovery stops the daemon
    before it reports the attempt lost, so the retry never starts beside it."""
    ledger, stray = tmp_path / "ledger", tmp_path / "stray"
    first = await make_orch("1xA100-80GB", limits=ROOMY)
    await submit(first, spec("gone", (
        f'if [ "$EVENTQ_ATTEMPT" = 1 ]; then setsid sh -c \'echo $$ > {stray}; '
        f'trap "echo left >> {ledger}; exit" TERM; while :; do sleep 0.05; done\' & '
        f'sleep 300; else echo next >> {ledger}; fi')))
    await until(lambda: stray.exists() and bool(stray.read_text().strip()), "the daemon")
    daemon = int(stray.read_text())
    await first.stop()
    pgid = int((first.data_dir / "jobs/gone/1/pid").read_text())
    os.killpg(pgid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pgid, 0)
    try:
        second = await make_orch("1xA100-80GB", limits=ROOMY)
        await until(lambda: second.state.jobs["gone"].status == "completed", "the retry")
        assert ledger.read_text().split() == ["left", "next"]
        assert gone(daemon)
    finally:  # a daemon that was not stopped must not outlive the test
        with contextlib.suppress(ProcessLookupError):
            os.kill(daemon, signal.SIGKILL)


async def test_a_watchdog_that_left_is_started_again_for_the_next_attempt(
        tmp_path: Path, spawned: list[int], watchdog: Watchdog) -> None:
    write_lease(tmp_path / "lease", 30.0, 0.3)
    watchdog.feed()
    first = watchdog.pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    await until(lambda: Path(f"/proc/{first}/stat").read_text().split(") ")[1][0] == "Z",
                "the watchdog to be gone")
    directory = tmp_path / "jobs" / "j" / "1"
    pid = runner.spawn(spec("j", "exit 7"), 1, [0], directory, watch=watchdog.feed())
    spawned.append(pid)
    assert watchdog.pid not in (None, first)
    _, status = await asyncio.to_thread(os.waitpid, pid, 0)
    assert os.waitstatus_to_exitcode(status) == 7, "it ran, watched by the new watchdog"
