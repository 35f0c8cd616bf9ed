"""A wrapper started ahead of its attempt (``runner.Standby``) runs the job exactly as a
wrapper spawned for it does: the same command, environment, directory, input, output and
process group; it runs nothing unless it was told the whole attempt; a restarted server
knows it as the attempt's own process; and the local node starts attempts through it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eventq import events as ev
from eventq import runner
from eventq.actors.scheduler import Submit
from eventq.server import Orchestrator
from tests.cluster import gone
from tests.helpers import until

MakeOrch = Callable[..., Awaitable[Orchestrator]]

#: The job: what it was given, as JSON on its stdout, and a line on its stderr.
DUMP = """\
import json, os, sys
null = os.stat(os.devnull)
stdin = os.fstat(0)
print(json.dumps({"argv": sys.argv[1:], "env": dict(os.environ), "cwd": os.getcwd(),
                  "stdin_is_null": (stdin.st_rdev, stdin.st_ino) == (null.st_rdev, null.st_ino),
                  "group_is_wrapper": os.getpgid(0) == os.getsid(0) == os.getppid()}))
print("to stderr", file=sys.stderr)
"""


def dump_spec(job_id: str, env: dict[str, str], args: list[str], cwd: str | None) -> ev.JobSpec:
    return ev.JobSpec(job_id=job_id, user="admin", priority=30, gpus=1, env=env, cwd=cwd,
                      command=[sys.executable, "-c", DUMP, *args])


def finished(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def ran(directory: Path) -> dict[str, Any]:
    seen: dict[str, Any] = json.loads((directory / "stdout.log").read_text())
    seen["stderr"] = (directory / "stderr.log").read_text()
    seen["exit"] = (directory / "exit").read_text().strip()
    return seen


@pytest.fixture
def standby() -> Iterator[Callable[[], runner.Standby]]:
    """Standbys a test starts; none outlives it."""
    made: list[runner.Standby] = []

    def make() -> runner.Standby:
        made.append(runner.Standby())
        return made[-1]

    try:
        yield make
    finally:
        for one in made:
            one.retire()
            try:  # never signal a pid the test has reaped already: it may be another's now
                if os.waitpid(one.pid, os.WNOHANG) == (0, 0):
                    os.killpg(one.pid, signal.SIGKILL)
                    os.waitpid(one.pid, 0)
            except ChildProcessError:
                pass


#: Names the shell treats as its own, the wrapper's own variables, names a shell cannot
#: hold, and any others.
NAMES = st.sampled_from(
    ["IFS", "PPID", "OPTIND", "PWD", "OLDPWD", "PATH", "HOME", "LANG", "c", "d", "w", "rc",
     "a.b", "1x", "_", "x-y"]) | st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True)
VALUES = st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\0"),
                 max_size=20)


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(env=st.dictionaries(NAMES, VALUES, max_size=6),
       args=st.lists(VALUES, max_size=4), elsewhere=st.booleans())
def test_a_standby_runs_the_job_as_a_spawned_wrapper_does(
        tmp_path_factory: pytest.TempPathFactory, standby: Callable[[], runner.Standby],
        env: dict[str, str], args: list[str], elsewhere: bool) -> None:
    root = tmp_path_factory.mktemp("attempts")
    job = dump_spec("j1", env, args, str(root) if elsewhere else None)
    seen = []
    for path in ("spawned", "handed"):
        directory = root / path / "j1" / "1"
        if path == "spawned":
            pid = runner.spawn(job, 1, [0, 2], directory, ())
        else:
            waiting = standby()
            assert waiting.hand(job, 1, [0, 2], directory, ())
            pid = waiting.pid
        assert finished(pid) == 0, (path, env, args, (directory / "stderr.log").read_text())
        seen.append(ran(directory))
    if not elsewhere:  # each ran in its own attempt's directory
        assert seen[0]["cwd"].endswith("/spawned/j1/1") and seen[1]["cwd"].endswith("/handed/j1/1")
    # Alike but for the attempt's directory (in the working directory, and in the job's own
    # variables named like the wrapper's, which it sets as a spawned wrapper does).
    spawned, handed = (json.loads(json.dumps(one).replace(f"/{path}/j1/1", "/ATTEMPT"))
                       for one, path in zip(seen, ("spawned", "handed"), strict=True))
    assert handed == spawned
    assert handed["argv"] == args and handed["stdin_is_null"] and handed["group_is_wrapper"]
    assert handed["env"]["CUDA_VISIBLE_DEVICES"] == "0,2" and handed["env"]["EVENTQ_JOB_ID"] == "j1"
    assert handed["stderr"] == "to stderr\n" and handed["exit"] == "0"


def test_a_standby_told_nothing_or_part_of_an_attempt_runs_nothing(
        tmp_path: Path, standby: Callable[[], runner.Standby]) -> None:
    idle = standby()
    idle.retire()  # the server stopped
    assert finished(idle.pid) == 0
    directory = tmp_path / "j1" / "1"
    directory.mkdir(parents=True)
    lines = runner.handoff(dump_spec("j1", {}, ["x"], None), 1, [0], directory, ())
    assert lines.endswith(b"EVENTQ_HANDED=1\n")
    for cut in (len(lines) - 2, len(lines) // 2, lines.index(b"set --") + 12):
        cut_short = standby()  # the server wrote this much of it and died
        os.write(cut_short._pipe, lines[:cut])
        cut_short.retire()
        assert finished(cut_short.pid) in (0, 2)  # 2: the cut left a quote open
        assert not (directory / "claim").exists() and not (directory / "stdout.log").exists()


def test_a_standby_told_nothing_runs_nothing_whatever_its_environment_holds(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        standby: Callable[[], runner.Standby]) -> None:
    for name, value in (("EVENTQ_HANDED", "1"), ("ready", "1"), ("d", str(tmp_path)),
                        ("c", str(tmp_path))):
        monkeypatch.setenv(name, value)
    idle = standby()  # started with the server's environment, which holds them
    idle.retire()
    assert finished(idle.pid) == 0
    assert list(tmp_path.iterdir()) == []


def test_a_standby_that_cannot_have_its_attempt_is_retired_and_the_spawn_says_why(
        tmp_path: Path, standby: Callable[[], runner.Standby]) -> None:
    (tmp_path / "j1").write_text("a file where the job's directory goes")
    waiting = standby()
    job = dump_spec("j1", {}, [], None)
    assert not waiting.hand(job, 1, [0], tmp_path / "j1" / "1", ())
    assert finished(waiting.pid) == 0  # its pipe closed: it ran nothing and ended
    with pytest.raises(OSError):
        runner.spawn(job, 1, [0], tmp_path / "j1" / "1", ())


def test_a_standby_killed_while_idle_takes_nothing_and_says_so(
        tmp_path: Path, standby: Callable[[], runner.Standby]) -> None:
    gone = standby()
    os.kill(gone.pid, signal.SIGKILL)
    assert finished(gone.pid) == -signal.SIGKILL
    assert not gone.hand(dump_spec("j1", {}, [], None), 1, [0], tmp_path / "j1" / "1", ())
    assert not (tmp_path / "j1" / "1" / "claim").exists()


async def test_a_standby_ends_when_the_server_holding_it_is_killed() -> None:
    with subprocess.Popen(
            [sys.executable, "-c", "import sys, time; from eventq import runner; "
             "print(runner.Standby().pid, flush=True); time.sleep(60)"],
            stdout=subprocess.PIPE, text=True) as holder:
        assert holder.stdout is not None
        pid = int(holder.stdout.readline())
        holder.send_signal(signal.SIGKILL)
    await until(lambda: gone(pid), "the standby to end with the process holding its pipe")


async def test_a_restarted_server_knows_a_handed_wrapper_as_the_attempt_s_process(
        tmp_path: Path, standby: Callable[[], runner.Standby]) -> None:
    directory = tmp_path / "j1" / "1"
    other = standby()
    waiting = standby()
    job = ev.JobSpec(job_id="j1", user="admin", priority=30, gpus=1, command=["sleep", "30"])
    assert waiting.hand(job, 1, [0], directory, ())
    await until(lambda: (directory / "pid").exists(), "the wrapper's pid file")
    found = await runner.inspect(directory)
    assert found == runner.Found("alive", waiting.pid)
    assert not runner.is_ours(other.pid, directory)  # a standby, but not this attempt's
    os.killpg(waiting.pid, signal.SIGTERM)
    os.kill(waiting.pid, signal.SIGTERM)
    assert finished(waiting.pid) != 0


async def test_the_local_node_starts_attempts_through_its_standby_and_spawns_in_between(
        make_orch: MakeOrch, tmp_path: Path) -> None:
    orch = await make_orch(limits=ev.Limits(max_concurrent=10, user_max_concurrent=10,
                                            local_job_max_concurrent=10))
    await until(lambda: orch.node.standby is not None, "a standby")
    first = orch.node.standby
    assert first is not None
    for job_id in ("a", "b"):  # the second starts before the next standby is up
        job = ev.JobSpec(job_id=job_id, user="admin", priority=30, gpus=1,
                         command=["sh", "-c", f"echo {job_id} >> {tmp_path}/ledger"])
        outcome = await orch.scheduler.ask(Submit(job, "user:admin"))
        assert outcome.durable is not None
        await outcome.durable
    for job_id in ("a", "b"):
        await orch.node.wait_ended(job_id, 1, 10)
    await orch.log.flush()
    # The first ran as the standby's process; the second in another (spawned at once, or
    # the next standby's if this machine took 10 ms between the two).
    assert orch.state.jobs["a"].pid == first.pid != orch.state.jobs["b"].pid
    assert sorted((tmp_path / "ledger").read_text().split()) == ["a", "b"]
    assert {orch.state.jobs[j].status for j in ("a", "b")} == {"completed"}
