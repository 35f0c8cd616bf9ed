"""The console script's entry point reads a plain submission without argparse: what it reads
is what argparse reads, anything it is not sure of goes to argparse, and a submission that
takes that path loads no argparse at all (the CPU it saves is on the path to the job's
start; the figures are tools/bench_dispatch.py's)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from eventq.cli import main as cli_main
from eventq.cli.entry import QUICK_FLAGS, QUICK_VALUES, main, plain_submission
from tests.serverproc import Server, clean_env, running


def by_argparse(words: list[str]) -> dict[str, Any]:
    found = vars(cli_main.parser("jobs", "submit").parse_args(words))
    found.pop("run")
    return found


@pytest.mark.parametrize("words", [
    ["jobs", "submit", "--", "date", "+%s%N"],
    ["jobs", "submit", "--gpus", "2", "--name", "train", "--", "python", "t.py", "--gpus", "8"],
    ["jobs", "submit", "--gpus=0", "--format=json", "--target", "local", "--no-wait", "--",
     "true"],
    ["jobs", "submit", "--priority", "7", "--max-runtime", "1.5", "--estimated-runtime", "60",
     "--max-attempts", "3", "--retry-on-failure", "--any-gpu", "--team", "vision", "--",
     "sh", "-c", "echo --"],
    ["jobs", "submit", "--url", "http://h:1", "--token", "t", "--ca", "ca.pem", "--dry-run",
     "--requires-approval", "--no-export-env", "--gpus", "1", "--gpus", "3", "--", "x"],
    ["jobs", "submit", "--name=", "--format", "table", "--", "--"],
    ["jobs", "submit", "--gpus", " 4", "--", "x"],
])
def test_a_plain_submission_is_read_as_argparse_reads_it(words: list[str]) -> None:
    quick = plain_submission(words)
    assert quick is not None
    assert vars(quick) == by_argparse(words)


def sample(kind: Any) -> str:
    return kind[-1] if isinstance(kind, tuple) else {int: "3", float: "2.5", str: "v"}[kind]


@pytest.mark.parametrize("option", [*QUICK_FLAGS, *QUICK_VALUES])
def test_each_option_read_by_hand_is_read_as_argparse_reads_it(option: str) -> None:
    given = [option] if option in QUICK_FLAGS else [option, sample(QUICK_VALUES[option][1])]
    words = ["jobs", "submit", *given, "--", "x"]
    quick = plain_submission(words)
    assert quick is not None and vars(quick) == by_argparse(words)


@pytest.mark.parametrize("words", [
    ["jobs", "submit", "--gpu", "2", "--", "x"],  # an abbreviation: argparse's to read
    ["jobs", "submit", "--gpus", "two", "--", "x"],  # argparse says what is wrong
    ["jobs", "submit", "--format", "yaml", "--", "x"],
    ["jobs", "submit", "--priority", "-1", "--", "x"],  # a value like an option
    ["jobs", "submit", "--name", "--", "x"],
    ["jobs", "submit", "-h", "--", "x"],
    ["jobs", "submit", "--env", "A=1", "--", "x"],  # not read here
    ["jobs", "submit", "--no-wait=yes", "--", "x"],
    ["jobs", "submit", "echo", "hi"],  # no --
    ["jobs", "submit", "--"],  # no command
    ["jobs", "status"],
    ["--version"],
])
def test_anything_else_goes_to_argparse(words: list[str]) -> None:
    assert plain_submission(words) is None


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path]]:
    data = tmp_path_factory.mktemp("entry") / "data"
    with running(data, data.parent / "server.err") as found:
        yield found, data


#: The console script's lines, and which of argparse, json and re were loaded by its end.
SCRIPT = ("import atexit, sys\n"
          "atexit.register(lambda: print(*(m for m in ('argparse', 'json', 're') "
          "if m in sys.modules), sep=',', file=sys.stderr))\n"
          "from eventq.cli.entry import main\n"
          "sys.exit(main())")


def run(data: Path, *words: str) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    done = subprocess.run([sys.executable, "-c", SCRIPT, *words], capture_output=True,
                          text=True, timeout=60, env={**clean_env(), "EVENTQ_HOME": str(data)},
                          check=False)
    last = done.stderr.splitlines()[-1] if done.stderr.strip() else ""
    return done, set(last.split(",")) - {""}


@pytest.mark.slow
def test_a_plain_submission_runs_without_argparse_and_others_with_it(
        server: tuple[Server, Path]) -> None:
    """And a table's submission without json and re either (``eventq/cli/cjson.py``)."""
    api, data = server
    done, loaded = run(data, "jobs", "submit", "--gpus", "0", "--format", "json", "--",
                       "echo", "hi")
    assert done.returncode == 0, done.stderr
    assert "argparse" not in loaded
    status, job = api.call("GET", f"/api/jobs/{json.loads(done.stdout)['job_id']}")
    assert status == 200 and job["command"] == ["echo", "hi"] and job["gpus"] == 0
    done, loaded = run(data, "jobs", "submit", "--gpus", "0", "--", "true")
    assert done.returncode == 0 and loaded == set(), (done.stderr, loaded)
    assert done.stdout.split()[1] in ("running", "completed", "queued")
    done, loaded = run(data, "jobs", "submit", "--gpu", "0", "--", "true")  # abbreviated
    assert done.returncode == 0 and "argparse" in loaded, done.stderr
    assert done.stdout.split()[1] in ("running", "completed", "queued")


def test_a_refusal_on_the_quick_path_is_said_as_argparse_s_path_says_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("EVENTQ_HOME", str(tmp_path))
    for name in ("EVENTQ_URL", "EVENTQ_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    said = []
    for words in (["jobs", "submit", "--", "true"], ["jobs", "submit", "--gpu", "1", "--", "true"],
                  ["jobs", "submit", "--format", "json", "--", "true"],
                  ["jobs", "submit", "--format", "json", "--gpu", "1", "--", "true"]):
        assert main(words) == 2
        out, err = capsys.readouterr()
        said.append((out, err))
    assert said[0] == said[1] and said[0][1].startswith("eventq: no server found")
    assert said[2] == said[3] and json.loads(said[2][0])["error"].startswith("no server found")
